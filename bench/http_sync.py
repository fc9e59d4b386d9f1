"""HTTP sync benchmark: durable ingest rate, latency, catch-up time, server CPU and memory.

What it does
------------
1. Starts ``--nodes`` real server processes (``fieldsync serve``, 127.0.0.1, each on its own
   port below 32768 with ``--node-id bench-node-<i>``; per-device/user/tenant rate limits
   lifted: this measures capacity) on one ``--db`` (a temporary SQLite file by default; see
   "Backends and nodes") and waits for each one's ``GET /healthz``.
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
   nodes stop, the log rows of each phase's tenant are counted in the database (the SQLite
   file or the PostgreSQL database) and must equal the acknowledged items.
3. **Catch-up**: ``--catchup-records`` records (created + ``--catchup-edits`` edits each) are
   loaded into their own tenant; then one fresh device fetches all of them
   (a) by paging ``GET /api/v1/sync/activity/changes?limit=L`` (L = 1000 and 5000) and
   (b) by state-vector push (items carrying only ``state_vector = b"\\x00"``, 1000 per request).
   Each result is verified: applying every received update to empty pycrdt docs must give
   exactly the expected records and fields (a mismatch fails the run, loudly). The records
   were just written, so they are in the server's record cache: this is a warm catch-up
   (with several nodes, warm only on the node that wrote each record). ``apply s`` is the
   client's pycrdt time, reported apart from the fetch time.
4. **Server resources**: RSS (``/proc/<pid>/status`` VmRSS; peak = VmHWM) at start and after
   every phase; server CPU (utime+stime of all its threads, ``/proc/<pid>/stat``) per phase,
   reported as CPU-µs per record-update. Both are sums over every node. On a throwaway
   PostgreSQL cluster (``--db pg``) the CPU of its processes is reported apart (``db``).
   Load-generator CPU is reported too: the clients share the machine's cores with the server.
5. ``--profile``: samples the server with py-spy (``py-spy record --format raw``, stacks kept in
   ``bench/results/http_sync_profile.txt``; node 0 only) during the 100-item-batch phase
   (``--profile-batch``)
   and prints the top functions by own time plus a coarse "where the time goes" breakdown.
   py-spy's sampling itself costs CPU, so the throughput of a profiled run is lower; shares
   are of busy samples of all server threads (the aiosqlite threads run SQLite in C).
6. ``--server-src DIR`` runs the server from another copy of ``server/``, ``storage/`` and
   ``crdt_models/`` (via PYTHONPATH), to A/B a patch against the installed code.

Backends and nodes
------------------
``--db sqlite`` (default): a temporary SQLite file. ``--db pg``: a throwaway PostgreSQL
cluster (tests/pg_cluster.py) in the temporary directory on disk, with fsync and
full_page_writes ON (the test suite's cluster turns them off), removed at the end.
``--db postgresql://USER@HOST/DB``: a fresh database is created on that server for the run
and dropped after it (``--keep-db`` keeps it); without the right to create one, pass an
empty database. ``--nodes N``: N nodes on that one database; device i talks to node i % N
(``--spread request``: each request goes to the next node, as behind a balancer without
stickiness, so every record is created through one node and edited through the others).
``--compare``: the same phases for every ``--configs`` entry (default
``sqlite:1,pg:1,pg:2``), each on fresh nodes and a fresh database, then one side-by-side
table; results in ``bench/results/http_sync_compare.json``.

Reading the table
-----------------
``upd/s``: durable record-updates per second (all clients together). ``req/s``: requests per
second. ``p50/p99 ms``: request (batch) latency seen by the client, including queueing in
the server's group commit. ``srv CPU µs/upd``: server CPU per update — the number that tells
how fast the server would be with the cores to itself (1e6 / µs = updates/s per core).
``srv CPU %`` and ``cli CPU %``: share of ONE core used by the server and by all load
generators over the phase (both are on the same machine); ``oth CPU %``: what other processes
on the machine used meanwhile (anything well above 0 means the numbers are disturbed).
``db µs/upd``, ``db CPU%``: the same for the throwaway PostgreSQL cluster's processes ("-" when
not measured: SQLite runs inside the server process, a given server's processes are not ours).
``RSS MB``: server RSS after the phase. ``acked`` / ``logged``: items answered created|merged
and the log rows found for the phase's tenant in the database after the nodes stopped.

Run ``python bench/http_sync.py --quick`` for a < 30 s smoke run; results go to
``bench/results/http_sync.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from common import (
    BASE_TIME,
    RESULTS_DIR,
    Backend,
    Column,
    CpuWindow,
    Databases,
    Nodes,
    Profiler,
    add_backend_options,
    check_backend_options,
    classify,
    code_version,
    finish,
    loadavg,
    machine_info,
    mint,
    new_task_fields,
    own_cpu_seconds,
    percentile,
    print_side_by_side,
    requested_backend,
    results_header,
    run_backends,
    running_nodes,
    sqlite_log_rows_by_tenant,
    summarize_profile,
    table_head,
    table_row,
    task_edit,
)
from pycrdt import Doc, Map

DOMAIN = "activity"
BUS = ("bu1", "bu2", "bu3", "bu4")
MSGPACK = "application/msgpack"
REQUEST_TIMEOUT_S = 120.0

# ---------------------------------------------------------------------------------------
# the updates devices push
# ---------------------------------------------------------------------------------------


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


def _new_task(rng: random.Random, client_id: int) -> Task:
    record_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    bu = rng.choice(BUS)
    plan = BASE_TIME + rng.randrange(0, 90 * 86400, 900)
    return Task(record_id, bu, Doc(client_id=client_id), plan, {})


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
            task = _new_task(rng, client_id)
            update = _edit(task, new_task_fields(rng, serial, task.plan))
            out.append((task.record_id, task.bu, update))
            tasks.append(task)
        for round_no in range(1, edits + 1):
            for task in tasks:
                if len(out) >= n_items:
                    break
                values = task_edit(rng, task.fields, task.plan, round_no)
                out.append((task.record_id, task.bu, _edit(task, values)))
        if expected is not None:
            expected.update({t.record_id: dict(t.fields) for t in tasks})
    return out


def pack_body(items: Sequence[dict[str, Any]], use_json: bool) -> bytes:
    if use_json:
        ready = [
            {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in i.items()}
            for i in items
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
    urls: tuple[str, ...]  # one per node
    token: str
    client_id_base: int
    spread: str = "device"  # "device": device i -> node i % N; "request": + 1 per request


def node_url(urls: Sequence[str], device: int, request: int, spread: str) -> str:
    """The node a device's request goes to: device i talks to node i % N ("device"), or
    moves to the next node with every request ("request": a balancer without stickiness)."""
    return urls[(device + (request if spread == "request" else 0)) % len(urls)]


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

    def error(self, message: str) -> None:
        self.first_error = self.first_error or message

    def count_answer(self, raw: bytes, use_json: bool) -> None:
        for item in unpack_body(raw, use_json)["results"]:
            self.statuses[item["status"]] = self.statuses.get(item["status"], 0) + 1
            if item["status"] not in ("created", "merged"):
                self.error(f"item answered {item['status']}: {item.get('error')}")


Plan = tuple[str, int, list[tuple[bytes, int]]]  # a device's id, number and request bodies


def worker_main(spec: PhaseSpec, index: int, barrier: Any, results: Any) -> None:
    """One load-generator process: generate (untimed), wait for the start, push till the end."""
    try:
        started = time.perf_counter()
        plans = [_device_plan(spec, index, d) for d in range(spec.devices)]
        gen_s = time.perf_counter() - started
        barrier.wait(timeout=600)
        result = asyncio.run(drive(spec, index, plans))
        result.gen_s = gen_s
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the phase
        result = WorkerResult(index, first_error=f"worker crashed: {type(exc).__name__}: {exc}")
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
    results.put(asdict(result))


def _device_plan(spec: PhaseSpec, worker: int, device: int) -> Plan:
    number = worker * spec.devices + device
    client_id = spec.client_id_base + number
    updates = device_updates(
        client_id, client_id, spec.items_per_device, spec.open_tasks, spec.edits
    )
    return f"{spec.name}-dev-{number}", number, push_bodies(updates, spec.batch, spec.use_json)


async def drive(spec: PhaseSpec, index: int, plans: list[Plan]) -> WorkerResult:
    """Push every device's bodies (one request in flight per device) until the deadline."""
    result = WorkerResult(index)
    cpu0, t0 = own_cpu_seconds(), time.perf_counter()
    deadline = t0 + spec.duration_s
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    nodes = len(spec.urls)
    sessions = [
        aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=nodes, limit_per_host=1)
        )
        for _ in plans
    ]
    try:
        await asyncio.gather(
            *(
                _drive_device(s, spec, device, number, bodies, deadline, result)
                for s, (device, number, bodies) in zip(sessions, plans)
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
    number: int,
    bodies: list[tuple[bytes, int]],
    deadline: float,
    result: WorkerResult,
) -> None:
    headers = content_headers(spec.token, device, spec.use_json)
    for request, (body, count) in enumerate(bodies):
        if time.perf_counter() >= deadline:
            return
        url = f"{node_url(spec.urls, number, request, spec.spread)}/api/v1/sync/{DOMAIN}/sync"
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.http_errors += 1
            result.error(f"request failed: {exc!r}")
            return
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.requests += 1
        result.items_sent += count
        if status != 200:
            result.http_errors += 1
            result.error(f"HTTP {status}: {raw[:300]!r}")
            return  # later edits depend on this batch: stop this device
        result.count_answer(raw, spec.use_json)
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
    nodes: int = 1
    db_cpu_s: float = 0.0  # a throwaway PostgreSQL cluster's processes (0: not measured)
    db_cpu_us_per_update: float = 0.0
    db_cpu_pct: float = 0.0


def run_phase(server: Nodes, spec: PhaseSpec, profiler: Profiler | None = None) -> PhaseResult:
    """Start the load processes, time them from the common start to their last answer."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(spec.clients + 1), ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(spec, i, barrier, queue), daemon=True)
        for i in range(spec.clients)
    ]
    for p in procs:
        p.start()
    try:
        _wait_generated(barrier, queue)
        if profiler is not None:
            profiler.start()
        window = server.cpu_window().start()
        raw = [queue.get(timeout=spec.duration_s + REQUEST_TIMEOUT_S + 60) for _ in procs]
        window.stop()
    finally:
        if profiler is not None:
            profiler.stop()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    result = summarize_phase(spec, [WorkerResult(**r) for r in raw], window, server.rss_mb())
    result.other_cpu_pct = window.others_pct(result.client_cpu_s)
    result.nodes = len(spec.urls)
    result.db_cpu_s, result.db_cpu_pct = window.db_s, window.db_pct
    result.db_cpu_us_per_update = window.db_s / result.acked * 1e6 if result.acked else 0.0
    return result


def _wait_generated(barrier: Any, queue: Any) -> None:
    """Wait until every worker has generated its bodies (they all start together)."""
    try:
        barrier.wait(timeout=600)
    except threading.BrokenBarrierError:
        errors = [queue.get(timeout=5).get("first_error") for _ in range(queue.qsize())]
        raise RuntimeError(f"a load generator failed before the start: {errors}") from None


def summarize_phase(
    spec: PhaseSpec, workers: list[WorkerResult], window: CpuWindow, rss: float
) -> PhaseResult:
    statuses: Counter[str] = Counter()
    for w in workers:
        statuses.update(w.statuses)
    acked = statuses["created"] + statuses["merged"]
    wall, server_cpu = window.wall_s, window.server_s
    elapsed = max((w.elapsed_s for w in workers), default=wall) or wall
    per_s = (lambda n: n / elapsed) if elapsed else (lambda n: 0.0)
    latencies = [x for w in workers for x in w.latencies_ms]
    requests = sum(w.requests for w in workers)
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
        requests=requests,
        acked=acked,
        not_acked={k: v for k, v in statuses.items() if k not in ("created", "merged")},
        http_errors=sum(w.http_errors for w in workers),
        first_error=errors[0] if errors else None,
        updates_per_s=per_s(acked),
        requests_per_s=per_s(requests),
        latency_p50_ms=percentile(latencies, 0.50),
        latency_p99_ms=percentile(latencies, 0.99),
        latency_max_ms=max(latencies, default=0.0),
        server_cpu_s=server_cpu,
        server_cpu_us_per_update=server_cpu / acked * 1e6 if acked else 0.0,
        server_cpu_pct=window.server_pct,
        client_cpu_s=client_cpu,
        client_cpu_pct=per_s(client_cpu) * 100,
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
    db_cpu_s: float = 0.0


Fetched = tuple[list[tuple[str, bytes]], int, int]  # (record_id, update) pairs, requests, bytes


async def load_catchup_records(
    server: Nodes,
    tenant: str,
    token: str,
    n_records: int,
    edits: int,
    devices: int,
    use_json: bool,
    spread: str,
) -> tuple[dict[str, dict[str, Any]], float]:
    """Create `n_records` records (+ `edits` edits each) over `devices` devices, 1000 per push
    (device d on node d % N)."""
    expected: dict[str, dict[str, Any]] = {}
    per_device = -(-n_records // devices)
    plans = []
    for d in range(devices):
        records = min(per_device, n_records - d * per_device)
        if records <= 0:
            break
        client_id = 9_000_000 + d
        # open records in equal sets (of at most 500), so the device makes exactly `records`
        open_tasks = max(k for k in range(1, min(records, 500) + 1) if records % k == 0)
        updates = device_updates(
            client_id, client_id, records * (1 + edits), open_tasks, edits, expected
        )
        plans.append((f"catchup-loader-{d}", d, push_bodies(updates, 1000, use_json)))
    started = time.perf_counter()
    spec = PhaseSpec(
        name="catchup-load",
        tenant=tenant,
        batch=1000,
        duration_s=3600.0,
        items_per_device=0,
        devices=len(plans),
        clients=1,
        open_tasks=500,
        edits=edits,
        use_json=use_json,
        urls=server.urls,
        token=token,
        client_id_base=0,
        spread=spread,
    )
    result = await drive(spec, 0, plans)
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
    server: Nodes,
    token: str,
    limit: int,
    use_json: bool,
    max_pages: int,
    time_limit_s: float,
    spread: str,
) -> Fetched:
    """Page the change feed from the start: (record_id, update) pairs, pages, bytes.

    The device is device 0 (node 0); with ``spread == "request"`` each page comes from the
    next node (a cursor from one node resumes on any other)."""
    headers = content_headers(token, "catchup-phone", use_json)
    cursor: str | None = None
    out: list[tuple[str, bytes]] = []
    pages = received = 0
    deadline = time.perf_counter() + time_limit_s
    while pages < max_pages and time.perf_counter() < deadline:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        url = f"{node_url(server.urls, 0, pages, spread)}/api/v1/sync/{DOMAIN}/changes"
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
    server: Nodes,
    token: str,
    record_ids: list[str],
    use_json: bool,
    spread: str,
) -> Fetched:
    """Ask for every record by an empty state vector, 1000 items per push (device 0)."""
    headers = content_headers(token, "catchup-phone", use_json)
    out: list[tuple[str, bytes]] = []
    requests = received = 0
    for start in range(0, len(record_ids), 1000):
        items = [
            {"record_id": r, "state_vector": b"\x00"} for r in record_ids[start : start + 1000]
        ]
        url = f"{node_url(server.urls, 0, requests, spread)}/api/v1/sync/{DOMAIN}/sync"
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
    server: Nodes, args: argparse.Namespace
) -> tuple[dict[str, Any], list[CatchupResult]]:
    tenant = "bench-catchup"
    token = mint(tenant)
    expected, load_s = await load_catchup_records(
        server, tenant, token, args.catchup_records, args.catchup_edits, 4, args.json, args.spread
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
            fetch = pull_all(
                session, server, token, limit, args.json, max_pages, 300.0, args.spread
            )
            results.append(await _timed_catchup(server, f"pull limit={limit}", expected, fetch))
        fetch = state_vector_catch_up(
            session, server, token, sorted(expected), args.json, args.spread
        )
        results.append(await _timed_catchup(server, "state-vector push x1000", expected, fetch))
    return load, results


async def _timed_catchup(
    server: Nodes, method: str, expected: dict[str, dict[str, Any]], fetch: Any
) -> CatchupResult:
    cpu0, db0, t0 = server.cpu_seconds(), server.db_cpu_seconds(), time.perf_counter()
    updates, requests, received = await fetch
    seconds, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    db_cpu = server.db_cpu_seconds() - db0
    docs, apply_s = apply_all(updates)
    problem = verify_docs(docs, expected)
    if problem:
        print(f"\n!!!!! CATCH-UP FAILED ({method}): {problem} !!!!!\n", flush=True)
    return CatchupResult(
        method=method,
        seconds=seconds,
        requests=requests,
        changes=len(updates),
        bytes_received=received,
        apply_s=apply_s,
        records=len(docs),
        correct=problem is None,
        problem=problem,
        server_cpu_s=cpu,
        rss_mb_after=server.rss_mb(),
        db_cpu_s=db_cpu,
    )


# ---------------------------------------------------------------------------------------
# where the server's time goes (profile steps)
# ---------------------------------------------------------------------------------------

# Each sample is put in the step of the innermost frame that matches one of these
# substrings; samples of other threads than the event loop's are SQLite work (aiosqlite
# runs one thread per connection).
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


def step_of(frames: list[str], thread: str) -> str:
    return classify(frames, (STEPS, ORPHANS)) if "MainThread" in thread else SQLITE_THREADS


# ---------------------------------------------------------------------------------------
# durability check and report
# ---------------------------------------------------------------------------------------


def logged_rows_by_tenant(db: Path) -> dict[str, int]:
    """Log rows per tenant in a SQLite file (bench/noisy_neighbour.py uses it too)."""
    return sqlite_log_rows_by_tenant(db)


def check_durability(nodes: Nodes, phases: list[PhaseResult]) -> bool:
    """Fill in logged rows per phase; True if any acked update is missing from the log.

    Call after the nodes stopped: the rows are read from the SQLite file or the PostgreSQL
    database they shared."""
    if not phases:
        return False
    logged = nodes.log_rows_by_tenant()
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


PHASE_COLUMNS = (
    Column("batch", 6),
    Column("upd/s", 8, ".0f"),
    Column("req/s", 8, ".0f"),
    Column("p50 ms", 8, ".1f"),
    Column("p99 ms", 8, ".1f"),
    Column("srv CPU", 8, ".1f", "s"),
    Column("srv µs/upd", 10, ".1f"),
    Column("srv CPU%", 8, ".0f", "%"),
    Column("db µs/upd", 9),
    Column("db CPU%", 7),
    Column("cli CPU%", 8, ".0f", "%"),
    Column("oth CPU%", 8, ".0f", "%"),
    Column("RSS MB", 7, ".0f"),
    Column("acked", 8),
    Column("logged", 8),
)


def _phase_row(p: PhaseResult, db_measured: bool) -> tuple[Any, ...]:
    logged = "-" if p.logged_rows is None else str(p.logged_rows)
    return (
        p.batch,
        p.updates_per_s,
        p.requests_per_s,
        p.latency_p50_ms,
        p.latency_p99_ms,
        p.server_cpu_s,
        p.server_cpu_us_per_update,
        p.server_cpu_pct,
        f"{p.db_cpu_us_per_update:.1f}" if db_measured else "-",
        f"{p.db_cpu_pct:.0f}%" if db_measured else "-",
        p.client_cpu_pct,
        p.other_cpu_pct,
        p.rss_mb_after,
        p.acked,
        logged,
    )


def print_phase_table(phases: list[PhaseResult], db_measured: bool) -> None:
    print("\nIngest (durable record-updates; every acked item is committed before the answer)")
    print("\n".join(table_head(PHASE_COLUMNS)))
    for p in phases:
        print(table_row(PHASE_COLUMNS, _phase_row(p, db_measured)))
        if p.not_acked or p.http_errors or p.first_error:
            print(
                f"       !! not acked: {p.not_acked}, HTTP errors {p.http_errors}: {p.first_error}"
            )
        if p.devices_exhausted:
            print(
                f"       note: {p.devices_exhausted} devices ran out of pre-generated items "
                f"after {p.elapsed_s:.1f} s (raise --max-updates for a full-length phase)"
            )


CATCHUP_COLUMNS = (
    Column("method", 26, left=True),
    Column("seconds", 8, ".2f"),
    Column("requests", 8),
    Column("updates", 8),
    Column("MB recv", 8, ".2f"),
    Column("srv CPU s", 9, ".2f"),
    Column("db CPU s", 8),
    Column("apply s", 8, ".2f"),
    Column("records", 8),
    Column("ok", 4),
    Column("goal", 6),
)


def print_catchup_table(
    load: dict[str, Any], results: list[CatchupResult], goal_s: float, db_measured: bool
) -> None:
    print(
        f"\nCatch-up of {load['records']} records ({load['entries']} log entries; loaded in"
        f" {load['seconds']:.1f} s) by one fresh device"
    )
    print("\n".join(table_head(CATCHUP_COLUMNS)))
    for r in results:
        row = (
            r.method,
            r.seconds,
            r.requests,
            r.changes,
            r.bytes_received / 1e6,
            r.server_cpu_s,
            f"{r.db_cpu_s:.2f}" if db_measured else "-",
            r.apply_s,
            r.records,
            "yes" if r.correct else "NO",
            "met" if r.seconds <= goal_s else "MISS",
        )
        print(table_row(CATCHUP_COLUMNS, row))
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


@dataclass(slots=True)
class Run:
    """Everything one run (one backend) measured."""

    backend: Backend
    phases: list[PhaseResult] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)
    catchup: list[CatchupResult] = field(default_factory=list)
    rss_log: dict[str, float] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    failed: bool = False
    error: str | None = None  # the run stopped early: why
    setup: str = ""  # the nodes and their database
    db_measured: bool = False  # a throwaway cluster: its CPU is read from /proc
    http_error_answers: dict[str, float] = field(default_factory=dict)  # nodes' /metrics
    multi_node: dict[str, float] = field(default_factory=dict)  # merge retries, peer entries
    log_problems: tuple[int, list[str]] = (0, [])
    loadavg: str = ""
    seconds: float = 0.0

    def check(self) -> None:
        self.failed |= any(p.not_acked or p.http_errors or p.first_error for p in self.phases)
        self.failed |= any(not r.correct for r in self.catchup)
        self.failed |= self.error is not None


def report(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """Print one run's tables; its JSON payload."""
    print(
        f"\nfieldsync HTTP sync benchmark, {run.backend.label} — load average at start"
        f" {run.loadavg}, {machine_info()['cores']} cores, {args.clients} load processes x"
        f" {args.devices} devices, {'JSON' if args.json else 'msgpack'} bodies,"
        f" {args.duration:.0f} s per phase"
    )
    print(f"{run.setup}; devices spread over the nodes by {args.spread}")
    if run.phases:
        print_phase_table(run.phases, run.db_measured)
        b100 = [p for p in run.phases if p.batch == 100]
        if b100:
            verdict = "met" if b100[0].updates_per_s >= 10_000 else "NOT met"
            print(f"goal >= 10,000 upd/s at batch 100: {verdict} ({b100[0].updates_per_s:.0f})")
    if run.catchup:
        print_catchup_table(run.load, run.catchup, args.catchup_goal, run.db_measured)
    print("\nServer RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in run.rss_log.items()))
    if run.backend.nodes > 1:
        print(
            f"Several nodes: {run.multi_node.get('merge_retries', 0):.0f} merges done again"
            f" (another node wrote the record first), {run.multi_node.get('peer_entries', 0):.0f}"
            " log entries read from other nodes"
        )
    if run.http_error_answers:
        print(f"!! error answers counted by the nodes (/metrics): {run.http_error_answers}")
    if run.log_problems[0]:
        print(f"!! the nodes logged {run.log_problems[0]} warnings/errors: {run.log_problems[1]}")
    if run.error:
        print(f"!! the run stopped early: {run.error}")
    if run.profile is not None:
        batch = run.profile["batch"]
        cost = next((p.server_cpu_us_per_update for p in run.phases if p.batch == batch), None)
        print_profile(run.profile, Path(run.profile["raw"]), cost)
    print(f"\n{'FAILED' if run.failed else 'ok'} — {run.backend.label}: {run.seconds:.0f} s")
    return {
        "backend": run.backend.key,
        "setup": run.setup,
        "loadavg": run.loadavg,
        "ingest": [asdict(p) for p in run.phases],
        "catchup_load": run.load,
        "catchup": [asdict(r) for r in run.catchup],
        "server_rss_mb": run.rss_log,
        "http_error_answers": run.http_error_answers,
        "multi_node": run.multi_node,
        "server_log_problems": list(run.log_problems),
        "profile": run.profile,
        "error": run.error,
        "failed": run.failed,
        "seconds": run.seconds,
    }


def comparison_rows(args: argparse.Namespace, runs: list[Run]) -> list[tuple[str, list[str]]]:
    """One row per measure, one cell per run ("-": not measured)."""
    rows: list[tuple[str, list[str]]] = []

    def add(name: str, values: list[str]) -> None:
        rows.append((name, values))

    def cells(batch: int, fmt: str, get: Any, only_db: bool = False) -> list[str]:
        phases = [next((p for p in r.phases if p.batch == batch), None) for r in runs]
        return [
            "-" if p is None or (only_db and not r.db_measured) else format(get(p), fmt)
            for p, r in zip(phases, runs)
        ]

    for batch in args.batch_sizes:
        add(f"batch {batch}", [])
        add("  upd/s (durable)", cells(batch, ",.0f", lambda p: p.updates_per_s))
        add("  p50 ms", cells(batch, ".1f", lambda p: p.latency_p50_ms))
        add("  p99 ms", cells(batch, ".1f", lambda p: p.latency_p99_ms))
        add("  server CPU µs/upd", cells(batch, ".0f", lambda p: p.server_cpu_us_per_update))
        add("  postgres CPU µs/upd", cells(batch, ".0f", lambda p: p.db_cpu_us_per_update, True))
        add(
            "  server+postgres µs/upd",
            cells(batch, ".0f", lambda p: p.server_cpu_us_per_update + p.db_cpu_us_per_update),
        )
        add("  acked = logged", cells(batch, "", lambda p: f"{p.acked}={p.logged_rows}"))
    if not args.no_catchup:
        loaded = max((r.load.get("records", 0) for r in runs), default=0)
        add(f"catch-up of {loaded:,} records, s", [])
        add("  load (1000/push, 4 devices)", [f"{r.load.get('seconds', 0):.2f}" for r in runs])
        methods = dict.fromkeys(c.method for r in runs for c in r.catchup)
        for method in methods:
            found = [next((c for c in r.catchup if c.method == method), None) for r in runs]
            add(
                f"  {method}",
                [
                    "-" if c is None else f"{c.seconds:.2f}" + ("" if c.correct else " WRONG")
                    for c in found
                ],
            )
    add("peak RSS MB (all nodes)", [f"{r.rss_log.get('peak (VmHWM)', 0):.0f}" for r in runs])
    add("items not acked", [str(sum(sum(p.not_acked.values()) for p in r.phases)) for r in runs])
    add("error answers (/metrics)", [_codes(r.http_error_answers) for r in runs])
    add(
        "merges redone (other node first)",
        [f"{r.multi_node.get('merge_retries', 0):.0f}" for r in runs],
    )
    add(
        "entries read from other nodes",
        [f"{r.multi_node.get('peer_entries', 0):,.0f}" for r in runs],
    )
    add("node log warnings", [str(r.log_problems[0]) for r in runs])
    add("load avg at start", [r.loadavg.split()[0] if r.loadavg else "-" for r in runs])
    add("result", ["FAILED" if r.failed else "ok" for r in runs])
    return rows


def _codes(counts: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:.0f}" for k, v in sorted(counts.items())) or "none"


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
    p.add_argument(
        "--spread",
        choices=("device", "request"),
        default="device",
        help="with several nodes: device i talks to node i %% N (device), or every request"
        " goes to the next node, as behind a balancer without stickiness (request)",
    )
    add_backend_options(p)
    p.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = p.parse_args(argv)
    check_backend_options(p, args)
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
    if args.compare:
        default_name = "http_sync_compare.json"
    elif args.db != "sqlite" or args.nodes > 1:  # keep the SQLite baseline's file
        default_name = default_name.replace(".json", f"_{requested_backend(args).key}.json")
    args.out = args.out or RESULTS_DIR / default_name.replace(":", "_n")
    return args


def profile_suffix(batch: int) -> str:
    return "" if batch == 100 else f"_b{batch}"


def phase_spec(
    server: Nodes, args: argparse.Namespace, name: str, batch: int, duration: float, number: int
) -> PhaseSpec:
    devices = args.clients * args.devices
    # batch 1 cannot reach the rate of large batches; generate less for it
    guess = args.rate_guess if batch >= 10 else args.rate_guess / 4
    total = min(args.max_updates, int(guess * duration * 1.2) + devices * batch)
    tenant = f"bench-{name}"
    return PhaseSpec(
        name=name,
        tenant=tenant,
        batch=batch,
        duration_s=duration,
        items_per_device=max(batch, -(-total // devices)),
        devices=args.devices,
        clients=args.clients,
        open_tasks=args.open_tasks,
        edits=args.edits,
        use_json=args.json,
        urls=server.urls,
        token=mint(tenant),
        client_id_base=1_000_000 + number * 10_000,
        spread=args.spread,
    )


def run_ingest(server: Nodes, args: argparse.Namespace, run: Run) -> None:
    if args.warmup > 0:
        warm = run_phase(server, phase_spec(server, args, "warmup", 10, args.warmup, 0))
        run.rss_log["after warmup"] = server.rss_mb()
        print(f"warm-up: {warm.updates_per_s:.0f} upd/s (not reported)", flush=True)
    for number, batch in enumerate(args.batch_sizes, start=1):
        spec = phase_spec(server, args, f"b{batch}", batch, args.duration, number)
        profiler = None
        if args.profile and batch == args.profile_batch:
            suffix = profile_suffix(batch)
            # node 0 only, when there are several
            profiler = Profiler(server.pid, RESULTS_DIR / f"http_sync_profile{suffix}.txt")
        print(
            f"phase batch={batch}: {spec.clients} processes x {spec.devices} devices,"
            f" {spec.items_per_device} updates pre-generated per device",
            flush=True,
        )
        result = run_phase(server, spec, profiler)
        run.phases.append(result)
        run.rss_log[f"after batch {batch}"] = result.rss_mb_after
        print(
            f"  -> {result.updates_per_s:.0f} upd/s, p50 {result.latency_p50_ms:.1f} ms,"
            f" p99 {result.latency_p99_ms:.1f} ms,"
            f" server {result.server_cpu_us_per_update:.0f} µs/upd"
            f" (generation took {result.generation_s:.1f} s)",
            flush=True,
        )
        if profiler is not None:
            run.profile = summarize_profile(profiler.out, result.elapsed_s, profiler.rate, step_of)
            run.profile.update(batch=batch, raw=str(profiler.out))


def measure(server: Nodes, args: argparse.Namespace, run: Run) -> None:
    run.rss_log["start"] = server.rss_mb()
    source = args.server_src or "the installed fieldsync"
    print(f"{server.describe()}; code: {source}", flush=True)
    run_ingest(server, args, run)
    if not args.no_catchup:
        run.load, run.catchup = asyncio.run(run_catchup(server, args))
        run.rss_log["after catch-up"] = server.rss_mb()
    run.rss_log["peak (VmHWM)"] = server.peak_rss_mb()


def run_backend(args: argparse.Namespace, databases: Databases, backend: Backend) -> Run:
    """Every phase on `backend.nodes` fresh nodes on a fresh database of `databases`."""
    run = Run(backend, loadavg=loadavg())
    started = time.perf_counter()
    try:
        with running_nodes(databases, backend.nodes, args.server_src) as server:
            run.setup = f"{server.describe()}; {databases.describe()}"
            run.db_measured = server.db_pid is not None
            try:
                measure(server, args, run)
                run.http_error_answers = server.http_errors()
                run.multi_node = server.multi_node_counts()
            finally:
                run.log_problems = server.log_problems()
                server.stop()  # a clean shutdown before the log rows are counted
            run.failed |= check_durability(server, run.phases)
    except Exception as exc:  # noqa: BLE001 - reported; a comparison runs the other backends
        run.error = f"{type(exc).__name__}: {exc}"
        print(f"!! {backend.label}: {run.error}", flush=True)
    run.seconds = time.perf_counter() - started
    run.check()
    return run


def print_comparison(args: argparse.Namespace, runs: list[Run]) -> list[str]:
    print()
    return print_side_by_side(
        f"HTTP sync, side by side ({args.clients} load processes x {args.devices} devices,"
        f" {args.duration:.0f} s per batch size, devices spread by {args.spread};"
        f" code {args.code_version})",
        [r.backend.label for r in runs],
        comparison_rows(args, runs),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.loadavg = loadavg()
    args.code_version = code_version()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs, payloads = run_backends(
        args,
        lambda databases, backend: run_backend(args, databases, backend),
        lambda run: report(args, run),
    )
    payload = results_header(args)
    if args.compare:
        payload |= {"table": print_comparison(args, runs), "runs": payloads}
    else:
        payload |= payloads[0]
    failed = any(r.failed for r in runs)
    return finish(args.out, payload, failed, time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
