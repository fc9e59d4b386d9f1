"""What every fieldsync benchmark shares.

- realistic activity (task) records and the edits a technician makes to them;
- ``fieldsync serve`` child processes (127.0.0.1, each on its own port below 32768, each with
  its own ``--node-id bench-node-<i>``, one ``FIELDSYNC_JWT_SECRET``, rate limits lifted
  unless the caller passes its own ``FIELDSYNC_RATE_*``), stopped by their own PIDs only,
  temp dirs always removed;
- their database (``--db``): a temporary SQLite file (``sqlite``, the default), a throwaway
  PostgreSQL cluster started for the run from tests/pg_cluster.py with fsync ON (``pg``), or
  a PostgreSQL server the user gives (``postgresql://…``: a fresh database is created on it
  for every group of nodes and dropped afterwards; only databases the bench created are
  ever dropped); ``--nodes N`` nodes share it;
- JWTs signed with the same secret;
- process and machine resources read from /proc: RSS (VmRSS, peak VmHWM), CPU seconds, summed
  over every node, and the CPU of a throwaway cluster's postgres processes (the postmaster,
  its live children and the children it has reaped);
- the side-by-side table of ``--compare`` (SQLite vs PostgreSQL, 1 vs 2 nodes);
- percentiles, py-spy sampling and a summary of its raw stacks;
- a plain-text table and a JSON results file.

The bench scripts import this as ``common`` (``python bench/<script>.py`` puts ``bench/`` first
on ``sys.path``; multiprocessing's spawned children inherit that path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import inspect
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SECRET = "bench-secret-with-enough-entropy-0123456789abcdef"
# A benchmark measures capacity, not policy: the server's per-device/user/tenant rate limits
# (defaults 60, 120 and 6000 requests per minute) are lifted for the bench server.
UNLIMITED_RATES = {
    "FIELDSYNC_RATE_DEVICE": "1000000/second",
    "FIELDSYNC_RATE_USER": "1000000/second",
    "FIELDSYNC_RATE_TENANT": "1000000/second",
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------------------
# realistic activity (task) records
# ---------------------------------------------------------------------------------------

JOBS = (
    "Check fire extinguishers, block {n}",
    "Quarterly DG set inspection #{n}",
    "Night patrol round, gate {n}",
    "Replace lobby light fittings (floor {n})",
    "HVAC filter cleaning, AHU-{n}",
    "Water tank cleaning and chlorination, tank {n}",
    "CCTV camera alignment, zone {n}",
    "Lift emergency alarm test, lift {n}",
)
REMARKS = (
    "On site, starting now",
    "Waiting for key from security desk",
    "Spare part replaced, testing",
    "Customer signed off",
    "Photos uploaded, all ok",
    "Minor leak found, reported to supervisor",
)
BASE_TIME = 1_767_225_600  # 2026-01-01T00:00:00Z


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def new_task_fields(rng: random.Random, n: int, plan: int) -> dict[str, Any]:
    return {
        "jobdesc": rng.choice(JOBS).format(n=n),
        "plandatetime": iso(plan),
        "expirydatetime": iso(plan + 8 * 3600),
        "gracetime": rng.choice((5, 10, 15, 30)),
        "priority": rng.choice(("LOW", "MEDIUM", "HIGH")),
        "jobstatus": "ASSIGNED",
        "assignee": f"people-{rng.randrange(1, 500)}",
        "lat": round(12.9 + rng.random() / 10, 6),
        "lon": round(77.5 + rng.random() / 10, 6),
        "remarks": "",
    }


def task_edit(
    rng: random.Random, fields: dict[str, Any], plan: int, round_no: int
) -> dict[str, Any]:
    """The fields a technician changes in edit number `round_no` (1-based) of a task."""
    if round_no == 1:
        return {"jobstatus": "INPROGRESS", "starttime": iso(plan + 600), "remarks": REMARKS[0]}
    if round_no == 2:
        return {
            "jobstatus": rng.choice(("WORKING", "STANDBY")),
            "remarks": rng.choice(REMARKS),
            "lat": round(fields["lat"] + 0.0001, 6),
            "lon": round(fields["lon"] - 0.0001, 6),
        }
    if round_no == 3:
        return {
            "jobstatus": "COMPLETED",
            "endtime": iso(plan + 5400),
            "remarks": rng.choice(REMARKS),
        }
    return {"remarks": f"{rng.choice(REMARKS)} ({round_no})"}


# ---------------------------------------------------------------------------------------
# /proc: CPU and memory
# ---------------------------------------------------------------------------------------


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds: user code vs the kernel."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields_after_comm = stat[stat.rindex(")") + 2 :].split()
    return int(fields_after_comm[11]) / CLK_TCK, int(fields_after_comm[12]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(proc_cpu_split(pid))


def proc_tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root`, of its live children, and of the children it has reaped.

    For a postmaster: every postgres process (backends, WAL writer, checkpointer...) is its
    child; a backend that ended during a window moved its CPU into the postmaster's
    cutime/cstime, so it is counted once before it ended and once after.
    """
    with open(f"/proc/{root}/stat") as fh:
        stat = fh.read()
    own = stat[stat.rindex(")") + 2 :].split()
    ticks = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == root:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def proc_runqueue_seconds(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat field 2).

    High while a process is busy means the machine is oversubscribed: it wanted more CPU.
    """
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (non-idle jiffies of /proc/stat)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK  # minus idle and iowait


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass(slots=True)
class CpuWindow:
    """Server CPU (summed over every node), the database server's CPU when it is a local
    throwaway cluster (`db_pid`: its postmaster), and the machine's busy CPU over a window."""

    pid: int | Sequence[int]
    db_pid: int | None = None
    server0: float = 0.0
    sys0: float = 0.0
    busy0: float = 0.0
    wait0: float = 0.0
    db0: float = 0.0
    t0: float = 0.0
    server_s: float = 0.0
    server_sys_s: float = 0.0  # of server_s, in the kernel (syscalls: socket sends, fsync)
    busy_s: float = 0.0
    wait_s: float = 0.0  # the server's threads runnable but not running (CPU contention)
    db_s: float = 0.0  # the database server's processes (0 when not measured)
    wall_s: float = 0.0

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.pid,) if isinstance(self.pid, int) else tuple(self.pid)

    def _server(self) -> tuple[float, float]:
        splits = [proc_cpu_split(p) for p in self.pids]
        return sum(u + s for u, s in splits), sum(s for _, s in splits)

    def _db(self) -> float:
        return proc_tree_cpu_seconds(self.db_pid) if self.db_pid else 0.0

    def start(self) -> CpuWindow:
        self.server0, self.sys0 = self._server()
        self.db0 = self._db()
        self.busy0 = machine_busy_seconds()
        self.wait0 = sum(proc_runqueue_seconds(p) for p in self.pids)
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> CpuWindow:
        total, system = self._server()
        self.server_s, self.server_sys_s = total - self.server0, system - self.sys0
        self.db_s = self._db() - self.db0
        self.busy_s = machine_busy_seconds() - self.busy0
        self.wait_s = sum(proc_runqueue_seconds(p) for p in self.pids) - self.wait0
        self.wall_s = time.perf_counter() - self.t0
        return self

    @property
    def server_wait_pct(self) -> float:
        """How long the server's threads waited for a CPU, as a share of one core."""
        return self.wait_s / self.wall_s * 100 if self.wall_s else 0.0

    @property
    def server_pct(self) -> float:
        """Share of ONE core the server (all nodes together) used over the window."""
        return self.server_s / self.wall_s * 100 if self.wall_s else 0.0

    @property
    def db_pct(self) -> float:
        """Share of ONE core the database server's processes used (0: not measured)."""
        return self.db_s / self.wall_s * 100 if self.wall_s else 0.0

    def others_pct(self, ours_s: float) -> float:
        """Share of one core used by everything but the server, the database server and
        `ours_s` CPU seconds."""
        others = self.busy_s - self.server_s - self.db_s - ours_s
        return max(0.0, others) / self.wall_s * 100 if self.wall_s else 0.0


def raise_nofile_limit(wanted: int | None = None) -> int:
    """Raise this process's open-file soft limit (to the hard limit by default); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(wanted, hard)
    if hard == resource.RLIM_INFINITY and wanted is None:
        target = max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# ---------------------------------------------------------------------------------------
# the server process
# ---------------------------------------------------------------------------------------


def free_port(taken: frozenset[int] | set[int] = frozenset()) -> int:
    """A free TCP port below the ephemeral range (32768+), where client sockets live
    (and not one of `taken`: ports already handed to processes that have not bound yet)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below 32768")


def server_command(db: Path | str, port: int, node_id: str | None = None) -> list[str]:
    script = Path(sys.executable).with_name("fieldsync")
    args = ["serve", "--db", str(db), "--host", "127.0.0.1", "--port", str(port)]
    if node_id:
        args += ["--node-id", node_id]
    if script.exists():
        return [str(script), *args]
    return [
        sys.executable,
        "-c",
        "import sys; from server.cli import main; main(sys.argv[1:])",
        *args,
    ]


class Server:
    """One `fieldsync serve` process; stopped by its own PID.

    Its database is `workdir/bench.db` (SQLite) unless `database` names another (a SQLite
    path several nodes share, or a PostgreSQL URL); `node_id` is passed as ``--node-id``.
    `src`: a folder holding server/, storage/, crdt_models/ to import instead of the installed
    code (A/B a patch). `nofile`: the child's open-file soft limit (each socket is one file).
    `env`: extra environment variables for the child, applied last (e.g. real rate limits:
    ``{"FIELDSYNC_RATE_TENANT": "50/second"}`` overrides ``UNLIMITED_RATES``).
    """

    def __init__(
        self,
        workdir: Path,
        src: Path | None = None,
        nofile: int | None = None,
        env: Mapping[str, str] | None = None,
        *,
        database: str | None = None,
        node_id: str | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.src = src
        self.nofile = nofile
        self.extra_env = dict(env or {})
        self.db = workdir / "bench.db"
        self.database = database or str(self.db)
        self.node_id = node_id
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                server_command(self.database, self.port, self.node_id),
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=self._file_limit_setter(),
            )
        self._wait_healthy(timeout_s)

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            **UNLIMITED_RATES,
            "FIELDSYNC_JWT_SECRET": SECRET,
            "FIELDSYNC_LOG_LEVEL": "WARNING",
        }
        if self.src is not None:  # A/B runs: import server/storage/crdt_models from elsewhere
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.src), env.get("PYTHONPATH")])
            )
        env.update(self.extra_env)
        return env

    def _file_limit_setter(self) -> Callable[[], None] | None:
        """What the child runs between fork and exec: set its open-file soft limit."""
        if not self.nofile:
            return None
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = self.nofile if hard == resource.RLIM_INFINITY else min(self.nofile, hard)
        return functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    def _wait_healthy(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(
            f"the server did not answer /healthz in {timeout_s} s:\n{self.log_tail()}"
        )

    def nofile_limit(self) -> int:
        """The server's open-file soft limit, as the kernel reports it."""
        with open(f"/proc/{self.pid}/limits") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return 0

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmHWM") / 1024

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM this server's PID (never anything else), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"server {self.pid} ignored SIGTERM for {timeout_s} s; sending SIGKILL")
            self.proc.kill()
            return self.proc.wait(timeout_s)

    def metric(self, name: str) -> dict[str, float]:
        """The samples of one metric in GET /metrics: {label text: value} (empty if down)."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith(name + "_created"):
                key, _, value = line.rpartition(" ")
                out[key[len(name) :]] = float(value)
        return out

    def log_problems(self, limit: int = 5) -> tuple[int, list[str]]:
        """How many WARNING/ERROR/Traceback lines the server logged, and the first few."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0, []
        bad = [x for x in lines if any(m in x for m in (" WARNING ", " ERROR ", "Traceback"))]
        return len(bad), bad[:limit]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


@contextlib.contextmanager
def running_server(
    src: Path | None = None, nofile: int | None = None, env: Mapping[str, str] | None = None
) -> Iterator[Server]:
    """A started server in a fresh temp dir; stopped and the dir removed however the block ends.

    Call `server.stop()` inside the block to read the database after a clean shutdown.
    `env`: extra environment variables for the server (see `Server`).
    """
    workdir = Path(tempfile.mkdtemp(prefix="fieldsync-bench-"))
    server = Server(workdir, src, nofile, env)
    try:
        server.start()
        yield server
    finally:
        try:
            code = server.stop()
            if code not in (0, None, -signal.SIGTERM):
                print(f"server exited with {code}:\n{server.log_tail()}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# the database, and several nodes on it
# ---------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_URL_PREFIXES = ("postgresql://", "postgres://")
# The test suite's throwaway cluster skips disk flushes (fsync off); a bench measures what a
# deployment pays for durability, so its cluster flushes like production. Lines appended to
# postgresql.conf after initdb override the earlier ones.
BENCH_PG_SETTINGS = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
PG_SHOWN = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")


def parse_db(value: str) -> str:
    """argparse type of --db: "sqlite", "pg" (a throwaway cluster) or a postgresql:// URL."""
    text = value.strip()
    if text.lower() == "sqlite":
        return "sqlite"
    if text.lower() in ("pg", "postgres", "postgresql"):
        return "pg"
    if text.startswith(PG_URL_PREFIXES):
        return text
    raise argparse.ArgumentTypeError(
        f"expected sqlite, pg (a throwaway PostgreSQL cluster) or a postgresql:// URL,"
        f" not {value!r}"
    )


def db_kind(spec: str) -> str:
    return "sqlite" if spec == "sqlite" else "postgresql"


def safe_url(url: str) -> str:
    """A database URL with its password masked, for printing."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def with_database(url: str, name: str) -> str:
    """The same server URL (user, host, options) naming another database."""
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path="/" + name))


def load_pg_cluster() -> Any:
    """tests/pg_cluster.py, loaded from its file (tests/ is no package a bench can import)."""
    name = "fieldsync_bench_pg_cluster"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO_ROOT / "tests" / "pg_cluster.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _asyncpg() -> Any:
    """asyncpg, imported when a bench first talks to PostgreSQL (the server's driver)."""
    import asyncpg  # type: ignore[import-untyped]

    return asyncpg


def _pg_ident(name: str) -> str:
    if not name.replace("_", "").isalnum() or not name.isascii():
        raise ValueError(f"not a plain database name: {name!r}")
    return f'"{name}"'


class Databases:
    """Where each group of bench nodes keeps its data; `fresh()` gives every group new tables.

    - ``sqlite``: ``bench.db`` in the group's temp dir (every node of the group opens it);
    - ``pg``: a throwaway cluster (tests/pg_cluster.py), started at the first `fresh()` with
      fsync ON (see BENCH_PG_SETTINGS) and removed by `close()`; a new database per group;
    - ``postgresql://…``: a new database ``fieldsync_bench_<hex>`` on that server per group
      (CREATE DATABASE), dropped by `release()` unless `keep`. If the role may not create
      databases, the URL's own database is used instead, once, and only if it holds no table.
      Nothing the bench did not create is ever dropped.
    """

    def __init__(self, spec: str, keep: bool = False) -> None:
        self.spec = spec
        self.kind = db_kind(spec)
        self.keep = keep
        self.cluster: Any = None
        self.settings: dict[str, str] = {}  # PG_SHOWN, read from the server
        self._created: dict[str, str] = {}  # URL -> name of databases created on a given server
        self._given_used = False

    def __enter__(self) -> Databases:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the throwaway cluster (by its own postmaster) and remove its files."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.cleanup()

    @property
    def label(self) -> str:
        return "SQLite" if self.kind == "sqlite" else "PostgreSQL"

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"SQLite (a file in {tempfile.gettempdir()}, WAL, synchronous=FULL)"
        where = (
            "a throwaway cluster on 127.0.0.1"
            if self.spec == "pg"
            else f"a fresh database on {safe_url(self.spec)}"
        )
        if self.cluster is not None and self.cluster.base is not None:
            where += f" in {self.cluster.base}"
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"PostgreSQL, {where}" + (f" ({shown})" if shown else "")

    def postmaster_pid(self) -> int | None:
        """The throwaway cluster's postmaster (every postgres process is its child)."""
        if self.cluster is None:
            return None
        try:
            return int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def fresh(self, workdir: Path) -> str:
        """A database no node has used yet: a SQLite path or a PostgreSQL URL."""
        if self.kind == "sqlite":
            return str(workdir / "bench.db")
        name = f"fieldsync_bench_{uuid.uuid4().hex[:12]}"
        if self.spec == "pg":
            return str(self._throwaway().create_database(name))
        url = asyncio.run(self._create_on_server(name))
        if not self.settings:
            self.settings = asyncio.run(self._show(url))
        return url

    def release(self, database: str) -> None:
        """Drop a database this object created on the user's server (never any other)."""
        name = self._created.pop(database, None)
        if name is None or self.keep:
            return
        try:
            asyncio.run(self._execute(self.spec, f"DROP DATABASE IF EXISTS {_pg_ident(name)}"))
        except Exception as exc:  # noqa: BLE001 - the run's results stand; say what is left
            print(f"warning: could not drop the bench database {name}: {exc}; drop it by hand")

    def _throwaway(self) -> Any:
        if self.cluster is not None:
            return self.cluster
        module = load_pg_cluster()
        options: dict[str, Any] = {"port": free_port()}
        if "parent_dir" in inspect.signature(module.PostgresCluster).parameters:
            # the suite's cluster lives in /dev/shm when it can; a bench's must be on the
            # disk, as the SQLite file is, or its fsyncs cost nothing
            options["parent_dir"] = Path(tempfile.gettempdir())
        cluster = module.PostgresCluster(**options)
        try:
            cluster.init()
            with (cluster.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\n# bench/common.py: a bench measures durable commits\n")
                conf.writelines(f"{k} = {v}\n" for k, v in BENCH_PG_SETTINGS.items())
            cluster.start()
            self.settings = {k: cluster.psql(f"SHOW {k}").strip() for k in PG_SHOWN}
        except BaseException:
            cluster.cleanup()
            raise
        if self.settings.get("fsync") != "on":
            cluster.cleanup()
            raise RuntimeError(f"the bench cluster runs with fsync={self.settings.get('fsync')}")
        self.cluster = cluster
        return cluster

    async def _create_on_server(self, name: str) -> str:
        asyncpg = _asyncpg()
        conn = await asyncpg.connect(self.spec, timeout=10)
        try:
            try:
                await conn.execute(f"CREATE DATABASE {_pg_ident(name)}")
            except asyncpg.PostgresError as exc:
                return await self._given_if_empty(conn, exc)
        finally:
            await conn.close()
        url = with_database(self.spec, name)
        self._created[url] = name
        return url

    async def _given_if_empty(self, conn: Any, exc: Exception) -> str:
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_catalog.pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        if tables == 0 and not self._given_used:
            self._given_used = True
            print(f"note: CREATE DATABASE failed ({exc}); using the given (empty) database")
            return self.spec
        why = "was used by an earlier phase" if self._given_used else f"holds {tables} tables"
        raise RuntimeError(
            f"cannot create a fresh database on {safe_url(self.spec)} ({type(exc).__name__}:"
            f" {exc}), and the given database {why}. Every group of bench nodes needs fresh"
            " tables: connect as a role with CREATEDB, or pass the URL of an EMPTY database"
            " (one per bench run, and a run of a single phase/configuration)."
        )

    @staticmethod
    async def _show(url: str) -> dict[str, str]:
        asyncpg = _asyncpg()
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return {k: str(await conn.fetchval(f"SHOW {k}")) for k in PG_SHOWN}
        finally:
            await conn.close()

    @staticmethod
    async def _execute(url: str, sql: str) -> None:
        asyncpg = _asyncpg()
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


class Nodes:
    """`count` fieldsync nodes (`bench-node-<i>`, one port each) on one database.

    Device i talks to node i % count (`url_for`, `port_for`). /proc readings are sums over
    every node; `db_pid` (a throwaway cluster's postmaster) adds the database server's CPU.
    """

    def __init__(
        self,
        workdir: Path,
        database: str,
        count: int,
        src: Path | None = None,
        nofile: int | None = None,
        env: Mapping[str, str] | None = None,
        db_pid: int | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("at least one node")
        self.database = database
        self.db_pid = db_pid
        self.servers: list[Server] = []
        taken: set[int] = set()
        for i in range(count):
            taken.add(port := free_port(taken))
            nodedir = workdir / f"node-{i}"
            nodedir.mkdir()
            node = Server(
                nodedir, src, nofile, env, database=database, node_id=f"bench-node-{i}", port=port
            )
            self.servers.append(node)

    # -- who is where ------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self.servers)

    @property
    def is_postgres(self) -> bool:
        return self.database.startswith(PG_URL_PREFIXES)

    @property
    def db(self) -> Path:
        """The SQLite file (only meaningful on SQLite)."""
        return Path(self.database)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.servers)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(s.port for s in self.servers)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(s.pid for s in self.servers)

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def pid(self) -> int:
        """Node 0's PID (what a profiler samples)."""
        return self.servers[0].pid

    def url_for(self, device: int) -> str:
        return self.servers[device % self.count].url

    def describe(self) -> str:
        where = safe_url(self.database) if self.is_postgres else self.database
        nodes = ", ".join(f"{s.node_id} pid {s.pid} on :{s.port}" for s in self.servers)
        return f"{self.count} node{'s' if self.count > 1 else ''} ({nodes}); db {where}"

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the nodes one after the other (the first creates the schema)."""
        for server in self.servers:
            server.start(timeout_s)

    def stop(self) -> list[int | None]:
        """SIGTERM each node by its own PID (SIGKILL if it lingers); their exit codes."""
        return [server.stop() for server in self.servers]

    def alive(self) -> bool:
        return all(s.alive() for s in self.servers)

    # -- resources (sums over the nodes) -----------------------------------------

    def cpu_window(self) -> CpuWindow:
        return CpuWindow(self.pids, self.db_pid)

    def cpu_seconds(self) -> float:
        return sum(s.cpu_seconds() for s in self.servers)

    def db_cpu_seconds(self) -> float:
        """The throwaway cluster's CPU seconds so far (0.0 when it is not ours to read)."""
        return proc_tree_cpu_seconds(self.db_pid) if self.db_pid else 0.0

    def rss_mb(self) -> float:
        return sum(s.rss_mb() for s in self.servers)

    def peak_rss_mb(self) -> float:
        """Sum of each node's peak (an upper bound of the nodes' peak together)."""
        return sum(s.peak_rss_mb() for s in self.servers)

    def open_fds(self) -> int:
        return sum(s.open_fds() for s in self.servers)

    def nofile_limit(self) -> int:
        return min(s.nofile_limit() for s in self.servers)

    def http_errors(self) -> dict[str, float]:
        """Error answers by code, summed over the nodes' /metrics (call before stop())."""
        out: Counter[str] = Counter()
        for server in self.servers:
            for labels, value in server.metric("fieldsync_http_errors_total").items():
                code = labels.partition('code="')[2].partition('"')[0] or labels
                out[code] += int(value)
        return {k: v for k, v in out.items() if v}

    def metric_total(self, name: str) -> float:
        """One metric of /metrics, summed over its labels and the nodes (before stop())."""
        return sum(sum(s.metric(name).values()) for s in self.servers)

    def multi_node_counts(self) -> dict[str, float]:
        """Merges done again because another node wrote the record first, and log entries
        read from other nodes (0 on one node)."""
        return {
            "merge_retries": self.metric_total("fieldsync_merge_retries"),
            "peer_entries": self.metric_total("fieldsync_peer_entries"),
        }

    def log_problems(self, limit: int = 5) -> tuple[int, list[str]]:
        """WARNING/ERROR/Traceback lines of every node's log: how many, and the first few."""
        count, first = 0, []
        for server in self.servers:
            n, lines = server.log_problems(limit)
            count += n
            first += [f"[{server.node_id}] {x}" for x in lines]
        return count, first[:limit]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {s.node_id}:\n{s.log_tail(lines)}" for s in self.servers)

    def log_rows_by_tenant(self) -> dict[str, int]:
        """Log rows per tenant in the database (call after stop(): what survived)."""
        if not self.is_postgres:
            return sqlite_log_rows_by_tenant(self.db)
        return asyncio.run(self._pg_log_rows())

    async def _pg_log_rows(self) -> dict[str, int]:
        asyncpg = _asyncpg()
        conn = await asyncpg.connect(self.database, timeout=10)
        try:
            rows = await conn.fetch("SELECT tenant, count(*) FROM log GROUP BY tenant")
            return {r[0]: int(r[1]) for r in rows}
        finally:
            await conn.close()


def sqlite_log_rows_by_tenant(db: Path) -> dict[str, int]:
    """Log rows per tenant in a SQLite file (read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT tenant, count(*) FROM log GROUP BY tenant").fetchall())
    finally:
        conn.close()


@contextlib.contextmanager
def running_nodes(
    databases: Databases,
    count: int = 1,
    src: Path | None = None,
    nofile: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Nodes]:
    """`count` started nodes on a fresh database of `databases`, in a fresh temp dir; the
    nodes are stopped (by their PIDs), a database the bench created on a given server is
    dropped and the dir removed however the block ends. Call `nodes.stop()` inside the block
    to read the database after a clean shutdown."""
    workdir = Path(tempfile.mkdtemp(prefix="fieldsync-bench-"))
    database: str | None = None
    nodes: Nodes | None = None
    try:
        database = databases.fresh(workdir)
        nodes = Nodes(workdir, database, count, src, nofile, env, databases.postmaster_pid())
        nodes.start()
        yield nodes
    finally:
        try:
            if nodes is not None:
                for server, code in zip(nodes.servers, nodes.stop()):
                    if code not in (0, None, -signal.SIGTERM):
                        print(f"{server.node_id} exited with {code}:\n{server.log_tail()}")
        finally:
            try:
                if database is not None:
                    databases.release(database)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# --db, --nodes, --compare
# ---------------------------------------------------------------------------------------

DEFAULT_CONFIGS = "sqlite:1,pg:1,pg:2"


@dataclass(frozen=True, slots=True)
class Backend:
    """One configuration of a comparison: the database kind and the number of nodes."""

    kind: str  # "sqlite" | "postgresql"
    nodes: int

    @property
    def label(self) -> str:
        db = "SQLite" if self.kind == "sqlite" else "PG"
        return f"{db} {self.nodes} node{'s' if self.nodes > 1 else ''}"

    @property
    def key(self) -> str:
        return f"{'sqlite' if self.kind == 'sqlite' else 'pg'}:{self.nodes}"


def parse_configs(text: str) -> list[Backend]:
    """`sqlite:1,pg:1,pg:2` -> backends (pg: PostgreSQL, from --db if it is a URL)."""
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        kind, _, count = part.partition(":")
        if kind not in ("sqlite", "pg") or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"a config is sqlite:N or pg:N, not {part!r}")
        out.append(Backend("sqlite" if kind == "sqlite" else "postgresql", int(count)))
    if not out:
        raise argparse.ArgumentTypeError("no configuration given")
    return out


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--db, --nodes, --keep-db, --compare and --configs, the same in every bench."""
    p.add_argument(
        "--db",
        type=parse_db,
        default="sqlite",
        help="sqlite (a temporary file; default), pg (a throwaway PostgreSQL cluster,"
        " fsync on) or postgresql://USER@HOST/DB (a fresh database is created on that server"
        " for every group of nodes, and dropped after it)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="fieldsync nodes on the one database (device i talks to node i %% N)",
    )
    p.add_argument(
        "--keep-db",
        action="store_true",
        help="with a postgresql:// --db: keep the databases the bench created",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="run the same phases for every --configs entry and print one side-by-side table",
    )
    p.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs(DEFAULT_CONFIGS),
        help=f"what --compare runs (default {DEFAULT_CONFIGS}; pg uses --db if it is a URL,"
        " else a throwaway cluster; sqlite:2 also works but is not a supported deployment)",
    )


def check_backend_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    if args.compare and args.nodes != 1:
        p.error("--compare runs the node counts of --configs; leave --nodes out")


@contextlib.contextmanager
def backend_databases(args: argparse.Namespace) -> Iterator[dict[str, Databases]]:
    """{"sqlite": …, "postgresql": …}: where each kind of backend gets its fresh databases
    (PostgreSQL from --db when it is a URL, else one throwaway cluster, started when first
    needed and stopped at the end)."""
    pg_spec = args.db if args.db != "sqlite" else "pg"
    with Databases("sqlite") as lite, Databases(pg_spec, keep=args.keep_db) as pg:
        yield {"sqlite": lite, "postgresql": pg}


R = TypeVar("R")


def requested_backend(args: argparse.Namespace) -> Backend:
    """The one configuration `--db` and `--nodes` ask for (without `--compare`)."""
    return Backend(db_kind(args.db), args.nodes)


def run_backends(
    args: argparse.Namespace,
    run_one: Callable[[Databases, Backend], R],
    report: Callable[[R], dict[str, Any]],
) -> tuple[list[R], list[dict[str, Any]]]:
    """Run every configuration of `--compare` (else the one asked for) on fresh nodes and a
    fresh database; returns the runs and each run's report."""
    backends = args.configs if args.compare else [requested_backend(args)]
    runs: list[R] = []
    reports: list[dict[str, Any]] = []
    with backend_databases(args) as databases:
        for backend in backends:
            print(f"\n===== {backend.label} =====", flush=True)
            runs.append(run_one(databases[backend.kind], backend))
            reports.append(report(runs[-1]))
    return runs, reports


def results_header(args: argparse.Namespace) -> dict[str, Any]:
    """What every results file starts with: the machine, the code and the settings."""
    return {
        "machine": machine_info(),
        "code": args.code_version,
        "settings": jsonable_settings(vars(args)),
    }


def print_side_by_side(
    title: str, labels: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]
) -> list[str]:
    """A table with one row per measure and one column per configuration; its lines."""
    first = max([len("measure"), *(len(name) for name, _ in rows)])
    widths = [max(12, len(label)) for label in labels]
    lines = [title, "measure".ljust(first) + "".join(f"  {x:>{w}}" for x, w in zip(labels, widths))]
    lines.append("-" * len(lines[-1]))
    for name, cells in rows:
        if not cells:  # a section heading
            lines.append(name)
            continue
        lines.append(name.ljust(first) + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    print("\n".join(lines))
    return lines


def mint(tenant: str, bus: Sequence[str] = ("*",), user: str = "bench-user") -> str:
    """A JWT for `user` of `tenant`, signed with the bench server's secret (valid 6 h)."""
    from server.auth import mint_token

    return mint_token(SECRET, tenant=tenant, user=user, bus=list(bus), ttl_s=6 * 3600)


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def percentiles(values: Sequence[float], qs: Sequence[float] = (0.5, 0.99)) -> list[float]:
    """Several quantiles with one sort."""
    if not values:
        return [0.0 for _ in qs]
    ordered = sorted(values)
    last = len(ordered) - 1
    return [ordered[min(last, int(round(q * last)))] for q in qs]


# ---------------------------------------------------------------------------------------
# py-spy
# ---------------------------------------------------------------------------------------


class Profiler:
    """py-spy attached to the server for one phase (raw collapsed stacks, by function)."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        self.rate = rate
        self.cmd = [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--function",
            "--threads",
            "--nonblocking",
            "--rate",
            str(rate),
            "-o",
            str(out),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(sys.executable).with_name("py-spy").exists()

    def start(self) -> None:
        if not Path(self.cmd[0]).exists():
            raise RuntimeError("py-spy is not installed: /tmp/venv/bin/pip install py-spy")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"py-spy failed: {self.proc.stdout.read().decode() if self.proc.stdout else ''}"
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# Each rule names a step and the substrings of a frame ("func (pkg/module.py:line)") that
# put a sample in it; a sample goes to the step of its innermost matching frame.
Steps = Sequence[tuple[str, tuple[str, ...]]]
PROJECT_CODE = ("(server/", "(crdt_models/", "(storage/", "(pycrdt/", "(json/", "(msgpack")


def short_frame(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py)` -> `func (pkg/mod.py)`."""
    name, _, path = frame.partition(" (")
    path = path.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def classify(frames: list[str], rule_sets: Sequence[Steps]) -> str:
    """The step of the innermost frame matching a rule (earlier rule sets first), or "other"."""
    for rules in rule_sets:
        for frame in reversed(frames):
            for name, needles in rules:
                if any(n in frame for n in needles):
                    return name
    return "other"


def summarize_profile(
    raw_path: Path,
    seconds: float,
    rate: int,
    step_of: Callable[[list[str], str], str],
    top: int = 15,
) -> dict[str, Any]:
    """Own / inclusive time per function, per thread and per step of py-spy raw stacks.

    `step_of(frames, thread)` names the step a sample belongs to. Shares are % of samples.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if len(frames) < 2 or not count_text.isdigit():
            continue
        count, thread, frames = int(count_text), frames[0], frames[1:]
        samples += count
        threads[thread] += count
        own[short_frame(frames[-1])] += count
        for f in set(map(short_frame, frames)):
            total[f] += count
        steps[step_of(frames, thread)] += count
    pct = (lambda n: round(100.0 * n / samples, 1)) if samples else (lambda n: 0.0)
    project = [(f, n) for f, n in total.most_common() if any(m in f for m in PROJECT_CODE)]
    return {
        "samples": samples,
        "busy_cores": round(samples / (seconds * rate), 2) if seconds else None,
        "threads": {k: pct(v) for k, v in threads.most_common()},
        "own": [(f, pct(n)) for f, n in own.most_common(top)],
        "inclusive_project": [(f, pct(n)) for f, n in project[: top + 10]],
        "steps": [(c, pct(n)) for c, n in steps.most_common()],
    }


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: `spec` formats the value (a str value is shown as is), then the text
    plus `suffix` is aligned to `width` (right, unless `left`)."""

    header: str
    width: int
    spec: str = ""
    suffix: str = ""
    left: bool = False

    def cell(self, value: Any) -> str:
        text = value if isinstance(value, str) else f"{value:{self.spec}}{self.suffix}"
        return text.ljust(self.width) if self.left else text.rjust(self.width)

    def head(self) -> str:
        return self.header.ljust(self.width) if self.left else self.header.rjust(self.width)


def table_head(columns: Sequence[Column]) -> list[str]:
    """The header line and a rule under it."""
    head = " ".join(c.head() for c in columns)
    return [head, "-" * len(head)]


def table_row(columns: Sequence[Column], values: Sequence[Any]) -> str:
    return " ".join(c.cell(v) for c, v in zip(columns, values))


def print_table(
    columns: Sequence[Column], rows: Sequence[Sequence[Any]], title: str | None = None
) -> None:
    if title:
        print(title)
    print("\n".join([*table_head(columns), *(table_row(columns, r) for r in rows)]))


def machine_info() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": sys.version.split()[0]}


def code_version() -> str:
    """The git commit of the code under test, "+dirty" if server/storage/crdt_models changed."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "server", "storage", "crdt_models")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def jsonable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def finish(out: Path, payload: dict[str, Any], failed: bool, total_s: float) -> int:
    """The run's last line and its JSON; the process's exit status."""
    print(f"\n{'FAILED' if failed else 'ok'} — total run {total_s:.0f} s; results in {out}")
    write_json(out, payload)
    return 1 if failed else 0
