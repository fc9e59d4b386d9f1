"""What every fieldsync benchmark shares.

- realistic activity (task) records and the edits a technician makes to them;
- one ``fieldsync serve`` child process on a temporary SQLite file (127.0.0.1, a port below
  32768, ``FIELDSYNC_JWT_SECRET`` set, rate limits lifted unless the caller passes its own
  ``FIELDSYNC_RATE_*``), stopped by its own PID only, temp dir always removed;
- JWTs signed with the same secret;
- process and machine resources read from /proc: RSS (VmRSS, peak VmHWM), CPU seconds;
- percentiles, py-spy sampling and a summary of its raw stacks;
- a plain-text table and a JSON results file.

The bench scripts import this as ``common`` (``python bench/<script>.py`` puts ``bench/`` first
on ``sys.path``; multiprocessing's spawned children inherit that path).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Server CPU and the machine's busy CPU over one measured window."""

    pid: int
    server0: float = 0.0
    sys0: float = 0.0
    busy0: float = 0.0
    wait0: float = 0.0
    t0: float = 0.0
    server_s: float = 0.0
    server_sys_s: float = 0.0  # of server_s, in the kernel (syscalls: socket sends, fsync)
    busy_s: float = 0.0
    wait_s: float = 0.0  # the server's threads runnable but not running (CPU contention)
    wall_s: float = 0.0

    def start(self) -> CpuWindow:
        user, system = proc_cpu_split(self.pid)
        self.server0, self.sys0 = user + system, system
        self.busy0 = machine_busy_seconds()
        self.wait0 = proc_runqueue_seconds(self.pid)
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> CpuWindow:
        user, system = proc_cpu_split(self.pid)
        self.server_s, self.server_sys_s = user + system - self.server0, system - self.sys0
        self.busy_s = machine_busy_seconds() - self.busy0
        self.wait_s = proc_runqueue_seconds(self.pid) - self.wait0
        self.wall_s = time.perf_counter() - self.t0
        return self

    @property
    def server_wait_pct(self) -> float:
        """How long the server's threads waited for a CPU, as a share of one core."""
        return self.wait_s / self.wall_s * 100 if self.wall_s else 0.0

    @property
    def server_pct(self) -> float:
        """Share of ONE core the server used over the window."""
        return self.server_s / self.wall_s * 100 if self.wall_s else 0.0

    def others_pct(self, ours_s: float) -> float:
        """Share of one core used by everything but the server and `ours_s` CPU seconds."""
        others = self.busy_s - self.server_s - ours_s
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


def free_port() -> int:
    """A free TCP port below the ephemeral range (32768+), where client sockets live."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below 32768")


def server_command(db: Path, port: int) -> list[str]:
    script = Path(sys.executable).with_name("fieldsync")
    args = ["serve", "--db", str(db), "--host", "127.0.0.1", "--port", str(port)]
    if script.exists():
        return [str(script), *args]
    return [
        sys.executable,
        "-c",
        "import sys; from server.cli import main; main(sys.argv[1:])",
        *args,
    ]


class Server:
    """One `fieldsync serve` process on a temporary SQLite file; stopped by its own PID.

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
    ) -> None:
        self.workdir = workdir
        self.src = src
        self.nofile = nofile
        self.extra_env = dict(env or {})
        self.db = workdir / "bench.db"
        self.port = free_port()
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
                server_command(self.db, self.port),
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
