"""Noisy-neighbour benchmark: does one tenant flooding at 10x its quota slow another tenant?

What it measures
----------------
One real server (``fieldsync serve`` on a temporary SQLite file, 127.0.0.1, a port below 32768)
runs with explicit rate limits (``--device-limit/--user-limit/--tenant-limit``, passed as
``FIELDSYNC_RATE_*``; default 10, 20 and 50 per second), sized so the quiet tenant's load stays
under half of each: it must never see a 429. Before starting, the bench waits (at most
``--idle-wait`` s) for other processes to leave the machine idle.

1. **warm-up** (not reported): the quiet load alone for a moment.
2. **baseline**: tenant ``quiet`` alone. ``--quiet-devices`` devices (two per user) each send
   ``--quiet-rate`` requests/s on a fixed schedule (open loop, staggered): pushes of 10
   activity-record updates (creates, then edits of the same records: status, remarks,
   position) and, every ``--pull-every``-th request, a delta pull
   (``GET .../changes?cursor=...``). Every request's latency and send time are recorded.
3. **at-quota** (full runs; ``--no-control`` skips it): the same quiet load plus tenant
   ``noisy`` at exactly 1x its tenant quota: what the limits *allow* a neighbour to do.
4. **flood**: the same quiet load plus tenant ``noisy`` offering ``--flood-factor`` x its
   tenant quota from ``--noisy-procs`` processes. The offered load is spread over enough
   devices and users that each of them stays under its own device and user limit, so it is
   the *tenant* bucket that must refuse it. A noisy device resends a refused push at its next
   slot (it ignores Retry-After: that is what makes it noisy) and moves on after a 200. Like a
   sync client it waits for each answer before its next slot, and the server holds the 429 of
   a user back before its Retry-After (``FIELDSYNC_RATE_HOLD_S``; ``--rate-hold`` sets it, 0
   turns holding off), so it sends fewer requests than it aims at: the slots it skipped
   while waiting are counted. ``--flood-conns N`` lets each noisy device keep N requests in
   flight, sending at every slot while fewer are unanswered (a client that does not wait). Every
   429 is checked: a ``Retry-After`` header holding a positive integer, and the JSON error
   ``{"error": {"code": "rate_limited", "message", "details": {"scope", "retry_after"}}}``
   with ``details.retry_after`` equal to the header. flood minus at-quota = what refusing
   the excess costs the quiet tenant.
   Steps 2-4 are one round; ``--rounds`` (default 3) of them run, and each condition's
   quiet requests are pooled over its rounds: the goal is judged on pooled p99s, and each
   round's flood p99 over its own baseline's is printed as well (with their median).
   Interleaved rounds compare the conditions over the same stretch of time: on a shared
   VM one 30 s baseline's p99 has come out anywhere from 7 to 15 ms on the same code.
5. **after** (full runs): the quiet load alone again (the database and heap have grown).
6. **429 cost**, on a fresh server of its own with holding off (so the hammer's 429s come
   back to back): one device of tenant ``hammer`` sends pushes (the same 10-item bodies) as fast
   as ``--cost-conns`` connections allow, so nearly all are refused by its device bucket;
   server CPU seconds / refused requests = CPU per 429 (the few accepted pushes are charged
   at the baseline's CPU per quiet request and subtracted). Then the same again under
   py-spy (``--no-profile`` skips it) to show where a refusal's time goes. What a 429 costs
   *in the flood* is also given, per round: flood CPU minus at-quota CPU, over the
   refusals. It is 2-4x the hammer's figure: the flood's 429s arrive one at a time, each
   paying an event-loop wake-up and cold caches (a bare aiohttp handler answering 429
   costs ~360 µs a request that way on the 2-core VM, against ~120 µs back to back).

``--layout split`` (the default, on 2+ cores) pins the server to half the cores and the load
generators to the others, the flood's generators at nice +10: in production the flood comes
from other machines, and on one box its generators would otherwise take the cores the server
and the quiet tenant's client (the measuring instrument) need. ``--layout shared`` runs
everything on every core, as runs before this option did.

Unless ``--no-gc-trace``, the server's full (generation-2) and slow (>= 2 ms) garbage
collections are logged with their start times by a ``gc.callbacks`` hook (a sitecustomize module
on the server's PYTHONPATH; server code untouched), and every quiet request slower than 2x the
baseline p99 is attributed: sent in the phase's first second (a flood's burst), overlapping a
full GC, overlapping young GCs, or none of these. Unless ``--no-disk-probe``, a process of its
own fsyncs a block in the temporary directory (the filesystem of the database) every 20 ms
(``bench/disk_probe.py``): a flush of >= 50 ms there is a disk stall, which on a shared VM
comes now and then whatever the server does, and holds every commit behind it (one of 924
ms has been seen in a phase with no neighbour). Slow requests that overlapped one are
counted as such, and each ratio is also given for the requests clear of disk stalls.

Reading the output
------------------
``p50/p99 ms``: the quiet tenant's request latency (pushes and pulls together; client send to
last byte); ``p99 1s+``: of requests sent at least 1 s into the phase. The goal is pooled flood
p99 / pooled baseline p99 < 2. ``q cli wait``: ms the quiet load process spent runnable but
waiting for a core, per request (the instrument's own delay). ``offered/s``: noisy requests
sent per second; ``accepted/s``: of them answered 200; the tenant bucket lets through at most
quota x seconds + its size (it starts full: N for ``N/second``, a whole minute's N for
``N/minute``). ``full GCs``: count and longest
pause. ``srv CPU%``: share of ONE core the server used (``srv sys%``: of it, in the kernel);
``srv wait%``: time the server's threads were runnable but waiting for a core (the load
generators share the machine with the server); ``cli CPU%``: all load generators; ``oth CPU%``:
everything else the machine did (other processes, loopback softirq, VM steal). After the run,
the SQLite log rows of each tenant are counted: refused pushes must have stored nothing,
accepted ones everything; and the server's ``fieldsync_rate_limited_total`` counter must equal
the 429s the clients saw.

``python bench/noisy_neighbour.py --quick`` is a < 30 s smoke run (one round of baseline and
flood, few samples: its p99 is close to the maximum). Results:
``bench/results/noisy_neighbour.json`` (``--quick``: ``noisy_neighbour_quick.json``; ``--out``
to choose).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from common import (
    RESULTS_DIR,
    Column,
    CpuWindow,
    Profiler,
    Server,
    classify,
    code_version,
    finish,
    jsonable_settings,
    loadavg,
    machine_busy_seconds,
    machine_info,
    mint,
    own_cpu_seconds,
    percentiles,
    print_table,
    proc_runqueue_seconds,
    running_server,
    summarize_profile,
)
from disk_probe import DiskProbe, DiskStats, Flush, disk_stats, during_stall, overlap_ms
from http_sync import content_headers, device_updates, logged_rows_by_tenant, push_bodies

from server.ratelimit import Rate

DOMAIN = "activity"
QUIET, NOISY, HAMMER = "quiet", "noisy", "hammer"
BATCH = 10  # items per push
OPEN_TASKS = 10  # records a device creates before editing them
EDITS = 3  # edits per record after its creation
PULL_LIMIT = 500
CATCHUP_PAGES = 50
REQUEST_TIMEOUT_S = 30.0
MAX_429_EXAMPLES = 3
GOAL_RATIO = 2.0
FLOOD_NICE = 10
HOLD_ENV = "FIELDSYNC_RATE_HOLD_S"
MIN_IN_PLACE_PER_S = 200  # refusals a second below which their cost is not measured in place
POSITIVE_INT = re.compile(r"[1-9][0-9]{0,8}")

# ---------------------------------------------------------------------------------------
# what each load process does
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's per-device, per-user and per-tenant rates (a bucket holds `count`)."""

    device: Rate
    user: Rate
    tenant: Rate

    @classmethod
    def parse(cls, device: str, user: str, tenant: str) -> Limits:
        return cls(Rate.parse(device), Rate.parse(user), Rate.parse(tenant))

    def env(self) -> dict[str, str]:
        return {f"FIELDSYNC_RATE_{scope.upper()}": str(rate) for scope, rate in self.rates()}

    def rates(self) -> list[tuple[str, Rate]]:
        return [("device", self.device), ("user", self.user), ("tenant", self.tenant)]

    def __str__(self) -> str:
        return ", ".join(f"{scope} {rate}" for scope, rate in self.rates())


def per_s(rate: Rate) -> float:
    """A rate's sustained requests per second."""
    return float(rate.count / rate.period_s)


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    token: str
    client_id: int  # the pycrdt client id of its updates (one per device)
    offset_s: float  # when its first request is due, after the common start


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load-generator process: its devices and how they send."""

    role: str  # QUIET, NOISY or HAMMER (its tenant too)
    url: str
    duration_s: float
    devices: tuple[Device, ...]
    rate_per_device: float  # requests/s on a fixed schedule; 0: closed loop (HAMMER)
    pull_every: int  # every n-th request of a device is a pull; 0: pushes only
    pushes_per_device: int  # pre-generated push bodies per device
    connections: int = 1  # requests in flight per device (HAMMER: many)
    edits: int = EDITS  # edits per record after its creation (0: every item creates a record)
    nice: int = 0  # added to the process's nice value (the flood's generators, split layout)

    def max_requests(self) -> int:
        """A hard bound on one device's (one connection's) requests."""
        if self.rate_per_device > 0:
            return math.ceil(self.rate_per_device * self.duration_s * 1.5) + 10
        return 100_000


@dataclass(slots=True)
class LoadResult:
    """What one load process saw."""

    role: str
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    gen_s: float = 0.0
    push_ms: list[float] = field(default_factory=list)  # answered 200
    pull_ms: list[float] = field(default_factory=list)  # answered 200
    refused_ms: list[float] = field(default_factory=list)  # answered 429
    # (seconds after the start, ms, "push" | "pull" | "429") of every answered request
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    t0: float = 0.0  # the common start (perf_counter); 0 before it
    http: dict[str, int] = field(default_factory=dict)  # HTTP status -> count
    items: dict[str, int] = field(default_factory=dict)  # item status -> count (200 pushes)
    scopes: dict[str, int] = field(default_factory=dict)  # 429 details.scope -> count
    bad_429: int = 0
    bad_429_examples: list[str] = field(default_factory=list)
    pulled: int = 0
    late: int = 0  # slots skipped: the device was still waiting for answers (or was slow)
    runqueue_s: float = 0.0  # the process's time runnable but waiting for a core
    exhausted: int = 0  # devices that ran out of pre-generated bodies
    errors: int = 0
    first_error: str | None = None

    def fail(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message

    def mark(self, started: float, elapsed_ms: float, kind: str) -> None:
        """Note when an answered request was sent (after the start; not for the hammer)."""
        if self.t0 and self.role != HAMMER:
            self.timeline.append((round(started - self.t0, 4), round(elapsed_ms, 2), kind))

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def count_items(self, raw: bytes) -> None:
        for item in msgpack.unpackb(raw)["results"]:
            self.count(self.items, item["status"])

    def check_refusal(self, raw: bytes, retry_after: str | None, content_type: str) -> None:
        scope, problem = refusal_problem(raw, retry_after, content_type)
        self.count(self.scopes, scope)
        if problem is not None:
            self.bad_429 += 1
            if len(self.bad_429_examples) < MAX_429_EXAMPLES:
                self.bad_429_examples.append(problem)


def refusal_problem(
    raw: bytes, retry_after: str | None, content_type: str
) -> tuple[str, str | None]:
    """(scope, what is wrong with this 429, or None)."""
    if retry_after is None or POSITIVE_INT.fullmatch(retry_after) is None:
        return "?", f"Retry-After {retry_after!r} is not a positive integer"
    if content_type != "application/json":
        return "?", f"Content-Type {content_type!r}"
    try:
        error = json.loads(raw)["error"]
        code, message, details = error["code"], error["message"], error["details"]
        scope, seconds = details["scope"], details["retry_after"]
    except (ValueError, KeyError, TypeError):
        return "?", f"not the JSON error shape: {raw[:200]!r}"
    if code != "rate_limited" or not isinstance(message, str):
        return str(scope), f"code {code!r}, message {message!r}"
    if not isinstance(scope, str) or not scope:
        return "?", f"details.scope {scope!r} is not a name"
    if seconds != int(retry_after):
        return scope, f"details.retry_after {seconds!r} != Retry-After {retry_after}"
    return scope, None


# ---------------------------------------------------------------------------------------
# load processes
# ---------------------------------------------------------------------------------------

Bodies = list[tuple[bytes, int]]  # push bodies and their item counts


def device_bodies(spec: LoadSpec, device: Device) -> Bodies:
    """The device's push bodies: creates of OPEN_TASKS records, then `edits` rounds of edits."""
    n_items = spec.pushes_per_device * BATCH
    cid = device.client_id
    updates = device_updates(cid, cid, n_items, OPEN_TASKS, spec.edits)
    return push_bodies(updates, BATCH, use_json=False)


def worker_main(spec: LoadSpec, barrier: Any, results: Any) -> None:
    """One load process: generate bodies (untimed), get ready, wait for the start, send."""
    result = LoadResult(spec.role)
    if spec.nice:
        os.nice(spec.nice)
    try:
        started = time.perf_counter()
        plans = [device_bodies(spec, d) for d in spec.devices]
        result.gen_s = time.perf_counter() - started
        asyncio.run(drive(spec, plans, barrier, result))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        result.fail(f"worker crashed: {type(exc).__name__}: {exc}")
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
    results.put(asdict(result))


async def drive(spec: LoadSpec, plans: list[Bodies], barrier: Any, result: LoadResult) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sessions = [
        aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=spec.connections)
        )
        for _ in spec.devices
    ]
    try:
        cursor = await catch_up(sessions[0], spec) if spec.pull_every else None
        barrier.wait(timeout=600)  # blocks the loop: nothing else runs before the start
        cpu0, t0 = own_cpu_seconds(), time.perf_counter()
        waited0 = proc_runqueue_seconds(os.getpid())
        result.t0 = t0
        await asyncio.gather(*device_tasks(spec, sessions, plans, cursor, t0, result))
        result.elapsed_s = time.perf_counter() - t0
        result.cpu_s = own_cpu_seconds() - cpu0
        result.runqueue_s = proc_runqueue_seconds(os.getpid()) - waited0
    finally:
        for s in sessions:
            await s.close()


def device_tasks(
    spec: LoadSpec,
    sessions: list[aiohttp.ClientSession],
    plans: list[Bodies],
    cursor: str | None,
    t0: float,
    result: LoadResult,
) -> list[Any]:
    if spec.rate_per_device > 0:
        return [
            paced_device(s, spec, d, bodies, cursor, t0, result)
            for s, d, bodies in zip(sessions, spec.devices, plans)
        ]
    return [
        hammer_connection(sessions[0], spec, spec.devices[0], plans[0], n, t0, result)
        for n in range(spec.connections)
    ]


async def catch_up(session: aiohttp.ClientSession, spec: LoadSpec) -> str:
    """Pull (untimed, big pages, honouring Retry-After) to the head of the tenant's log: the
    cursor every device starts from."""
    cursor = ""
    device = spec.devices[0]
    for _ in range(CATCHUP_PAGES):
        status, retry_after, raw = await get_page(session, spec.url, device, cursor, 5000)
        if status == 429 and retry_after is not None and retry_after.isdigit():
            await asyncio.sleep(min(int(retry_after), 5))
            continue
        if status != 200:
            raise RuntimeError(f"catch-up pull answered HTTP {status}: {raw[:300]!r}")
        page = msgpack.unpackb(raw)
        cursor = str(page["cursor"])
        if not page["has_more"]:
            return cursor
    raise RuntimeError(f"catch-up did not reach the head in {CATCHUP_PAGES} requests")


async def paced_device(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    device: Device,
    bodies: Bodies,
    cursor: str | None,
    t0: float,
    result: LoadResult,
) -> None:
    """Send on a fixed schedule; a slot missed by more than an interval is skipped, not caught
    up in a burst. A push refused with 429 is resent at the next slot. A quiet device that runs
    out of bodies stops (a failure); a noisy one starts over (re-sends are still load).

    With one connection (`spec.connections`) a device waits for each answer before its next
    slot, as a sync client does; with more, it sends at each slot while fewer than that many
    of its requests are unanswered (a slot with all of them busy is skipped)."""
    interval = 1.0 / spec.rate_per_device
    deadline, due = t0 + spec.duration_s, t0 + device.offset_s
    sender = BodySender(session, spec, device, bodies, result)
    in_flight: set[asyncio.Task[bool]] = set()
    for n in range(spec.max_requests()):
        now = time.perf_counter()
        if due >= deadline:
            break  # the next slot is past the end: do not idle past it
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > interval:
            result.late += int((now - due) / interval)
            due = now
        due += interval
        if time.perf_counter() >= deadline:
            break
        if spec.pull_every and n % spec.pull_every == spec.pull_every - 1:
            page = await pull_page(session, spec.url, device, cursor, result)
            cursor = page["cursor"] if page is not None else cursor
            continue
        if not sender.has_body():
            break
        if spec.connections == 1:
            await sender.send()
        elif len(in_flight) < spec.connections:
            task = asyncio.create_task(sender.send())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        else:
            result.late += 1
    await asyncio.gather(*in_flight)


class BodySender:
    """A device's pushes in order: a body is resent until it is answered 200."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        spec: LoadSpec,
        device: Device,
        bodies: Bodies,
        result: LoadResult,
    ) -> None:
        self.session, self.spec, self.device = session, spec, device
        self.bodies, self.result = bodies, result
        self.next_body, self.wrapped = 0, False

    def has_body(self) -> bool:
        """False when a quiet device has run out of bodies (a noisy one starts over)."""
        if self.next_body >= len(self.bodies) and not self.wrapped:
            self.result.exhausted += 1
            if self.spec.role == QUIET:
                return False
            self.wrapped = True
        return True

    async def send(self) -> bool:
        sent = self.next_body
        body = self.bodies[sent % len(self.bodies)]
        ok = await push(self.session, self.spec.url, self.device, body, self.result)
        if ok and self.next_body == sent:
            self.next_body += 1
        return ok


async def hammer_connection(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    device: Device,
    bodies: Bodies,
    number: int,
    t0: float,
    result: LoadResult,
) -> None:
    """One of the hammer's connections: push back to back (closed loop) till the deadline."""
    deadline = t0 + spec.duration_s
    for n in range(spec.max_requests()):
        if time.perf_counter() >= deadline:
            return
        await push(session, spec.url, device, bodies[(number + n) % len(bodies)], result)


async def push(
    session: aiohttp.ClientSession,
    url: str,
    device: Device,
    body: tuple[bytes, int],
    result: LoadResult,
) -> bool:
    """One push; True if it was answered 200."""
    headers = content_headers(device.token, device.device_id, use_json=False)
    started = time.perf_counter()
    try:
        async with session.post(
            f"{url}/api/v1/sync/{DOMAIN}/sync", data=body[0], headers=headers
        ) as resp:
            raw = await resp.read()
            status, content_type = resp.status, resp.content_type
            retry_after = resp.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError) as exc:
        elapsed_s = time.perf_counter() - started
        result.fail(f"push failed after {elapsed_s:.2f} s, {started - result.t0:.2f} s in: {exc!r}")
        return False
    elapsed_ms = (time.perf_counter() - started) * 1000
    result.count(result.http, str(status))
    result.mark(started, elapsed_ms, "push" if status == 200 else str(status))
    if status == 200:
        result.push_ms.append(elapsed_ms)
        result.count_items(raw)
        return True
    if status == 429:
        result.refused_ms.append(elapsed_ms)
        result.check_refusal(raw, retry_after, content_type)
        return False
    result.fail(f"push answered HTTP {status}: {raw[:300]!r}")
    return False


async def get_page(
    session: aiohttp.ClientSession, url: str, device: Device, cursor: str | None, limit: int
) -> tuple[int, str | None, bytes]:
    """GET one page of changes from `cursor` ("": from the start): status, Retry-After, body."""
    headers = content_headers(device.token, device.device_id, use_json=False)
    params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
    async with session.get(
        f"{url}/api/v1/sync/{DOMAIN}/changes", params=params, headers=headers
    ) as resp:
        return resp.status, resp.headers.get("Retry-After"), await resp.read()


async def pull_page(
    session: aiohttp.ClientSession,
    url: str,
    device: Device,
    cursor: str | None,
    result: LoadResult,
) -> dict[str, Any] | None:
    """One timed delta pull from `cursor`; the decoded page, None on failure."""
    started = time.perf_counter()
    try:
        status, _, raw = await get_page(session, url, device, cursor, PULL_LIMIT)
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.fail(f"pull failed: {exc!r}")
        return None
    elapsed_ms = (time.perf_counter() - started) * 1000
    result.count(result.http, str(status))
    if status != 200:
        result.fail(f"pull answered HTTP {status}: {raw[:300]!r}")
        return None
    page: dict[str, Any] = msgpack.unpackb(raw)
    result.mark(started, elapsed_ms, "pull")
    result.pull_ms.append(elapsed_ms)
    result.pulled += len(page["changes"])
    return page


# ---------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class PhaseRun:
    name: str
    results: list[LoadResult]
    cpu: CpuWindow
    rss_mb: float

    def of(self, role: str) -> list[LoadResult]:
        return [r for r in self.results if r.role == role]


def run_phase(
    server: Server, name: str, specs: Sequence[LoadSpec], profiler: Profiler | None = None
) -> PhaseRun:
    """Start the load processes, release them together, wait for their results."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(specs) + 1), ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(spec, barrier, queue), daemon=True) for spec in specs
    ]
    for p in procs:
        p.start()
    duration = max(s.duration_s for s in specs)
    try:
        wait_ready(barrier, queue)
        if profiler is not None:
            profiler.start()
        window = CpuWindow(server.pid).start()
        raw = [queue.get(timeout=duration + REQUEST_TIMEOUT_S + 60) for _ in procs]
        window.stop()
    finally:
        if profiler is not None:
            profiler.stop()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return PhaseRun(name, [LoadResult(**r) for r in raw], window, server.rss_mb())


def wait_ready(barrier: Any, queue: Any) -> None:
    """Wait until every load process has generated its bodies (they all start together)."""
    try:
        barrier.wait(timeout=600)
    except threading.BrokenBarrierError:
        errors = [queue.get(timeout=5).get("first_error") for _ in range(queue.qsize())]
        raise RuntimeError(f"a load process failed before the start: {errors}") from None


def quiet_spec(args: argparse.Namespace, url: str, duration: float, phase: int) -> LoadSpec:
    """Two devices per user; their first requests staggered over one interval."""
    interval = 1.0 / args.quiet_rate
    devices = tuple(
        Device(
            device_id=f"quiet-p{phase}-dev-{i}",
            token=mint(QUIET, user=f"quiet-user-{i // 2}"),
            client_id=2_000_000 + phase * 10_000 + i,
            offset_s=interval * i / args.quiet_devices,
        )
        for i in range(args.quiet_devices)
    )
    push_share = 1 - 1 / args.pull_every if args.pull_every else 1.0
    pushes = math.ceil(args.quiet_rate * duration * push_share * 1.2) + 5
    return LoadSpec(QUIET, url, duration, devices, args.quiet_rate, args.pull_every, pushes)


def noisy_specs(
    args: argparse.Namespace, url: str, duration: float, phase: int, factor: float
) -> list[LoadSpec]:
    """`factor` x the tenant quota, over `noisy_devices` devices (two per user)."""
    total, per_proc = args.noisy_devices, args.noisy_devices // args.noisy_procs
    quota = per_s(args.limits.tenant)
    rate = factor * quota / total
    interval = 1.0 / rate
    # a device is accepted only its share of the quota; resent pushes do not need new bodies
    pushes = math.ceil((args.limits.tenant.count + quota * duration) / total * 1.5) + 5
    specs = []
    for proc in range(args.noisy_procs):
        devices = tuple(
            Device(
                device_id=f"noisy-p{phase}-dev-{i}",
                token=mint(NOISY, user=f"noisy-user-{i // 2}"),
                client_id=3_000_000 + phase * 10_000 + i,
                offset_s=interval * i / total,
            )
            for i in range(proc * per_proc, (proc + 1) * per_proc)
        )
        nice = FLOOD_NICE if args.layout == "split" else 0
        specs.append(
            LoadSpec(NOISY, url, duration, devices, rate, 0, pushes, args.flood_conns, nice=nice)
        )
    return specs


def hammer_spec(args: argparse.Namespace, url: str, phase: int) -> LoadSpec:
    """One device, many connections, closed loop: nearly every push is refused."""
    token = mint(HAMMER, user=f"hammer-{phase}")
    device = Device(f"hammer-dev-{phase}", token, 4_000_000 + phase, 0.0)
    return LoadSpec(HAMMER, url, args.cost_duration, (device,), 0, 0, 40, args.cost_conns, 0)


# ---------------------------------------------------------------------------------------
# the server's garbage collector (a gc.callbacks hook, loaded by sitecustomize)
# ---------------------------------------------------------------------------------------

GC_LOG_ENV = "FIELDSYNC_BENCH_GC_LOG"
GC_HOOK = '''"""Bench only (bench/noisy_neighbour.py): log the server's full and slow GCs."""
import gc
import os
import time

_path = os.environ.get("FIELDSYNC_BENCH_GC_LOG")
if _path:
    _log = open(_path, "a", buffering=1)
    _started = [0.0]

    def _trace(phase, info):
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        if info["generation"] == 2 or ms >= 2:
            _log.write(f"{_started[0]:.6f} {info['generation']} {ms:.3f}\\n")

    gc.callbacks.append(_trace)
'''


@dataclass(frozen=True, slots=True)
class GcPause:
    start: float  # perf_counter: CLOCK_MONOTONIC, the same clock in every process
    generation: int
    ms: float

    def overlap_ms(self, start: float, ms: float) -> float:
        """How long this pause overlapped [start, start + ms)."""
        return overlap_ms(start, ms, self.start, self.ms)


class GcTrace:
    """Makes the server log every full (generation 2) and every >= 2 ms collection, with when
    it started, through a sitecustomize module on its PYTHONPATH. Server code is untouched."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "gc.log"
        (folder / "sitecustomize.py").write_text(GC_HOOK)

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(self.folder), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path, GC_LOG_ENV: str(self.log)}

    def pauses(self, start: float, end: float) -> list[GcPause]:
        """The logged collections that started in [start, end]."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                pause = GcPause(float(parts[0]), int(parts[1]), float(parts[2]))
                if start <= pause.start <= end:
                    out.append(pause)
        return out


@dataclass(slots=True)
class GcStats:
    full: int  # generation-2 collections
    full_max_ms: float
    full_total_ms: float
    slow_young: int  # generation 0/1 collections of >= 2 ms
    slow_young_max_ms: float


@dataclass(frozen=True, slots=True)
class Tracers:
    gc: GcTrace | None
    disk: DiskProbe | None

    def seen(self, start: float, end: float) -> Disturbances:
        return Disturbances(
            self.gc.pauses(start, end) if self.gc else (),
            self.disk.flushes(start, end) if self.disk else (),
        )


@dataclass(frozen=True, slots=True)
class Disturbances:
    """What the server's GC and the machine's disk did during one phase."""

    pauses: Sequence[GcPause] = ()
    flushes: Sequence[Flush] = ()  # the disk probe's slow flushes

    def disk_stall(self, start: float, ms: float) -> bool:
        return during_stall(start, ms, self.flushes)

    @classmethod
    def joined(cls, parts: Sequence[Disturbances]) -> Disturbances:
        """Several phases' disturbances (their times are absolute, so they stay apart)."""
        return cls(
            tuple(p for d in parts for p in d.pauses), tuple(f for d in parts for f in d.flushes)
        )


def gc_stats(pauses: Sequence[GcPause]) -> GcStats:
    full = [p for p in pauses if p.generation == 2]
    young = [p.ms for p in pauses if p.generation < 2]
    return GcStats(
        full=len(full),
        full_max_ms=max((p.ms for p in full), default=0.0),
        full_total_ms=sum(p.ms for p in full),
        slow_young=len(young),
        slow_young_max_ms=max(young, default=0.0),
    )


# ---------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------

SETTLE_S = 1.0  # "p99 after 1 s": requests sent at least this long after the phase started
SLOWEST = 5


def merged_counts(results: Sequence[LoadResult], name: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for r in results:
        out.update(getattr(r, name))
    return dict(out)


@dataclass(slots=True)
class SlowRequests:
    """Quiet requests slower than `over_ms` (GOAL_RATIO x the baseline p99), by likely cause:
    sent in the phase's first second (a flood's burst), overlapping a disk stall, a server
    full GC or young GCs of >= 2 ms, or none of these."""

    over_ms: float
    count: int
    first_second: int
    disk_stall: int
    full_gc: int
    young_gc: int
    other: int


def slow_requests(
    results: Sequence[LoadResult], seen: Disturbances, over_ms: float
) -> SlowRequests:
    causes: Counter[str] = Counter()
    for r in results:
        for t, ms, _ in r.timeline:
            if ms > over_ms:
                causes[slow_cause(r.t0 + t, t, ms, seen)] += 1
    return SlowRequests(
        over_ms=over_ms,
        count=sum(causes.values()),
        first_second=causes["first_second"],
        disk_stall=causes["disk_stall"],
        full_gc=causes["full_gc"],
        young_gc=causes["young_gc"],
        other=causes["other"],
    )


def slow_cause(start: float, t: float, ms: float, seen: Disturbances) -> str:
    if t < SETTLE_S:
        return "first_second"
    if seen.disk_stall(start, ms):
        return "disk_stall"
    if any(p.generation == 2 and p.overlap_ms(start, ms) > 0 for p in seen.pauses):
        return "full_gc"
    if any(p.generation < 2 and p.overlap_ms(start, ms) > 0 for p in seen.pauses):
        return "young_gc"
    return "other"


@dataclass(slots=True)
class QuietStats:
    requests: int
    pushes: int
    pulls: int
    per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p99_after_1s_ms: float  # requests sent >= SETTLE_S after the start (the flood's burst over)
    p99_clear_ms: float  # requests that overlapped no disk stall
    max_ms: float
    push_p99_ms: float
    pull_p99_ms: float
    slowest: list[dict[str, Any]]  # t (s after start), ms, kind, gc_ms, disk_stall
    slow: SlowRequests
    http: dict[str, int]
    items: dict[str, int]
    refused: int
    late: int
    exhausted: int
    errors: int
    first_error: str | None
    client_wait_ms: float  # the quiet load process's run-queue wait per request


def slowest_requests(results: Sequence[LoadResult], seen: Disturbances) -> list[dict[str, Any]]:
    """The slowest answered requests, with how much of each a server GC pause overlapped and
    whether a disk stall did."""
    entries = [(r.t0 + t, t, ms, kind) for r in results for t, ms, kind in r.timeline]
    entries.sort(key=lambda e: -e[2])
    return [
        {
            "t_s": round(t, 3),
            "ms": ms,
            "kind": kind,
            "gc_ms": round(sum(p.overlap_ms(start, ms) for p in seen.pauses), 1),
            "disk_stall": seen.disk_stall(start, ms),
        }
        for start, t, ms, kind in entries[:SLOWEST]
    ]


def quiet_stats(
    results: Sequence[LoadResult], seen: Disturbances, slow_ms: float | None
) -> QuietStats:
    """`slow_ms`: the latency over which requests are counted as slow (None: GOAL_RATIO x this
    phase's own p99)."""
    push_ms = [x for r in results for x in r.push_ms]
    pull_ms = [x for r in results for x in r.pull_ms]
    settled = [ms for r in results for t, ms, kind in r.timeline if t >= SETTLE_S]
    clear = [ms for r in results for t, ms, _ in r.timeline if not seen.disk_stall(r.t0 + t, ms)]
    p50, p90, p99, top = percentiles(push_ms + pull_ms, (0.5, 0.9, 0.99, 1.0))
    elapsed = max((r.elapsed_s for r in results), default=0.0)
    http = merged_counts(results, "http")
    return QuietStats(
        requests=sum(http.values()),
        pushes=len(push_ms),
        pulls=len(pull_ms),
        per_s=sum(http.values()) / elapsed if elapsed else 0.0,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        p99_after_1s_ms=percentiles(settled, (0.99,))[0],
        p99_clear_ms=percentiles(clear, (0.99,))[0],
        max_ms=top,
        push_p99_ms=percentiles(push_ms, (0.99,))[0],
        pull_p99_ms=percentiles(pull_ms, (0.99,))[0],
        slowest=slowest_requests(results, seen),
        slow=slow_requests(results, seen, slow_ms or GOAL_RATIO * p99),
        http=http,
        items=merged_counts(results, "items"),
        refused=http.get("429", 0),
        late=sum(r.late for r in results),
        exhausted=sum(r.exhausted for r in results),
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), None),
        client_wait_ms=sum(r.runqueue_s for r in results) * 1000 / max(sum(http.values()), 1),
    )


@dataclass(slots=True)
class FloodStats:
    factor: float  # offered load the noisy tenant aimed at, in multiples of its quota
    quota_per_s: float
    burst: int  # the tenant bucket's size: let through at once when the flood starts
    sent: int
    offered_per_s: float
    accepted: int
    accepted_per_s: float
    accepted_first_s: int  # 200s for pushes sent in the first second
    allowed_max: int  # quota x seconds + burst (the bucket starts full)
    refused: int
    refused_per_s: float
    scopes: dict[str, int]
    bad_429: int
    bad_429_examples: list[str]
    http: dict[str, int]
    items: dict[str, int]
    refused_p50_ms: float
    refused_p99_ms: float
    accepted_p99_ms: float
    late: int
    exhausted: int
    errors: int
    first_error: str | None
    elapsed_s: float


def flood_stats(results: Sequence[LoadResult], tenant: Rate, factor: float) -> FloodStats:
    quota = per_s(tenant)
    elapsed = max((r.elapsed_s for r in results), default=0.0)
    http = merged_counts(results, "http")
    sent, accepted, refused = sum(http.values()), http.get("200", 0), http.get("429", 0)
    refused_ms = [x for r in results for x in r.refused_ms]
    ok_ms = [x for r in results for x in r.push_ms]
    first_s = sum(1 for r in results for t, _, kind in r.timeline if kind == "push" and t < 1)
    return FloodStats(
        factor=factor,
        quota_per_s=quota,
        burst=tenant.count,
        sent=sent,
        offered_per_s=sent / elapsed if elapsed else 0.0,
        accepted=accepted,
        accepted_per_s=accepted / elapsed if elapsed else 0.0,
        accepted_first_s=first_s,
        allowed_max=math.floor(quota * elapsed) + tenant.count,
        refused=refused,
        refused_per_s=refused / elapsed if elapsed else 0.0,
        scopes=merged_counts(results, "scopes"),
        bad_429=sum(r.bad_429 for r in results),
        bad_429_examples=[e for r in results for e in r.bad_429_examples][:MAX_429_EXAMPLES],
        http=http,
        items=merged_counts(results, "items"),
        refused_p50_ms=percentiles(refused_ms, (0.5,))[0],
        refused_p99_ms=percentiles(refused_ms, (0.99,))[0],
        accepted_p99_ms=percentiles(ok_ms, (0.99,))[0],
        late=sum(r.late for r in results),
        exhausted=sum(r.exhausted for r in results),
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), None),
        elapsed_s=elapsed,
    )


@dataclass(slots=True)
class PhaseReport:
    name: str  # the condition, and its round when there are several ("flood 2")
    condition: str  # baseline, at-quota, flood or after
    round: int
    quiet: QuietStats | None
    noisy: FloodStats | None
    gc: GcStats | None
    disk: DiskStats | None
    wall_s: float
    server_cpu_s: float
    server_cpu_pct: float
    server_sys_pct: float  # of server_cpu_pct, in the kernel (socket syscalls, fsync)
    server_wait_pct: float
    client_cpu_pct: float
    other_cpu_pct: float
    rss_mb: float


def phase_report(
    run: PhaseRun,
    step: PhaseStep,
    tenant: Rate,
    tracers: Tracers,
    seen: Disturbances,
    slow_ms: float | None,
) -> PhaseReport:
    window = run.cpu
    quiet, noisy = run.of(QUIET), run.of(NOISY)
    client_cpu_s = sum(r.cpu_s for r in run.results)
    wall = window.wall_s
    return PhaseReport(
        name=run.name,
        condition=step.condition,
        round=step.round,
        quiet=quiet_stats(quiet, seen, slow_ms) if quiet else None,
        noisy=flood_stats(noisy, tenant, step.factor) if noisy else None,
        gc=gc_stats(seen.pauses) if tracers.gc else None,
        disk=disk_stats(seen.flushes) if tracers.disk else None,
        wall_s=wall,
        server_cpu_s=window.server_s,
        server_cpu_pct=window.server_pct,
        server_sys_pct=window.server_sys_s / wall * 100 if wall else 0.0,
        server_wait_pct=window.server_wait_pct,
        client_cpu_pct=client_cpu_s / wall * 100 if wall else 0.0,
        other_cpu_pct=window.others_pct(client_cpu_s),
        rss_mb=run.rss_mb,
    )


@dataclass(slots=True)
class RefusalCost:
    """Server CPU per refused push, from a phase where (nearly) every push is refused."""

    wall_s: float
    requests: int
    refused: int
    accepted: int
    per_s: float
    server_cpu_s: float
    server_cpu_pct: float
    client_cpu_pct: float
    us_per_request: float  # all server CPU / all requests
    us_per_accepted: float  # charged for each accepted push (the baseline's CPU per request)
    us_per_429: float  # (server CPU - accepted x us_per_accepted) / refused
    scopes: dict[str, int]
    bad_429: int
    refused_p50_ms: float


def refusal_cost(run: PhaseRun, us_per_accepted: float) -> RefusalCost:
    results = run.of(HAMMER)
    http = merged_counts(results, "http")
    requests, refused, accepted = sum(http.values()), http.get("429", 0), http.get("200", 0)
    cpu_s, wall = run.cpu.server_s, run.cpu.wall_s
    refused_cpu_s = max(0.0, cpu_s - accepted * us_per_accepted / 1e6)
    client_cpu_s = sum(r.cpu_s for r in results)
    return RefusalCost(
        wall_s=wall,
        requests=requests,
        refused=refused,
        accepted=accepted,
        per_s=requests / wall if wall else 0.0,
        server_cpu_s=cpu_s,
        server_cpu_pct=run.cpu.server_pct,
        client_cpu_pct=client_cpu_s / wall * 100 if wall else 0.0,
        us_per_request=cpu_s / requests * 1e6 if requests else 0.0,
        us_per_accepted=us_per_accepted,
        us_per_429=refused_cpu_s / refused * 1e6 if refused else 0.0,
        scopes=merged_counts(results, "scopes"),
        bad_429=sum(r.bad_429 for r in results),
        refused_p50_ms=percentiles([x for r in results for x in r.refused_ms], (0.5,))[0],
    )


# ---------------------------------------------------------------------------------------
# where a refusal's time goes (py-spy)
# ---------------------------------------------------------------------------------------

SQLITE_THREADS = "sqlite (aiosqlite threads)"
# The innermost matching frame decides.
REFUSAL_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prometheus counters (rate_limited, http_errors)", ("prometheus_client",)),
    (
        "auth: bearer_token + TokenVerifier (cache hit)",
        ("authenticate", "TokenVerifier", "bearer_token", "(jwt/"),
    ),
    ("Device-Id check", ("device_id (server/auth",)),
    ("rate limiter: Buckets / RateLimiter.check", ("(server/ratelimit",)),
    (
        "error answer: json.dumps + web.Response",
        ("error_response", "error_body", "ApiError", "(json/"),
    ),
    ("Services.limit (raise ApiError)", ("Services.limit",)),
    ("middleware json_errors", ("(server/http_errors",)),
    ("push handler (other)", ("(server/sync_api", "(server/services")),
    (
        "quick refusal: read the head, write the 429",
        ("(server/quick_refusals", "(server/serving", "(server/handshake"),
    ),
    (
        "push accepted: pipeline, storage, codec",
        ("(server/pipeline", "(storage/", "(crdt_models/", "(server/codec", "(server/"),
    ),
    (
        "aiohttp: parse request, discard body, write answer",
        ("(aiohttp/", "(multidict", "(yarl", "(propcache"),
    ),
    ("asyncio loop + socket syscalls", ("(asyncio/", "(selectors", "(socket")),
)


def step_of(frames: list[str], thread: str) -> str:
    return classify(frames, (REFUSAL_STEPS,)) if "MainThread" in thread else SQLITE_THREADS


# ---------------------------------------------------------------------------------------
# checks after the run
# ---------------------------------------------------------------------------------------


def metrics_text(server: Server) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def rate_limited_metric(server: Server) -> dict[str, float]:
    """The server's fieldsync_rate_limited_total by scope."""
    text = metrics_text(server)
    found = re.findall(r'^fieldsync_rate_limited_total\{scope="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {scope: float(value) for scope, value in found}


def counter_metric(server: Server, name: str) -> int:
    """An unlabelled counter of the server's, e.g. fieldsync_rate_limited_held_total."""
    text = metrics_text(server)
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


@dataclass(slots=True)
class Checks:
    problems: list[str] = field(default_factory=list)  # the run failed
    warnings: list[str] = field(default_factory=list)  # worth a look, not a failure

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def note(self, ok: bool, warning: str) -> None:
        if not ok:
            self.warnings.append(warning)


def check_quiet(name: str, q: QuietStats, checks: Checks) -> None:
    checks.expect(q.refused == 0, f"{name}: the quiet tenant got {q.refused} 429s")
    checks.expect(q.errors == 0, f"{name}: quiet errors ({q.errors}): {q.first_error}")
    checks.expect(q.exhausted == 0, f"{name}: {q.exhausted} quiet devices ran out of bodies")
    bad = {k: v for k, v in q.items.items() if k not in ("created", "merged")}
    checks.expect(not bad, f"{name}: quiet items not created/merged: {bad}")
    checks.note(q.late == 0, f"{name}: {q.late} quiet requests were over a slot late")


def check_flood(name: str, n: FloodStats, checks: Checks) -> None:
    checks.expect(n.errors == 0, f"{name}: noisy errors ({n.errors}): {n.first_error}")
    checks.expect(n.bad_429 == 0, f"{name}: {n.bad_429} malformed 429s: {n.bad_429_examples}")
    checks.expect(
        n.accepted <= n.allowed_max * 1.01 + 2,
        f"{name}: the noisy tenant got {n.accepted} pushes through; its bucket allows"
        f" {n.allowed_max} in {n.elapsed_s:.1f} s",
    )
    other = {k: v for k, v in n.scopes.items() if k != "tenant"}
    checks.note(not other, f"{name}: noisy 429s not from the tenant bucket: {other}")
    target = n.factor * n.quota_per_s
    checks.note(
        n.offered_per_s >= 0.9 * target,
        f"{name}: the noisy tenant sent {n.offered_per_s:.0f}/s of the {target:.0f}/s it aimed"
        f" at; {n.late} slots were skipped while its devices waited for answers (the server"
        " holds the 429 of a client back before its Retry-After; --flood-conns N keeps N"
        " requests of a device in flight)",
    )


def check_phase(p: PhaseReport, checks: Checks) -> None:
    if p.quiet is not None:
        check_quiet(p.name, p.quiet, checks)
    if p.noisy is not None:
        check_flood(p.name, p.noisy, checks)
    checks.note(
        p.other_cpu_pct < 10,
        f"{p.name}: other processes used {p.other_cpu_pct:.0f}% of a core (numbers disturbed)",
    )
    if p.disk is not None:
        checks.note(
            p.disk.stalls == 0,
            f"{p.name}: the disk stalled {p.disk.stalls} times, a flush of up to"
            f" {p.disk.max_ms:.0f} ms (numbers disturbed)",
        )


def check_metrics(seen: dict[str, int], metric: dict[str, float], checks: Checks) -> None:
    for scope in sorted(set(seen) | set(metric)):
        checks.expect(
            int(metric.get(scope, 0)) == seen.get(scope, 0),
            f"fieldsync_rate_limited_total{{scope={scope}}} is {metric.get(scope, 0):.0f};"
            f" the clients saw {seen.get(scope, 0)} such 429s",
        )


def check_log_rows(db: Path, acked: dict[str, int], checks: Checks) -> dict[str, int]:
    """Every acked item is in the log, and refused pushes left nothing (rows ~ acked items)."""
    logged = logged_rows_by_tenant(db)
    for tenant, n in acked.items():
        rows = logged.get(tenant, 0)
        checks.expect(rows >= n, f"tenant {tenant}: {n} items acked but {rows} log rows")
        checks.note(
            rows <= n * 1.2 + 10,
            f"tenant {tenant}: {rows} log rows for {n} acked items (refused pushes stored?)",
        )
    return logged


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

PHASE_COLUMNS = (
    Column("phase", 10, left=True),
    Column("quiet req", 9),
    Column("p50 ms", 7, ".1f"),
    Column("p99 ms", 7, ".1f"),
    Column("p99 1s+", 7, ".1f"),
    Column("max ms", 7, ".1f"),
    Column("q 429", 5),
    Column("q cli wait", 10, ".2f"),
    Column("offered/s", 9),
    Column("accepted/s", 10),
    Column("quota/s", 7),
    Column("429s", 6),
    Column("full GCs", 12),
    Column("srv CPU%", 8, ".0f", "%"),
    Column("srv sys%", 8, ".0f", "%"),
    Column("srv wait%", 9, ".0f", "%"),
    Column("cli CPU%", 8, ".0f", "%"),
    Column("oth CPU%", 8, ".0f", "%"),
    Column("RSS MB", 6, ".0f"),
)


def phase_row(p: PhaseReport) -> tuple[Any, ...]:
    q, n = p.quiet, p.noisy
    quiet = (
        (q.requests, q.p50_ms, q.p99_ms, q.p99_after_1s_ms, q.max_ms, q.refused, q.client_wait_ms)
        if q
        else ("-",) * 7
    )
    noisy = (
        (
            f"{n.offered_per_s:.0f}",
            f"{n.accepted_per_s:.1f}",
            f"{n.quota_per_s:g}",
            str(n.refused),
        )
        if n
        else ("-",) * 4
    )
    gc = f"{p.gc.full} max {p.gc.full_max_ms:.0f}ms" if p.gc else "-"
    cpu = (
        p.server_cpu_pct,
        p.server_sys_pct,
        p.server_wait_pct,
        p.client_cpu_pct,
        p.other_cpu_pct,
        p.rss_mb,
    )
    return (p.name, *quiet, *noisy, gc, *cpu)


def verdict(phases: Sequence[PhaseReport], pooled: dict[str, QuietStats]) -> dict[str, Any]:
    """The goal (flood p99 / baseline p99 < GOAL_RATIO, each pooled over its rounds), each
    condition's pooled ratios, and the flood's ratio in each round (to its own baseline)."""
    base = pooled["baseline"]
    ratios = {c: quiet_ratios(base, q) for c, q in pooled.items() if c != "baseline"}
    flood = ratios["flood"]
    round_ratios = round_p99_ratios(phases, "flood")
    return {
        "goal": f"quiet p99 under the flood < {GOAL_RATIO:g}x its baseline p99",
        "rounds": len(round_ratios),
        "baseline_requests": base.requests,
        "baseline_p50_ms": base.p50_ms,
        "baseline_p99_ms": base.p99_ms,
        "flood_p50_ms": flood["p50_ms"],
        "flood_p99_ms": flood["p99_ms"],
        "p99_ratio": flood["p99_ratio"],
        "met": flood["p99_ratio"] < GOAL_RATIO,
        "p99_clear_ratio": flood["p99_clear_ratio"],
        "flood_p99_ratio_by_round": round_ratios,
        "flood_p99_ratio_median": statistics.median(round_ratios) if round_ratios else None,
        "disk_stalls": {p.name: p.disk.stalls for p in phases if p.disk is not None},
        "ratios_by_condition": ratios,
    }


def round_p99_ratios(phases: Sequence[PhaseReport], condition: str) -> list[float]:
    """Per round: the condition's quiet p99 over that round's baseline p99."""
    base = {p.round: p.quiet for p in phases if p.condition == "baseline"}
    return [
        round(q.p99_ms / b.p99_ms, 2)
        for p in phases
        if p.condition == condition
        and (q := p.quiet) is not None
        and (b := base.get(p.round)) is not None
        and b.p99_ms
    ]


def quiet_ratios(base: QuietStats, q: QuietStats) -> dict[str, float]:
    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else math.inf

    return {
        "p50_ms": q.p50_ms,
        "p99_ms": q.p99_ms,
        "p50_ratio": ratio(q.p50_ms, base.p50_ms),
        "p99_ratio": ratio(q.p99_ms, base.p99_ms),
        "p99_after_1s_ratio": ratio(q.p99_after_1s_ms, base.p99_after_1s_ms),
        "p99_clear_ratio": ratio(q.p99_clear_ms, base.p99_clear_ms),
    }


def print_summary(phases: Sequence[PhaseReport], goal: dict[str, Any]) -> None:
    print(
        f"\nquiet latency against the baseline, each condition pooled over its"
        f" {goal['rounds']} round(s) (baseline: {goal['baseline_requests']} requests, p50"
        f" {goal['baseline_p50_ms']:.1f} ms, p99 {goal['baseline_p99_ms']:.1f} ms):"
    )
    probed = bool(goal["disk_stalls"])
    for name, r in goal["ratios_by_condition"].items():
        clear = f"; clear of disk stalls: {r['p99_clear_ratio']:.2f}x" if probed else ""
        print(
            f"  {name:<8} p50 {r['p50_ms']:.1f} ms = {r['p50_ratio']:.2f}x, p99"
            f" {r['p99_ms']:.1f} ms = {r['p99_ratio']:.2f}x (p99 of requests sent after the"
            f" first second: {r['p99_after_1s_ratio']:.2f}x{clear})"
        )
    print(f"GOAL {goal['goal']}: {'met' if goal['met'] else 'NOT met'} ({goal['p99_ratio']:.2f}x)")
    if goal["rounds"] > 1:
        by_round = ", ".join(f"{r:.2f}x" for r in goal["flood_p99_ratio_by_round"])
        print(
            f"  each round's flood p99 over its own baseline's: {by_round} (median"
            f" {goal['flood_p99_ratio_median']:.2f}x)"
        )
    stalled = [f"{n} in {name}" for name, n in goal["disk_stalls"].items() if n]
    if stalled:
        print(
            f"  disturbed by disk stalls ({', '.join(stalled)}); of the requests clear of them:"
            f" {goal['p99_clear_ratio']:.2f}x"
        )
    for p in phases:
        if p.noisy is not None:
            print_noisy(p.name, p.noisy)
    print("\nslow quiet requests (over 2x the baseline p99) and what they overlapped:")
    for p in phases:
        if p.quiet is not None:
            sl = p.quiet.slow
            print(
                f"  {p.name:<10} {sl.count} over {sl.over_ms:.0f} ms: {sl.first_second} in the"
                f" first second, {sl.disk_stall} during a disk stall, {sl.full_gc} during a full"
                f" GC, {sl.young_gc} during young GCs >= 2 ms, {sl.other} other"
            )
            print("             slowest: " + slowest_text(p.quiet.slowest))


def print_noisy(name: str, n: FloodStats) -> None:
    print(
        f"noisy, {name}: offered {n.offered_per_s:.0f} req/s"
        f" ({n.offered_per_s / n.quota_per_s:.1f}x its quota of {n.quota_per_s:g}/s), accepted"
        f" {n.accepted} = {n.accepted_per_s:.1f}/s (at most {n.allowed_max} allowed in"
        f" {n.elapsed_s:.1f} s; {n.accepted_first_s} in the first second: the bucket's burst"
        f" of {n.burst} + refill)"
    )
    print(
        f"  refused {n.refused} (scopes {n.scopes}), malformed 429s (Retry-After, JSON error"
        f" shape): {n.bad_429}; latency: 429 p50 {n.refused_p50_ms:.1f} ms, p99"
        f" {n.refused_p99_ms:.1f} ms; accepted push p99 {n.accepted_p99_ms:.1f} ms"
    )


def slowest_text(slowest: Sequence[dict[str, Any]]) -> str:
    return ", ".join(
        f"{s['ms']:.0f} ms {s['kind']} at {s['t_s']:.2f} s"
        + (f" (GC {s['gc_ms']:.0f} ms)" if s["gc_ms"] else "")
        + (" (disk stall)" if s["disk_stall"] else "")
        for s in slowest
    )


def print_by_phase(title: str, lines: Sequence[tuple[str, str]]) -> None:
    if lines:
        print(f"\n{title}:")
        for name, text in lines:
            print(f"  {name:<10} {text}")


def print_gc(phases: Sequence[PhaseReport]) -> None:
    print_by_phase(
        "server garbage collection (a gc.callbacks hook via sitecustomize)",
        [
            (
                p.name,
                f"{g.full} full collections (max {g.full_max_ms:.0f} ms, total"
                f" {g.full_total_ms:.0f} ms); {g.slow_young} young ones >= 2 ms"
                f" (max {g.slow_young_max_ms:.0f} ms)",
            )
            for p in phases
            if (g := p.gc) is not None
        ],
    )


def print_disk(phases: Sequence[PhaseReport]) -> None:
    print_by_phase(
        "disk (an fsync of 4 KiB beside the database every 20 ms, by a process of its own)",
        [
            (
                p.name,
                f"{d.slow} flushes >= 10 ms, {d.stalls} stalls >= 50 ms (longest"
                f" {d.max_ms:.0f} ms)",
            )
            for p in phases
            if (d := p.disk) is not None
        ],
    )


def in_flood_refusal_us(phases: Sequence[PhaseReport], us_per_accepted: float) -> list[float]:
    """Server CPU per 429 as the flood pays it, per round: (flood CPU/s - at-quota CPU/s -
    the extra accepted pushes/s x `us_per_accepted`) / refusals per second.

    Higher than the hammer's figure: there the 429s come back to back on 16 connections,
    many per event-loop pass with warm caches; in the flood each arrives alone on its own
    connection and pays a loop wake-up of its own. Rounds with fewer than
    MIN_IN_PLACE_PER_S refusals a second are left out: a few % of a core of noise between
    two phases is then hundreds of µs per refusal (with held 429s a waiting flood sends ~90)."""
    quota = {p.round: p for p in phases if p.condition == "at-quota"}
    out = []
    for p in phases:
        q = quota.get(p.round)
        if p.condition != "flood" or q is None or not (p.noisy and q.noisy):
            continue
        if p.noisy.refused_per_s < MIN_IN_PLACE_PER_S:
            continue
        extra_accepted = p.noisy.accepted_per_s - q.noisy.accepted_per_s
        extra_cpu = p.server_cpu_s / p.wall_s - q.server_cpu_s / q.wall_s
        extra_cpu -= extra_accepted * us_per_accepted / 1e6
        out.append(round(extra_cpu / p.noisy.refused_per_s * 1e6))
    return out


def print_cost(cost: RefusalCost, flood: FloodStats | None, in_flood_us: list[float]) -> None:
    print(
        f"\n429 cost: {cost.requests} pushes ({cost.per_s:.0f}/s) from one device over"
        f" {cost.wall_s:.1f} s: {cost.refused} refused (scopes {cost.scopes}), {cost.accepted}"
        f" accepted; server CPU {cost.server_cpu_pct:.0f}% of a core, load generator"
        f" {cost.client_cpu_pct:.0f}%"
    )
    print(
        f"  server CPU per 429: {cost.us_per_429:.0f} µs (all CPU / all requests:"
        f" {cost.us_per_request:.0f} µs); an accepted quiet request costs ≈"
        f" {cost.us_per_accepted:.0f} µs (baseline CPU / requests); 429 answered in"
        f" {cost.refused_p50_ms:.2f} ms p50"
    )
    if flood is not None:
        us = statistics.median(in_flood_us) if in_flood_us else cost.us_per_429
        refusals = flood.refused_per_s * us / 1e4
        accepted = flood.accepted_per_s * cost.us_per_accepted / 1e4
        how = (
            f"{us:.0f} µs each, measured in place (flood CPU - at-quota CPU, per round:"
            f" {', '.join(f'{x:.0f}' for x in in_flood_us)} µs)"
            if in_flood_us
            else f"{us:.0f} µs each, the hammer's back-to-back figure (a lower bound: too few"
            f" refusals to measure in place)"
        )
        print(
            f"  during the flood: {flood.refused_per_s:.0f} refusals/s ≈ {refusals:.0f}% of a"
            f" core at {how}; {flood.accepted_per_s:.0f} accepted pushes/s ≈ {accepted:.0f}%"
        )


def print_profile(summary: dict[str, Any], us_per_429: float, top: int = 12) -> None:
    print(
        f"\nwhere a refusal's server time goes (py-spy, {summary['samples']} samples,"
        f" {summary['busy_cores']} busy cores; µs = share x {us_per_429:.0f} µs per 429):"
    )
    for step, share in summary["steps"]:
        print(f"  {share:>5.1f}%  {share * us_per_429 / 100:>5.0f} µs  {step}")
    print("  top functions by own time:")
    for name, share in summary["own"][:top]:
        print(f"  {share:>5.1f}%  {name}")


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a < 30 s smoke run")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of baseline, at-quota and flood (each condition's rounds are pooled)",
    )
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unreported quiet load")
    p.add_argument("--tenant-limit", default="50/second", help="FIELDSYNC_RATE_TENANT")
    p.add_argument("--user-limit", default="20/second", help="FIELDSYNC_RATE_USER")
    p.add_argument("--device-limit", default="10/second", help="FIELDSYNC_RATE_DEVICE")
    p.add_argument("--quiet-devices", type=int, default=6, help="quiet devices (2 per user)")
    p.add_argument("--quiet-rate", type=float, default=3.5, help="requests/s per quiet device")
    p.add_argument("--pull-every", type=int, default=5, help="every n-th quiet request pulls")
    p.add_argument("--flood-factor", type=float, default=10.0, help="noisy offered / quota")
    p.add_argument("--noisy-procs", type=int, default=3, help="noisy load processes")
    p.add_argument("--noisy-devices", type=int, default=66, help="noisy devices (2 per user)")
    p.add_argument(
        "--flood-conns",
        type=int,
        default=1,
        help="requests a noisy device keeps in flight (1: it waits for each answer, as a sync"
        " client does; more: it sends at every slot while fewer are unanswered)",
    )
    p.add_argument(
        "--rate-hold",
        default=None,
        help="the server's FIELDSYNC_RATE_HOLD_S (default: the server's own default)",
    )
    p.add_argument("--cost-duration", type=float, default=6.0, help="seconds of the 429 phase")
    p.add_argument("--cost-conns", type=int, default=16, help="connections of the hammer")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy phase")
    p.add_argument(
        "--no-control",
        action="store_true",
        help="skip the at-quota phase (the noisy tenant at 1x its quota: what it may do)",
    )
    p.add_argument("--no-gc-trace", action="store_true", help="do not log the server's GCs")
    p.add_argument(
        "--no-disk-probe", action="store_true", help="do not time disk flushes beside the server"
    )
    p.add_argument(
        "--layout",
        choices=("split", "shared"),
        default="split",
        help="split: the server on half the cores, the load generators on the rest, the flood's"
        " generators niced (as if they ran on other machines); shared: all on every core",
    )
    p.add_argument(
        "--idle-wait",
        type=float,
        default=120.0,
        help="seconds to wait at most for other processes to leave the machine idle first",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.cost_duration, args.idle_wait = 4.0, 1.0, 2.0, 0.0
        args.rounds = 1
    args.out = args.out or RESULTS_DIR / (
        "noisy_neighbour_quick.json" if args.quick else "noisy_neighbour.json"
    )
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.flood_conns < 1:
        p.error("--flood-conns must be at least 1")
    args.noisy_devices -= args.noisy_devices % (2 * args.noisy_procs)
    try:
        args.limits = Limits.parse(args.device_limit, args.user_limit, args.tenant_limit)
    except ValueError as exc:
        p.error(str(exc))
    problem = load_fits(args)
    if problem:
        p.error(problem)
    return args


def load_fits(args: argparse.Namespace) -> str | None:
    """None if the quiet load is well inside the limits and the noisy devices and users are
    each under theirs (so the tenant bucket is what refuses the flood); else why not."""
    limits: Limits = args.limits
    device, user, tenant = per_s(limits.device), per_s(limits.user), per_s(limits.tenant)
    quiet_tenant = args.quiet_devices * args.quiet_rate
    if quiet_tenant > 0.5 * tenant or 2 * args.quiet_rate > 0.5 * user:
        return f"the quiet load ({quiet_tenant:g}/s) must stay under half of every limit"
    if args.quiet_rate > 0.5 * device:
        return "a quiet device must stay under half of the device limit"
    if args.noisy_devices < 2 * args.noisy_procs:
        return "at least two noisy devices per process"
    per_device = args.flood_factor * tenant / args.noisy_devices
    if per_device > 0.9 * device or 2 * per_device > 0.9 * user:
        return (
            f"a noisy device would send {per_device:.1f}/s: add --noisy-devices so each device"
            " and user stays under its own limit (the tenant bucket must refuse the flood)"
        )
    return None


@dataclass(frozen=True, slots=True)
class PhaseStep:
    """One phase of the plan: a condition (the noisy tenant's offered load, in multiples of
    its quota; 0: none) in one round."""

    condition: str
    factor: float
    round: int
    number: int  # unique per phase: the quiet and noisy devices are new in each

    def name(self, rounds: int) -> str:
        return f"{self.condition} {self.round}" if rounds > 1 and self.round else self.condition


@dataclass(slots=True)
class Run:
    phases: list[PhaseReport] = field(default_factory=list)
    # per condition, each round's quiet results and what disturbed them (not in the JSON)
    quiet_runs: dict[str, list[tuple[list[LoadResult], Disturbances]]] = field(default_factory=dict)
    pooled: dict[str, QuietStats] = field(default_factory=dict)  # per condition, all rounds
    cost: RefusalCost | None = None
    in_flood_us: list[float] = field(default_factory=list)  # server CPU per 429 in each flood
    profile: dict[str, Any] | None = None
    profile_scopes: dict[str, int] = field(default_factory=dict)  # 429s of the py-spy phase
    warmup_acked: int = 0  # quiet items acked in the warm-up (they are in the log too)
    metric: dict[str, float] = field(default_factory=dict)
    held: int = 0  # 429s the server held (fieldsync_rate_limited_held_total)
    quick: int = 0  # 429s answered in front of aiohttp (fieldsync_rate_limited_quick_total)
    logged: dict[str, int] = field(default_factory=dict)
    checks: Checks = field(default_factory=Checks)


def measure(server: Server, args: argparse.Namespace, run: Run, tracers: Tracers) -> None:
    url, d, tenant = server.url, args.duration, args.limits.tenant
    print(f"server pid {server.pid} on {url}; limits: {args.limits}", flush=True)
    warm = run_phase(server, "warm-up", [quiet_spec(args, url, args.warmup, 0)])
    items = merged_counts(warm.results, "items")
    run.warmup_acked = items.get("created", 0) + items.get("merged", 0)
    base: QuietStats | None = None  # the latest baseline: slow requests are judged by it
    for step in phase_plan(args):
        name = step.name(args.rounds)
        specs = [quiet_spec(args, url, d, step.number)]
        if step.factor:
            specs += noisy_specs(args, url, d, step.number, step.factor)
        slow_ms = GOAL_RATIO * base.p99_ms if base else None
        phase = run_phase(server, name, specs)
        seen = tracers.seen(phase.cpu.t0, phase.cpu.t0 + phase.cpu.wall_s)
        report = phase_report(phase, step, tenant, tracers, seen, slow_ms)
        run.phases.append(report)
        run.quiet_runs.setdefault(step.condition, []).append((phase.of(QUIET), seen))
        if step.condition == "baseline":
            base = report.quiet
        print(f"  {name}: " + phase_line(report), flush=True)
    run.pooled = pooled_quiet(run.quiet_runs)
    run.metric = rate_limited_metric(server)
    run.held = counter_metric(server, "fieldsync_rate_limited_held_total")
    run.quick = counter_metric(server, "fieldsync_rate_limited_quick_total")


def phase_plan(args: argparse.Namespace) -> list[PhaseStep]:
    """Rounds of baseline, at-quota and flood, then one "after" phase.

    Interleaving the conditions and pooling each one's rounds compares them over the same
    stretch of time: on a shared VM the same code's baseline p99 moves by 2x from one
    30 s phase to the next (disk, steal), which one phase of each could not tell from the
    flood's effect."""
    conditions = [("baseline", 0.0)]
    if not args.quick and not args.no_control:
        conditions.append(("at-quota", 1.0))
    conditions.append(("flood", args.flood_factor))
    plan = [
        PhaseStep(condition, factor, r, 0)
        for r in range(1, args.rounds + 1)
        for condition, factor in conditions
    ]
    if not args.quick:
        plan.append(PhaseStep("after", 0.0, 0, 0))
    return [replace(step, number=n) for n, step in enumerate(plan, start=1)]


def pooled_quiet(
    quiet_runs: dict[str, list[tuple[list[LoadResult], Disturbances]]],
) -> dict[str, QuietStats]:
    """Each condition's quiet requests over all its rounds (slow: over 2x the pooled baseline
    p99)."""
    pooled: dict[str, QuietStats] = {}
    for condition, runs in quiet_runs.items():
        results = [r for rs, _ in runs for r in rs]
        seen = Disturbances.joined([s for _, s in runs])
        base = pooled.get("baseline")
        pooled[condition] = quiet_stats(results, seen, GOAL_RATIO * base.p99_ms if base else None)
    return pooled


def phase_line(p: PhaseReport) -> str:
    q, n = p.quiet, p.noisy
    text = f"quiet p50 {q.p50_ms:.1f} ms p99 {q.p99_ms:.1f} ms ({q.requests} req)" if q else ""
    if n is not None:
        text += f"; noisy {n.offered_per_s:.0f}/s offered, {n.accepted_per_s:.1f}/s accepted"
    return text + f"; server CPU {p.server_cpu_pct:.0f}%"


def measure_cost(server: Server, args: argparse.Namespace, run: Run) -> None:
    base = run.phases[0]
    assert base.quiet is not None
    us_per_accepted = base.server_cpu_s / max(base.quiet.requests, 1) * 1e6
    cost_run = run_phase(server, "429 cost", [hammer_spec(args, server.url, 1)])
    run.cost = refusal_cost(cost_run, us_per_accepted)
    run.in_flood_us = in_flood_refusal_us(run.phases, us_per_accepted)
    print(f"  429 cost: {run.cost.us_per_429:.0f} µs of server CPU per refused push", flush=True)
    if args.no_profile or not Profiler.available():
        return
    profiler = Profiler(server.pid, profile_path(args.out))
    profiled = run_phase(server, "429 profile", [hammer_spec(args, server.url, 2)], profiler)
    run.profile_scopes = merged_counts(profiled.results, "scopes")
    run.profile = summarize_profile(profiler.out, profiled.cpu.wall_s, profiler.rate, step_of)
    run.profile["raw"] = str(profiler.out)


def seen_429_by_scope(run: Run) -> dict[str, int]:
    """The 429s the clients of the phases saw (not the cost phase's: another server)."""
    seen: Counter[str] = Counter()
    for p in run.phases:
        seen.update(p.noisy.scopes if p.noisy else {})
        seen.update({"quiet": p.quiet.refused} if p.quiet and p.quiet.refused else {})
    return dict(seen)


def cost_checks(server: Server, run: Run) -> None:
    """The 429 cost phases' refusals: well formed, and all counted by their server."""
    if run.cost is None:
        return
    run.checks.expect(run.cost.bad_429 == 0, f"{run.cost.bad_429} malformed 429s (cost phase)")
    seen = Counter(run.cost.scopes) + Counter(run.profile_scopes)
    check_metrics(dict(seen), rate_limited_metric(server), run.checks)


def acked_items(run: Run) -> dict[str, int]:
    acked: Counter[str] = Counter({QUIET: run.warmup_acked})
    for p in run.phases:
        for tenant, stats in ((QUIET, p.quiet), (NOISY, p.noisy)):
            if stats is not None:
                acked[tenant] += stats.items.get("created", 0) + stats.items.get("merged", 0)
    return dict(acked)


def final_checks(server: Server, args: argparse.Namespace, run: Run) -> None:
    for p in run.phases:
        check_phase(p, run.checks)
    check_metrics(seen_429_by_scope(run), run.metric, run.checks)
    run.logged = check_log_rows(server.db, acked_items(run), run.checks)
    count, first = server.log_problems()
    run.checks.note(count == 0, f"the server logged {count} WARNING/ERROR lines: {first}")


def report(args: argparse.Namespace, run: Run, run_s: float) -> None:
    goal = verdict(run.phases, run.pooled)
    print(
        f"\nfieldsync noisy-neighbour benchmark — {machine_info()['cores']} cores, load average"
        f" at start {args.loadavg}, code {code_version()}; limits: {args.limits}; quiet"
        f" {args.quiet_devices} devices x {args.quiet_rate:g} req/s (every {args.pull_every}th a"
        f" pull); noisy {args.noisy_devices} devices in {args.noisy_procs} processes at"
        f" {args.flood_factor:g}x the tenant quota; {args.duration:g} s per phase, {args.rounds}"
        " round(s)"
    )
    print_table(PHASE_COLUMNS, [phase_row(p) for p in run.phases])
    print_summary(run.phases, goal)
    print_gc(run.phases)
    print_disk(run.phases)
    if run.cost is not None:
        floods = [p.noisy for p in run.phases if p.condition == "flood" and p.noisy]
        print_cost(run.cost, floods[-1] if floods else None, run.in_flood_us)
    if run.profile is not None and run.cost is not None:
        print_profile(run.profile, run.cost.us_per_429)
    print(f"\nlog rows per tenant: {run.logged}; acked items: {acked_items(run)}")
    print(
        f"fieldsync_rate_limited_total: {run.metric}; 429s seen: {seen_429_by_scope(run)};"
        f" of them held till the Retry-After the client was given before was up: {run.held};"
        f" answered in front of aiohttp (quick refusals): {run.quick}"
    )
    for w in run.checks.warnings:
        print(f"warning: {w}")
    for problem in run.checks.problems:
        print(f"!!!!! {problem}")
    failed = bool(run.checks.problems)
    finish(args.out, results_json(args, run, goal, failed), failed, run_s)


def results_json(
    args: argparse.Namespace, run: Run, goal: dict[str, Any], failed: bool
) -> dict[str, Any]:
    settings = jsonable_settings({k: v for k, v in vars(args).items() if k != "limits"})
    return {
        "machine": machine_info(),
        "code": code_version(),
        "settings": settings,
        "limits": {scope: str(rate) for scope, rate in args.limits.rates()},
        "goal": goal,
        "phases": [asdict(p) for p in run.phases],
        "refusal_cost": asdict(run.cost) if run.cost else None,
        "in_flood_us_per_429": run.in_flood_us,
        "profile": run.profile,
        "rate_limited_metric": run.metric,
        "rate_limited_held": run.held,
        "log_rows": run.logged,
        "acked_items": acked_items(run),
        "warnings": run.checks.warnings,
        "problems": run.checks.problems,
        "failed": failed,
    }


def profile_path(out: Path) -> Path:
    """The raw py-spy stacks beside the results: noisy_neighbour[_quick]_profile.txt."""
    return out.with_name(f"{out.stem}_profile.txt")


def wait_for_idle(max_wait_s: float, busy_pct: float = 15.0, sample_s: float = 2.0) -> float:
    """Wait (at most `max_wait_s`) until the machine's busy CPU over `sample_s` is under
    `busy_pct` of one core: other people's jobs on a shared box would disturb the numbers.
    Returns the last busy share seen."""
    deadline = time.monotonic() + max_wait_s
    busy = 0.0
    for _ in range(1 + int(max_wait_s / sample_s)):
        before = machine_busy_seconds()
        time.sleep(sample_s)
        busy = (machine_busy_seconds() - before) / sample_s * 100
        if busy < busy_pct or time.monotonic() >= deadline:
            break
        print(f"the machine is busy ({busy:.0f}% of a core); waiting", flush=True)
    return busy


def core_split(layout: str) -> tuple[set[int], set[int]]:
    """The cores of the server and of the load generators.

    On one machine the flood's generators compete for the cores the server and the quiet
    tenant's client need; in production they are the attacker's machines. ``split`` gives
    the server half the cores and the generators the rest (the flood's at a lower priority
    than the quiet client, the measuring instrument), so the figure is the server's
    isolation, not the bench's own contention. ``shared`` leaves every process on all cores.
    """
    cores = sorted(os.sched_getaffinity(0))
    if layout == "shared" or len(cores) < 2:
        return set(cores), set(cores)
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.idle_wait > 0:
        args.busy_before_pct = round(wait_for_idle(args.idle_wait), 1)
    args.loadavg = loadavg()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    run = Run()
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="fieldsync-nn-") as folder,
        contextlib.ExitStack() as stack,
    ):
        gc_trace = None if args.no_gc_trace else GcTrace(Path(folder))
        probe = None if args.no_disk_probe else stack.enter_context(DiskProbe(Path(folder)))
        env = {**args.limits.env(), **(gc_trace.env() if gc_trace else {})}
        if args.rate_hold is not None:
            env[HOLD_ENV] = args.rate_hold
        server_cpus, load_cpus = core_split(args.layout)
        os.sched_setaffinity(0, server_cpus)  # the server inherits it...
        with running_server(env=env) as server:
            os.sched_setaffinity(0, load_cpus)  # ...and the load processes this
            try:
                measure(server, args, run, Tracers(gc_trace, probe))
            finally:
                server.stop()  # a clean shutdown before the log rows are counted
            final_checks(server, args, run)
        os.sched_setaffinity(0, server_cpus)
        with running_server(env={**env, HOLD_ENV: "0"}) as server:
            os.sched_setaffinity(0, load_cpus)
            measure_cost(server, args, run)
            cost_checks(server, run)
    report(args, run, time.perf_counter() - started)
    return 1 if run.checks.problems else 0


if __name__ == "__main__":
    sys.exit(main())
