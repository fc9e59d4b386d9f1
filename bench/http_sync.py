"""HTTP sync benchmark: durable ingest rate, latency, catch-up time, server CPU and memory.

What it does
------------
1. Starts a real server process (``fieldsync serve`` on a temporary SQLite file, 127.0.0.1,
   a port below 32768) and waits for ``GET /healthz``.
2. **Ingest**, one phase per batch size (``--batches 1,10,100,1000``): ``--clients`` worker
   processes, each driving ``--devices`` simulated devices (one aiohttp session each, one
   request in flight per device) that ``POST /api/v1/sync/activity/sync`` for ``--duration``
   seconds. Every item is a fresh change: a device creates ``--open-tasks`` activity records
   (12 realistic fields), then edits each of them ``--edits`` times (jobstatus moving forward,
   remarks, start/end times, position), then moves on to new records. Updates are generated
   with pycrdt (a distinct Yjs client id per device) and packed into msgpack (``--json``: JSON +
   base64) request bodies *before* the timed window, so generation is not measured.
   The server answers only after the group commit of the batch, so
   ``updates/s = items answered created|merged / wall seconds`` is a *durable* rate. After the
   server stops, the log rows of each phase's tenant are counted in the SQLite file and must
   equal the acknowledged items.
3. **Catch-up**: ``--catchup-records`` records (created + ``--catchup-edits`` edits each) are
   loaded into their own tenant; then one fresh device fetches all of them
   (a) by paging ``GET /api/v1/sync/activity/changes?limit=L`` (L = 1000 and 5000) and
   (b) by state-vector push (items carrying only ``state_vector = b"\\x00"``, 1000 per request).
   Each result is verified: applying every received update to empty pycrdt docs must give
   exactly the expected records and fields (a mismatch fails the run, loudly). The records
   were just written, so they are in the server's record cache: this is a warm catch-up.
   ``apply s`` is the client's pycrdt time, reported apart from the fetch time.
4. **Server resources**: RSS (``/proc/<pid>/status`` VmRSS; peak = VmHWM) at start and after
   every phase; server CPU (utime+stime of all its threads, ``/proc/<pid>/stat``) per phase,
   reported as CPU-µs per record-update. Load-generator CPU is reported too: the clients
   share the machine's cores with the server.
5. ``--profile``: samples the server with py-spy (``py-spy record --format raw``, stacks kept in
   ``bench/results/http_sync_profile.txt``) during the 100-item-batch phase (``--profile-batch``)
   and prints the top functions by own time plus a coarse "where the time goes" breakdown.
   py-spy's sampling itself costs CPU, so the throughput of a profiled run is lower; shares
   are of busy samples of all server threads (the aiosqlite threads run SQLite in C).
6. ``--server-src DIR`` runs the server from another copy of ``server/``, ``storage/`` and
   ``crdt_models/`` (via PYTHONPATH), to A/B a patch against the installed code.

Reading the table
-----------------
``upd/s``: durable record-updates per second (all clients together). ``req/s``: requests per
second. ``p50/p99 ms``: request (batch) latency seen by the client, including queueing in
the server's group commit. ``srv CPU µs/upd``: server CPU per update — the number that tells
how fast the server would be with the cores to itself (1e6 / µs = updates/s per core).
``srv CPU %`` and ``cli CPU %``: share of ONE core used by the server and by all load
generators over the phase (both are on the same machine); ``oth CPU %``: what other processes
on the machine used meanwhile (anything well above 0 means the numbers are disturbed).
``RSS MB``: server RSS after the phase. ``acked`` / ``logged``: items answered created|merged
and the log rows found for the phase's tenant in the SQLite file after the server stopped.

Run ``python bench/http_sync.py --quick`` for a < 30 s smoke run; results go to
``bench/results/http_sync.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from pycrdt import Doc, Map

SECRET = "bench-secret-with-enough-entropy-0123456789abcdef"
DOMAIN = "activity"
BUS = ("bu1", "bu2", "bu3", "bu4")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MSGPACK = "application/msgpack"
REQUEST_TIMEOUT_S = 120.0

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


@dataclass(slots=True)
class Task:
    record_id: str
    bu: str
    doc: Doc[Any]
    plan: int
    fields: dict[str, Any]


def _edit(task: Task, values: dict[str, Any]) -> bytes:
    """Apply `values` in one transaction; return that transaction's update."""
    before = task.doc.get_state()
    fmap = task.doc.get("fields", type=Map)
    with task.doc.transaction():
        for k, v in values.items():
            fmap[k] = v
    task.fields.update(values)
    return task.doc.get_update(before)


def device_updates(
    seed: int,
    client_id: int,
    n_items: int,
    open_tasks: int,
    edits: int,
    expected: dict[str, dict[str, Any]] | None = None,
) -> list[tuple[str, str, bytes]]:
    """`n_items` (record_id, bu, update) a device pushes, in order.

    The device opens `open_tasks` tasks (one update each), edits each of them `edits`
    times round-robin, then opens the next set. If `expected` is given, the final fields
    of every task are stored in it.
    """
    rng = random.Random(seed)
    out: list[tuple[str, str, bytes]] = []
    serial = 0
    while len(out) < n_items:
        tasks = []
        for _ in range(min(open_tasks, n_items - len(out))):
            serial += 1
            doc: Doc[Any] = Doc(client_id=client_id)
            task = Task(
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                rng.choice(BUS),
                doc,
                BASE_TIME + rng.randrange(0, 90 * 86400, 900),
                {},
            )
            fields = new_task_fields(rng, serial, task.plan)
            out.append((task.record_id, task.bu, _edit(task, fields)))
            tasks.append(task)
        for round_no in range(1, edits + 1):
            for task in tasks:
                if len(out) >= n_items:
                    break
                out.append(
                    (
                        task.record_id,
                        task.bu,
                        _edit(task, task_edit(rng, task.fields, task.plan, round_no)),
                    )
                )
        if expected is not None:
            expected.update({t.record_id: dict(t.fields) for t in tasks})
    return out


def pack_body(items: Sequence[dict[str, Any]], use_json: bool) -> bytes:
    if use_json:
        ready = [
            {
                k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                for k, v in item.items()
            }
            for item in items
        ]
        return json.dumps({"items": ready}, separators=(",", ":")).encode()
    packed: bytes = msgpack.packb({"items": list(items)})
    return packed


def unpack_body(raw: bytes, use_json: bool) -> Any:
    return json.loads(raw) if use_json else msgpack.unpackb(raw)


def wire_bytes(value: Any, use_json: bool) -> bytes:
    return base64.b64decode(value) if use_json else bytes(value)


def content_headers(token: str, device: str, use_json: bool) -> dict[str, str]:
    kind = "application/json" if use_json else MSGPACK
    return {
        "Authorization": f"Bearer {token}",
        "Device-Id": device,
        "Content-Type": kind,
        "Accept": kind,
    }


def push_bodies(
    updates: list[tuple[str, str, bytes]], batch: int, use_json: bool
) -> list[tuple[bytes, int]]:
    """Request bodies of `batch` items each, with their item counts."""
    out = []
    for start in range(0, len(updates), batch):
        chunk = updates[start : start + batch]
        items = [{"record_id": r, "bu": bu, "update": u} for r, bu, u in chunk]
        out.append((pack_body(items, use_json), len(chunk)))
    return out


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


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields_after_comm = stat[stat.rindex(")") + 2 :].split()
    return (int(fields_after_comm[11]) + int(fields_after_comm[12])) / CLK_TCK


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
    """One `fieldsync serve` process on a temporary SQLite file; stopped by its own PID."""

    def __init__(self, workdir: Path, src: Path | None = None) -> None:
        self.workdir = workdir
        self.src = src
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
        env = {**os.environ, "FIELDSYNC_JWT_SECRET": SECRET, "FIELDSYNC_LOG_LEVEL": "WARNING"}
        if self.src is not None:  # A/B runs: import server/storage/crdt_models from elsewhere
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.src), env.get("PYTHONPATH")])
            )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                server_command(self.db, self.port),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
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

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmHWM") / 1024

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"server {self.pid} ignored SIGTERM for {timeout_s} s; sending SIGKILL")
            self.proc.kill()
            return self.proc.wait(timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def mint(tenant: str) -> str:
    from server.auth import mint_token

    return mint_token(SECRET, tenant=tenant, user="bench-user", bus=["*"], ttl_s=6 * 3600)


# ---------------------------------------------------------------------------------------
# load generator processes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    name: str
    tenant: str
    batch: int
    duration_s: float
    items_per_device: int
    devices: int
    clients: int
    open_tasks: int
    edits: int
    use_json: bool
    url: str
    token: str
    client_id_base: int


@dataclass(slots=True)
class WorkerResult:
    worker: int
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    gen_s: float = 0.0
    requests: int = 0
    items_sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    http_errors: int = 0
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)
    exhausted: int = 0  # devices that ran out of pre-generated items before the deadline


def worker_main(spec: PhaseSpec, index: int, barrier: Any, results: Any) -> None:
    """One load-generator process: generate (untimed), wait for the start, push till the end."""
    try:
        started = time.perf_counter()
        plans = [_device_bodies(spec, index, d) for d in range(spec.devices)]
        gen_s = time.perf_counter() - started
        barrier.wait(timeout=600)
        result = asyncio.run(_drive(spec, index, plans))
        result.gen_s = gen_s
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the phase
        result = WorkerResult(index, first_error=f"worker crashed: {type(exc).__name__}: {exc}")
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
    results.put(asdict(result))


def _device_bodies(
    spec: PhaseSpec, worker: int, device: int
) -> tuple[str, list[tuple[bytes, int]]]:
    number = worker * spec.devices + device
    client_id = spec.client_id_base + number
    updates = device_updates(
        client_id, client_id, spec.items_per_device, spec.open_tasks, spec.edits
    )
    return f"{spec.name}-dev-{number}", push_bodies(updates, spec.batch, spec.use_json)


async def _drive(
    spec: PhaseSpec, index: int, plans: list[tuple[str, list[tuple[bytes, int]]]]
) -> WorkerResult:
    result = WorkerResult(index)
    cpu0, t0 = own_cpu_seconds(), time.perf_counter()
    deadline = t0 + spec.duration_s
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sessions = [
        aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1))
        for _ in plans
    ]
    try:
        await asyncio.gather(
            *(
                _drive_device(s, spec, device, bodies, deadline, result)
                for s, (device, bodies) in zip(sessions, plans)
            )
        )
    finally:
        for s in sessions:
            await s.close()
    result.elapsed_s = time.perf_counter() - t0
    result.cpu_s = own_cpu_seconds() - cpu0
    return result


async def _drive_device(
    session: aiohttp.ClientSession,
    spec: PhaseSpec,
    device: str,
    bodies: list[tuple[bytes, int]],
    deadline: float,
    result: WorkerResult,
) -> None:
    url = f"{spec.url}/api/v1/sync/{DOMAIN}/sync"
    headers = content_headers(spec.token, device, spec.use_json)
    for body, count in bodies:
        if time.perf_counter() >= deadline:
            return
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.http_errors += 1
            result.first_error = result.first_error or f"request failed: {exc!r}"
            return
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.requests += 1
        result.items_sent += count
        if status != 200:
            result.http_errors += 1
            result.first_error = result.first_error or f"HTTP {status}: {raw[:300]!r}"
            return  # later edits depend on this batch: stop this device
        for item in unpack_body(raw, spec.use_json)["results"]:
            result.statuses[item["status"]] = result.statuses.get(item["status"], 0) + 1
            if item["status"] not in ("created", "merged") and result.first_error is None:
                result.first_error = f"item answered {item['status']}: {item.get('error')}"
    result.exhausted += 1


# ---------------------------------------------------------------------------------------
# one ingest phase
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class PhaseResult:
    name: str
    tenant: str
    batch: int
    clients: int
    devices_per_client: int
    duration_s: float
    elapsed_s: float
    requests: int
    acked: int
    not_acked: dict[str, int]
    http_errors: int
    first_error: str | None
    updates_per_s: float
    requests_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    server_cpu_s: float
    server_cpu_us_per_update: float
    server_cpu_pct: float
    client_cpu_s: float
    client_cpu_pct: float
    generation_s: float
    devices_exhausted: int
    rss_mb_after: float
    other_cpu_pct: float = 0.0  # other processes on the machine during the phase (not ours)
    logged_rows: int | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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


def run_phase(server: Server, spec: PhaseSpec, profiler: Profiler | None = None) -> PhaseResult:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(spec.clients + 1)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(spec, i, barrier, queue), daemon=True)
        for i in range(spec.clients)
    ]
    for p in procs:
        p.start()
    try:
        try:
            barrier.wait(timeout=600)  # every worker has generated its bodies
        except threading.BrokenBarrierError:
            errors = [queue.get(timeout=5).get("first_error") for _ in range(queue.qsize())]
            raise RuntimeError(f"a load generator failed before the start: {errors}") from None
        if profiler is not None:
            profiler.start()
        cpu0, busy0, t0 = server.cpu_seconds(), machine_busy_seconds(), time.perf_counter()
        raw = [queue.get(timeout=spec.duration_s + REQUEST_TIMEOUT_S + 60) for _ in procs]
        cpu1, busy1 = server.cpu_seconds(), machine_busy_seconds()
        wall = time.perf_counter() - t0
    finally:
        if profiler is not None:
            profiler.stop()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    workers = [WorkerResult(**r) for r in raw]
    result = summarize_phase(spec, workers, cpu1 - cpu0, wall, server.rss_mb())
    others = busy1 - busy0 - result.server_cpu_s - result.client_cpu_s
    result.other_cpu_pct = max(0.0, others) / wall * 100 if wall else 0.0
    return result


def summarize_phase(
    spec: PhaseSpec, workers: list[WorkerResult], server_cpu: float, wall: float, rss: float
) -> PhaseResult:
    statuses: Counter[str] = Counter()
    for w in workers:
        statuses.update(w.statuses)
    acked = statuses["created"] + statuses["merged"]
    elapsed = max((w.elapsed_s for w in workers), default=wall) or wall
    latencies = [x for w in workers for x in w.latencies_ms]
    client_cpu = sum(w.cpu_s for w in workers)
    errors = [w.first_error for w in workers if w.first_error]
    return PhaseResult(
        name=spec.name,
        tenant=spec.tenant,
        batch=spec.batch,
        clients=spec.clients,
        devices_per_client=spec.devices,
        duration_s=spec.duration_s,
        elapsed_s=elapsed,
        requests=sum(w.requests for w in workers),
        acked=acked,
        not_acked={k: v for k, v in statuses.items() if k not in ("created", "merged")},
        http_errors=sum(w.http_errors for w in workers),
        first_error=errors[0] if errors else None,
        updates_per_s=acked / elapsed if elapsed else 0.0,
        requests_per_s=sum(w.requests for w in workers) / elapsed if elapsed else 0.0,
        latency_p50_ms=percentile(latencies, 0.50),
        latency_p99_ms=percentile(latencies, 0.99),
        latency_max_ms=max(latencies, default=0.0),
        server_cpu_s=server_cpu,
        server_cpu_us_per_update=server_cpu / acked * 1e6 if acked else 0.0,
        server_cpu_pct=server_cpu / wall * 100 if wall else 0.0,
        client_cpu_s=client_cpu,
        client_cpu_pct=client_cpu / elapsed * 100 if elapsed else 0.0,
        generation_s=max((w.gen_s for w in workers), default=0.0),
        devices_exhausted=sum(w.exhausted for w in workers),
        rss_mb_after=rss,
    )


# ---------------------------------------------------------------------------------------
# catch-up
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class CatchupResult:
    method: str
    seconds: float
    requests: int
    changes: int
    bytes_received: int
    apply_s: float
    records: int
    correct: bool
    problem: str | None
    server_cpu_s: float
    rss_mb_after: float


async def load_catchup_records(
    server: Server,
    tenant: str,
    token: str,
    n_records: int,
    edits: int,
    devices: int,
    use_json: bool,
) -> tuple[dict[str, dict[str, Any]], float]:
    """Create `n_records` records (+ `edits` edits each) over `devices` devices, 1000 per push."""
    expected: dict[str, dict[str, Any]] = {}
    per_device = -(-n_records // devices)
    plans = []
    for d in range(devices):
        records = min(per_device, n_records - d * per_device)
        if records <= 0:
            break
        client_id = 9_000_000 + d
        updates = device_updates(client_id, client_id, records * (1 + edits), 500, edits, expected)
        plans.append((f"catchup-loader-{d}", push_bodies(updates, 1000, use_json)))
    started = time.perf_counter()
    spec = PhaseSpec(
        "catchup-load",
        tenant,
        1000,
        3600.0,
        0,
        len(plans),
        1,
        500,
        edits,
        use_json,
        server.url,
        token,
        0,
    )
    result = await _drive(spec, 0, plans)
    acked = result.statuses.get("created", 0) + result.statuses.get("merged", 0)
    if acked != n_records * (1 + edits) or result.first_error:
        raise RuntimeError(f"catch-up load failed: {acked} acked, {result.first_error}")
    return expected, time.perf_counter() - started


def verify_docs(docs: dict[str, Doc[Any]], expected: dict[str, dict[str, Any]]) -> str | None:
    """None if the docs hold exactly the expected records and fields, else what differs."""
    if set(docs) != set(expected):
        missing, extra = len(set(expected) - set(docs)), len(set(docs) - set(expected))
        return (
            f"{len(docs)} records received, {len(expected)} expected"
            f" ({missing} missing, {extra} unexpected)"
        )
    wrong = 0
    example = None
    for record_id, doc in docs.items():
        got = dict(doc.get("fields", type=Map).items())
        if got != expected[record_id]:
            wrong += 1
            example = example or f"{record_id}: got {got}, expected {expected[record_id]}"
    return f"{wrong} records with wrong fields, e.g. {example}" if wrong else None


def apply_all(updates: list[tuple[str, bytes]]) -> tuple[dict[str, Doc[Any]], float]:
    started = time.perf_counter()
    docs: dict[str, Doc[Any]] = {}
    for record_id, update in updates:
        docs.setdefault(record_id, Doc()).apply_update(update)
    return docs, time.perf_counter() - started


async def pull_all(
    session: aiohttp.ClientSession,
    server: Server,
    token: str,
    limit: int,
    use_json: bool,
    max_pages: int,
    time_limit_s: float,
) -> tuple[list[tuple[str, bytes]], int, int]:
    """Page the change feed from the start: (record_id, update) pairs, pages, bytes."""
    url = f"{server.url}/api/v1/sync/{DOMAIN}/changes"
    headers = content_headers(token, "catchup-phone", use_json)
    cursor: str | None = None
    out: list[tuple[str, bytes]] = []
    pages = received = 0
    deadline = time.perf_counter() + time_limit_s
    while pages < max_pages and time.perf_counter() < deadline:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        async with session.get(url, params=params, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"pull failed: HTTP {resp.status}: {raw[:300]!r}")
        pages += 1
        received += len(raw)
        page = unpack_body(raw, use_json)
        out += [(c["record_id"], wire_bytes(c["update"], use_json)) for c in page["changes"]]
        cursor = page["cursor"]
        if not page["has_more"]:
            return out, pages, received
    raise RuntimeError(f"pull did not finish within {max_pages} pages / {time_limit_s} s")


async def state_vector_catch_up(
    session: aiohttp.ClientSession,
    server: Server,
    token: str,
    record_ids: list[str],
    use_json: bool,
) -> tuple[list[tuple[str, bytes]], int, int]:
    url = f"{server.url}/api/v1/sync/{DOMAIN}/sync"
    headers = content_headers(token, "catchup-phone", use_json)
    out: list[tuple[str, bytes]] = []
    requests = received = 0
    for start in range(0, len(record_ids), 1000):
        items = [
            {"record_id": r, "state_vector": b"\x00"} for r in record_ids[start : start + 1000]
        ]
        async with session.post(url, data=pack_body(items, use_json), headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"state-vector push failed: HTTP {resp.status}: {raw[:300]!r}")
        requests += 1
        received += len(raw)
        for item in unpack_body(raw, use_json)["results"]:
            if item["status"] == "error" or item["update"] is None:
                raise RuntimeError(f"state-vector catch-up item failed: {item}")
            out.append((item["record_id"], wire_bytes(item["update"], use_json)))
    return out, requests, received


async def run_catchup(
    server: Server, args: argparse.Namespace
) -> tuple[dict[str, Any], list[CatchupResult]]:
    tenant = "bench-catchup"
    token = mint(tenant)
    expected, load_s = await load_catchup_records(
        server, tenant, token, args.catchup_records, args.catchup_edits, 4, args.json
    )
    load = {
        "records": len(expected),
        "entries": len(expected) * (1 + args.catchup_edits),
        "seconds": load_s,
        "rss_mb_after": server.rss_mb(),
    }
    results = []
    max_pages = 4 * args.catchup_records + 10
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for limit in args.pull_limits:
            results.append(
                await _timed_catchup(
                    server,
                    f"pull limit={limit}",
                    expected,
                    pull_all(session, server, token, limit, args.json, max_pages, 300.0),
                )
            )
        results.append(
            await _timed_catchup(
                server,
                "state-vector push x1000",
                expected,
                state_vector_catch_up(session, server, token, sorted(expected), args.json),
            )
        )
    return load, results


async def _timed_catchup(
    server: Server, method: str, expected: dict[str, dict[str, Any]], fetch: Any
) -> CatchupResult:
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    updates, requests, received = await fetch
    seconds, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    docs, apply_s = apply_all(updates)
    problem = verify_docs(docs, expected)
    if problem:
        print(f"\n!!!!! CATCH-UP FAILED ({method}): {problem} !!!!!\n", flush=True)
    return CatchupResult(
        method,
        seconds,
        requests,
        len(updates),
        received,
        apply_s,
        len(docs),
        problem is None,
        problem,
        cpu,
        server.rss_mb(),
    )


# ---------------------------------------------------------------------------------------
# profile summary
# ---------------------------------------------------------------------------------------

# Where the time goes: each sample is put in the step of the innermost frame that matches
# one of these substrings (frames look like "Class.func (pkg/module.py:line)"); samples of
# other threads than the event loop's are SQLite work (aiosqlite runs one thread per connection).
SQLITE_THREADS = "sqlite (aiosqlite threads: execute, commit, fsync)"
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("merge: apply_update", ("apply_update (server/gate",)),
    ("merge: state_of (get_state + decode)", ("state_of (server/gate",)),
    ("merge: read_state (doc -> fields)", ("read_state (crdt_models",)),
    ("merge: constraints.evaluate", ("evaluate (crdt_models",)),
    ("merge: capture observer / take_captured", ("take_captured", "_capture (server/live")),
    ("merge: ownership check", ("_check_ownership",)),
    ("merge: stage (materialize, json.dumps, get_state)", ("materialize (crdt_models", "_stage")),
    ("merge: answer (diff / ItemResult)", ("Pipeline._answer",)),
    ("gate: inspect_update / state vector", ("Pipeline._check (",)),
    ("load: store.load_records (loop side)", ("load_records (storage", "_load_chunk (storage")),
    ("load: build docs (Doc(), observe, read)", ("LiveRecords._new", "LiveRecords._build")),
    ("load: pin / evict / unpin", ("LiveRecords.",)),
    ("ownership preload", ("ClientOwners.",)),
    ("group commit (loop side)", ("(storage/",)),
    (
        "body: read + msgpack/json decode + parse_items",
        ("read_body", "parse_items", "_parse_item", "decode_msgpack", "decode_json"),
    ),
    (
        "answer: to_wire + encode + metrics",
        (
            "to_wire",
            "_answer (server/sync_api",
            "_count (server/sync_api",
            "encode (server/codec",
            "prometheus_client",
        ),
    ),
    ("auth (JWT verify)", ("authenticate", "TokenVerifier", "(jwt/")),
    ("pipeline glue (rest)", ("(server/pipeline", "(server/sync_api")),
    ("aiohttp HTTP handling", ("(aiohttp/", "(multidict", "(yarl")),
    ("asyncio loop + sockets", ("(asyncio/", "(selectors")),
)
# py-spy sometimes loses the callers of a generator frame; these name such orphans.
ORPHANS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("merge: constraints.evaluate", ("(crdt_models/rules_common", "(crdt_models/values")),
    ("json encoding (caller lost by py-spy)", ("(json/encoder",)),
)
PROJECT_CODE = ("(server/", "(crdt_models/", "(storage/", "(pycrdt/", "(json/", "(msgpack")


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def _step(frames: list[str], main_thread: bool) -> str:
    if not main_thread:
        return SQLITE_THREADS
    for rules in (STEPS, ORPHANS):
        for frame in reversed(frames):
            for name, needles in rules:
                if any(n in frame for n in needles):
                    return name
    return "other"


def summarize_profile(raw_path: Path, seconds: float, rate: int, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = _frames(stack)
        if len(frames) < 2 or not count_text.isdigit():
            continue
        count, thread, frames = int(count_text), frames[0], frames[1:]
        samples += count
        threads[thread] += count
        own[_short(frames[-1])] += count
        for f in set(map(_short, frames)):
            total[f] += count
        steps[_step(frames, "MainThread" in thread)] += count
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


def _short(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py)` -> `func (pkg/mod.py)`."""
    name, _, path = frame.partition(" (")
    path = path.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


# ---------------------------------------------------------------------------------------
# durability check and report
# ---------------------------------------------------------------------------------------


def logged_rows_by_tenant(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT tenant, count(*) FROM log GROUP BY tenant").fetchall())
    finally:
        conn.close()


def print_phase_table(phases: list[PhaseResult]) -> None:
    head = (
        f"{'batch':>6} {'upd/s':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU':>8}"
        f" {'srv µs/upd':>10} {'srv CPU%':>8} {'cli CPU%':>8} {'oth CPU%':>8} {'RSS MB':>7}"
        f" {'acked':>8} {'logged':>8}"
    )
    print("\nIngest (durable record-updates; every acked item is committed before the answer)")
    print(head)
    print("-" * len(head))
    for p in phases:
        logged = "-" if p.logged_rows is None else str(p.logged_rows)
        print(
            f"{p.batch:>6} {p.updates_per_s:>8.0f} {p.requests_per_s:>8.0f}"
            f" {p.latency_p50_ms:>8.1f}"
            f" {p.latency_p99_ms:>8.1f} {p.server_cpu_s:>7.1f}s {p.server_cpu_us_per_update:>10.1f}"
            f" {p.server_cpu_pct:>7.0f}% {p.client_cpu_pct:>7.0f}% {p.other_cpu_pct:>7.0f}%"
            f" {p.rss_mb_after:>7.0f}"
            f" {p.acked:>8} {logged:>8}"
        )
        if p.not_acked or p.http_errors or p.first_error:
            print(
                f"       !! not acked: {p.not_acked}, HTTP errors {p.http_errors}: {p.first_error}"
            )
        if p.devices_exhausted:
            print(
                f"       note: {p.devices_exhausted} devices ran out of pre-generated items "
                f"after {p.elapsed_s:.1f} s (raise --max-updates for a full-length phase)"
            )


def print_catchup_table(load: dict[str, Any], results: list[CatchupResult], goal_s: float) -> None:
    print(
        f"\nCatch-up of {load['records']} records ({load['entries']} log entries; loaded in"
        f" {load['seconds']:.1f} s) by one fresh device"
    )
    head = (
        f"{'method':<26} {'seconds':>8} {'requests':>8} {'updates':>8} {'MB recv':>8}"
        f" {'srv CPU s':>9} {'apply s':>8} {'records':>8} {'ok':>4} {'goal':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        goal = "met" if r.seconds <= goal_s else "MISS"
        print(
            f"{r.method:<26} {r.seconds:>8.2f} {r.requests:>8} {r.changes:>8}"
            f" {r.bytes_received / 1e6:>8.2f} {r.server_cpu_s:>9.2f} {r.apply_s:>8.2f}"
            f" {r.records:>8} {'yes' if r.correct else 'NO':>4} {goal:>6}"
        )
        if r.problem:
            print(f"   !! {r.problem}")


def print_profile(summary: dict[str, Any], out: Path, us_per_update: float | None) -> None:
    print(
        f"\nServer profile, {summary['batch']}-item batches ({summary['samples']} py-spy samples,"
        f" raw stacks in {out})"
    )
    print(f"busy cores (samples / (rate x seconds)): {summary['busy_cores']}")
    print("threads: " + ", ".join(f"{k} {v}%" for k, v in summary["threads"].items()))
    print("\nTop functions by own time:")
    for name, share in summary["own"]:
        print(f"  {share:>5.1f}%  {name}")
    print("\nTop project / pycrdt functions by inclusive time:")
    for name, share in summary["inclusive_project"]:
        print(f"  {share:>5.1f}%  {name}")
    print("\nWhere the server's busy time goes (innermost recognised step of each sample;")
    print(" µs/upd = share x the phase's server CPU per update, an estimate):")
    for name, share in summary["steps"]:
        us = f"{share * us_per_update / 100:6.0f} µs/upd" if us_per_update else ""
        print(f"  {share:>5.1f}%  {us}  {name}")


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a small < 30 s smoke run")
    p.add_argument("--batches", default="1,10,100,1000", help="batch sizes, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per ingest phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unreported warm-up load")
    p.add_argument("--clients", type=int, default=4, help="load-generator processes")
    p.add_argument("--devices", type=int, default=4, help="devices (sessions) per process")
    p.add_argument(
        "--open-tasks",
        type=int,
        default=500,
        help="records a device creates before editing them round-robin",
    )
    p.add_argument("--edits", type=int, default=3, help="edits per record after its creation")
    p.add_argument(
        "--max-updates",
        type=int,
        default=250_000,
        help="cap on pre-generated updates per phase (bounds every phase's work)",
    )
    p.add_argument(
        "--rate-guess",
        type=float,
        default=25_000,
        help="updates/s to pre-generate for (x duration, capped by --max-updates)",
    )
    p.add_argument("--catchup-records", type=int, default=10_000)
    p.add_argument("--catchup-edits", type=int, default=1)
    p.add_argument("--catchup-goal", type=float, default=2.0, help="seconds")
    p.add_argument("--pull-limits", default="1000,5000")
    p.add_argument("--no-catchup", action="store_true")
    p.add_argument(
        "--json", action="store_true", help="JSON bodies (base64 bytes) instead of msgpack"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server during the --profile-batch phase (only that phase by default)",
    )
    p.add_argument(
        "--profile-batch",
        type=int,
        default=100,
        help="the batch size whose phase --profile samples",
    )
    p.add_argument(
        "--server-src",
        type=Path,
        default=None,
        help="a folder holding server/, storage/, crdt_models/ to run instead (A/B a patch)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.clients, args.devices = 1.5, 0.5, 2, 2
        args.max_updates, args.catchup_records, args.open_tasks = 10_000, 2_000, 200
    if args.profile and args.batches == p.get_default("batches"):
        args.batches = str(args.profile_batch)
        args.no_catchup = True
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    args.pull_limits = [int(x) for x in args.pull_limits.split(",") if x.strip()]
    if any(not 1 <= b <= 1000 for b in args.batch_sizes):
        p.error("batch sizes must be 1..1000")
    suffix = profile_suffix(args.profile_batch)
    default_name = f"http_sync_profile{suffix}.json" if args.profile else "http_sync.json"
    args.out = args.out or RESULTS_DIR / default_name
    return args


def profile_suffix(batch: int) -> str:
    return "" if batch == 100 else f"_b{batch}"


def phase_spec(
    server: Server, args: argparse.Namespace, name: str, batch: int, duration: float, number: int
) -> PhaseSpec:
    devices = args.clients * args.devices
    # batch 1 cannot reach the rate of large batches; generate less for it
    guess = args.rate_guess if batch >= 10 else args.rate_guess / 4
    total = min(args.max_updates, int(guess * duration * 1.2) + devices * batch)
    per_device = max(batch, -(-total // devices))
    tenant = f"bench-{name}"
    return PhaseSpec(
        name,
        tenant,
        batch,
        duration,
        per_device,
        args.devices,
        args.clients,
        args.open_tasks,
        args.edits,
        args.json,
        server.url,
        mint(tenant),
        1_000_000 + number * 10_000,
    )


def run_ingest(
    server: Server, args: argparse.Namespace, rss_log: dict[str, float]
) -> tuple[list[PhaseResult], dict[str, Any] | None]:
    profile_summary = None
    if args.warmup > 0:
        warm = run_phase(server, phase_spec(server, args, "warmup", 10, args.warmup, 0))
        rss_log["after warmup"] = server.rss_mb()
        print(f"warm-up: {warm.updates_per_s:.0f} upd/s (not reported)", flush=True)
    phases = []
    for number, batch in enumerate(args.batch_sizes, start=1):
        spec = phase_spec(server, args, f"b{batch}", batch, args.duration, number)
        profiler = None
        if args.profile and batch == args.profile_batch:
            suffix = profile_suffix(batch)
            profiler = Profiler(server.pid, RESULTS_DIR / f"http_sync_profile{suffix}.txt")
        print(
            f"phase batch={batch}: {spec.clients} processes x {spec.devices} devices,"
            f" {spec.items_per_device} updates pre-generated per device",
            flush=True,
        )
        result = run_phase(server, spec, profiler)
        phases.append(result)
        rss_log[f"after batch {batch}"] = result.rss_mb_after
        print(
            f"  -> {result.updates_per_s:.0f} upd/s, p50 {result.latency_p50_ms:.1f} ms,"
            f" p99 {result.latency_p99_ms:.1f} ms,"
            f" server {result.server_cpu_us_per_update:.0f} µs/upd"
            f" (generation took {result.generation_s:.1f} s)",
            flush=True,
        )
        if profiler is not None:
            profile_summary = summarize_profile(profiler.out, result.elapsed_s, profiler.rate)
            profile_summary.update(batch=batch, raw=str(profiler.out))
    return phases, profile_summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fieldsync-bench-"))
    server = Server(workdir, args.server_src)
    rss_log: dict[str, float] = {}
    phases: list[PhaseResult] = []
    catchup: list[CatchupResult] = []
    load: dict[str, Any] = {}
    profile_summary = None
    failed = False
    run_started = time.perf_counter()
    try:
        try:
            server.start()
            rss_log["start"] = server.rss_mb()
            source = args.server_src or "the installed fieldsync"
            print(f"server pid {server.pid} on {server.url}, db {server.db}, code: {source}")
            phases, profile_summary = run_ingest(server, args, rss_log)
            if not args.no_catchup:
                load, catchup = asyncio.run(run_catchup(server, args))
                rss_log["after catch-up"] = server.rss_mb()
            rss_log["peak (VmHWM)"] = server.peak_rss_mb()
        finally:
            code = server.stop()
            if code not in (0, None, -signal.SIGTERM):
                print(f"server exited with {code}:\n{server.log_tail()}")
        failed |= check_durability(server.db, phases)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failed |= any(p.not_acked or p.http_errors or p.first_error for p in phases)
    failed |= any(not r.correct for r in catchup)
    report(
        args,
        phases,
        load,
        catchup,
        rss_log,
        profile_summary,
        failed,
        time.perf_counter() - run_started,
    )
    return 1 if failed else 0


def check_durability(db: Path, phases: list[PhaseResult]) -> bool:
    """Fill in logged rows per phase; True if any acked update is missing from the log."""
    if not phases:
        return False
    logged = logged_rows_by_tenant(db)
    failed = False
    for p in phases:
        p.logged_rows = logged.get(p.tenant, 0)
        if p.logged_rows < p.acked:
            print(
                f"\n!!!!! DURABILITY: batch {p.batch}: {p.acked} acked but {p.logged_rows}"
                " log rows !!!!!\n"
            )
            failed = True
    return failed


def report(
    args: argparse.Namespace,
    phases: list[PhaseResult],
    load: dict[str, Any],
    catchup: list[CatchupResult],
    rss_log: dict[str, float],
    profile_summary: dict[str, Any] | None,
    failed: bool,
    run_s: float,
) -> None:
    print(
        f"\nfieldsync HTTP sync benchmark — load average at start {args.loadavg},"
        f" {os.cpu_count()} cores, {args.clients} load processes x"
        f" {args.devices} devices, {'JSON' if args.json else 'msgpack'} bodies,"
        f" {args.duration:.0f} s per phase"
    )
    if phases:
        print_phase_table(phases)
        b100 = [p for p in phases if p.batch == 100]
        if b100:
            verdict = "met" if b100[0].updates_per_s >= 10_000 else "NOT met"
            print(f"goal >= 10,000 upd/s at batch 100: {verdict} ({b100[0].updates_per_s:.0f})")
    if catchup:
        print_catchup_table(load, catchup, args.catchup_goal)
    print("\nServer RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss_log.items()))
    if profile_summary is not None:
        cost = next(
            (p.server_cpu_us_per_update for p in phases if p.batch == profile_summary["batch"]),
            None,
        )
        print_profile(profile_summary, Path(profile_summary["raw"]), cost)
    print(f"\n{'FAILED' if failed else 'ok'} — total run {run_s:.0f} s; results in {args.out}")
    payload = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ingest": [asdict(p) for p in phases],
        "catchup_load": load,
        "catchup": [asdict(r) for r in catchup],
        "server_rss_mb": rss_log,
        "profile": profile_summary,
        "failed": failed,
    }
    args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    sys.exit(main())
