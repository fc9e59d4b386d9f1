"""Device-socket fan-out benchmark: push -> other-device latency, delivery rate, idle sockets.

What it does
------------
For each D in ``--devices`` (default 10,100,1000) ``--nodes`` fresh server processes are
started on a fresh ``--db`` (``fieldsync serve`` on a temporary SQLite file by default,
127.0.0.1, a port below 32768 each; their open-file limit raised to the hard limit, since
every socket is one file descriptor). With several nodes, writer sockets and receiver sockets
are spread over them (socket i of a role on node i % N), so a receiver gets the edits pushed
on another node through the nodes' commit notices: every edit is stamped with the node it
was pushed to, and the probe latencies of those cross-node edits are reported apart
(``xn p50/p99``). ``--db``, ``--nodes``, ``--compare`` and ``--configs`` work as in
bench/http_sync.py; ``--compare`` skips the idle-socket step and the profile unless asked.

1. **Records**: one writer process opens ``--writers`` push-only device sockets (hello with
   ``domains: []``, so they receive nothing) and creates ``--records`` activity records in bu1
   of the phase's tenant (each writer owns records r with r % writers == its number and edits
   them with its own Yjs client id).
2. **Receivers**: D devices connect over ``GET /api/v1/ws``, say hello with
   ``domains: ["activity"]`` and no cursor, and read catch-up pages until ``has_more`` is false.
   ``--probe`` of them live in a *probe* process that measures the latency of every change;
   ``--stall`` of them live in a *stall* process that stops reading ``--stall-after`` seconds
   into the window for ``--stall-for`` seconds (the server must hold, then page, their
   backlog: it should page the log once their feed overflows, and they must still get every
   edit exactly once); the rest live in ``--sink-procs`` *sink* processes that read and decode
   everything (they must, or they fall behind) and time every ``--sample-every``-th socket.
   Server RSS before and after they connect gives the memory per connection.
3. **Load**: the writers push ``--rate`` updates/s in total (one item per push frame; an item
   is one edit of one record: ``fields.remarks = "t=<CLOCK_MONOTONIC ns>"`` plus ``--pad``
   bytes, stamped just before the frame is sent) for ``--warmup`` + ``--duration`` seconds,
   paced by the clock, at most ``--max-outstanding`` unacknowledged pushes per writer socket
   (a push that would exceed it is *skipped*: offered but not sent). Receivers find every
   ``t=<ns>`` in the Yjs updates of each ``changes`` frame (a page merges several edits of one
   record into one update; every edit's value stays in it) and take ``arrival - t`` as the
   latency: CLOCK_MONOTONIC is one clock for every process on a Linux machine. After the
   writers stop, receivers get ``--drain`` seconds to catch up; edits of the window a receiver
   never saw are *missing*, and a p99 that falls in the missing part is shown as ``>drain``.
   The server's rate limits are lifted for the bench (see ``common.UNLIMITED_RATES``): with the
   defaults (6000 requests/minute per tenant) one tenant could not push 1,000 updates/s at all.
4. **Idle sockets** (``--idle-max``, default 10,000; fresh server): devices connect in steps
   (hello + caught up, then nothing but the server's heartbeat pings, which the client answers)
   and server RSS / open files are read at each step. Stops early when RSS passes 1 GB, a
   connect fails, or the server dies. The last step is held ``--idle-hold`` seconds (longer
   than the 30 s heartbeat) and sockets the server closed meanwhile are counted.
5. ``--profile-devices`` (default: the largest D): py-spy samples the server during that phase's
   measured window (raw stacks in ``bench/results/ws_fanout_profile.txt``); the report lists the
   top functions by own time and a coarse "where the time goes".

Measured numbers
----------------
``push/s``: offered (the target) and acknowledged (acks of pushes sent in the window / window
seconds). ``ack p99``: push -> ack. ``deliv/s``: edits received by all receivers during the
window, by arrival time. ``deliv %``: edits of the window received by the end of the drain /
(acked edits of the window x D). ``lat p50/p99``: push -> other device, probe sockets (``smp p99``:
the sampled sink sockets, whose process is busier). ``srv CPU%``, ``cli CPU%``, ``oth CPU%``:
share of ONE core used by the server, by all our client processes, and by anything else on the
machine during the window (2 cores in all here: clients and server compete); ``db CPU%``: a
throwaway PostgreSQL cluster's processes ("-": not measured). Server numbers are sums over
the nodes. ``KB/conn``:
(RSS with D caught-up idle sockets - RSS before) / D. ``pages``: ``changes`` frames with
``has_more`` true after the catch-up, i.e. a receiver paging the log because it fell behind.
``lost``: receiver sockets the server closed during the phase. ``srv wait%``: how long the
server's threads were runnable but waited for a CPU (schedstat), as a share of one core: the
server wanted ``srv CPU% + srv wait%``; a high wait means the machine, not the server, limited it.
The line under each row adds the push -> ack p50, frames/s and edits per frame (the server
coalesces what a slow wake-up finds into one frame), server CPU per push and per delivered
edit, the client processes' event-loop lag (high = the clients, not the server, were slow),
the server's kernel (syscall) share, and what happened to the stalled receivers (how many
``has_more`` pages they read, whether they got every edit, the bytes the server's kernel held
unsent for them: ``ss`` Send-Q).

Limits to keep in mind: a Python client decodes some 10^5 small frames/s per core, and this
machine has 2 cores for server and clients together. D=1000 at 1,000 updates/s asks for 10^6
deliveries/s: the tables say what was reached, not what was asked.

The server needs ``ulimit -n`` >= sockets + ~100 (the SQLite files, the listener): this bench
sets the child's soft limit to the hard limit (``preexec_fn``), and raises its own.

``python bench/ws_fanout.py --quick`` is a < 30 s smoke run (D = 10, 50; idle up to 500).
Results: ``bench/results/ws_fanout.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
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
    percentiles,
    print_side_by_side,
    print_table,
    raise_nofile_limit,
    results_header,
    run_backends,
    running_nodes,
    summarize_profile,
)
from ws_load import (
    BU,
    NS,
    Child,
    ReceiverConfig,
    Target,
    Window,
    WriterConfig,
    receivers_main,
    sleep_until,
    writers_main,
)

RSS_LIMIT_MB = 1024.0

# ---------------------------------------------------------------------------------------
# one fan-out phase
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class FanoutResult:
    devices: int
    writers: int
    records: int
    rate_offered: float
    duration_s: float
    receivers_connected: int
    connect_failures: int
    connect_s: float
    rss_before_mb: float
    rss_connected_mb: float
    rss_after_mb: float
    rss_per_connection_kb: float
    server_fds_connected: int
    pushes_sent_per_s: float
    pushes_acked_per_s: float
    pushes_skipped: int
    push_errors: int
    push_first_error: str | None
    ack_p50_ms: float
    ack_p99_ms: float
    deliveries_per_s: float
    frames_per_s: float
    edits_per_frame: float
    max_edits_per_frame: int
    expected_deliveries: int
    delivered: int
    delivered_pct: float
    latency_samples: int
    latency_missing: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    sampled_p50_ms: float
    sampled_p99_ms: float
    sampled_missing: int
    sampled_sockets: int
    pages: int
    stall_sockets: int
    stall_pages: int
    stall_delivered_pct: float
    stall_max_latency_ms: float
    stall_server_queued_bytes: int
    catchup_frames: int
    lost_sockets: int
    close_codes: dict[str, int]
    server_log_problems: int
    server_log_first: list[str]
    duplicates: int
    receiver_errors: int
    first_receiver_error: str | None
    server_cpu_pct: float
    server_sys_pct: float
    server_wait_pct: float
    server_cpu_us_per_push: float
    server_cpu_us_per_delivery: float
    client_cpu_pct: float
    other_cpu_pct: float
    client_loop_lag_p99_ms: float
    client_loop_lag_max_ms: float
    per_process: list[dict[str, Any]]
    nodes: int = 1
    remote_samples: int = 0  # probe latencies of edits pushed on another node than the probe's
    remote_missing: int = 0
    remote_p50_ms: float = 0.0
    remote_p99_ms: float = 0.0
    db_cpu_pct: float = 0.0  # a throwaway PostgreSQL cluster's processes (0: not measured)
    db_cpu_us_per_push: float = 0.0
    db_measured: bool = False
    merge_retries: float = 0.0  # merges done again: another node wrote the record first
    peer_entries: float = 0.0  # log entries the nodes read from each other


def receiver_plan(devices: int, args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(role, sockets, sample_every) per receiver process."""
    probe = min(args.probe, devices)
    stall = min(args.stall, devices - probe)
    plan = [("probe", probe, 1)] + ([("stall", stall, 1)] if stall else [])
    rest = devices - probe - stall
    procs = min(args.sink_procs, math.ceil(rest / 100)) if rest else 0
    for i in range(procs):
        plan.append(("sink", rest // procs + (i < rest % procs), args.sample_every))
    return plan


def start_receivers(
    ctx: Any, target: Target, plan: list[tuple[str, int, int]], stall: tuple[float, float]
) -> list[tuple[Child, int]]:
    children, first = [], 0
    for number, (role, count, every) in enumerate(plan):
        config = ReceiverConfig(
            role, target, every, first, stall=stall if role == "stall" else None
        )
        children.append((Child(ctx, receivers_main, config, f"{role}-{number}"), count))
        first += count
    return children


def connect_all(children: list[tuple[Child, int]], timeout_s: float) -> list[dict[str, Any]]:
    for child, count in children:
        child.send("connect", count)
    return [child.expect("connect", timeout_s) for child, _ in children]


@dataclass(slots=True)
class PhaseRun:
    """What the parent gathered during one phase, before it is summarized."""

    devices: int
    connected: list[dict[str, Any]] = field(default_factory=list)
    rss_before: float = 0.0
    rss_connected: float = 0.0
    rss_after: float = 0.0
    fds: int = 0
    cpu: CpuWindow | None = None
    nodes: int = 1
    db_measured: bool = False
    writer: dict[str, Any] = field(default_factory=dict)
    receivers: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    log_problems: tuple[int, list[str]] = (0, [])
    multi_node: dict[str, float] = field(default_factory=dict)


def run_fanout(
    args: argparse.Namespace, devices: int, nofile: int, databases: Databases, nodes: int
) -> tuple[FanoutResult, dict[str, Any] | None]:
    """One phase on fresh nodes and a fresh database: its result, and node 0's profile if it
    was sampled. Writers and receivers are spread over the nodes (socket i on node i % N)."""
    ctx = mp.get_context("spawn")
    run = PhaseRun(devices, nodes=nodes)
    children: list[Child] = []
    with running_nodes(databases, nodes, args.server_src, nofile) as server:
        print(f"  {server.describe()}", flush=True)
        run.db_measured = server.db_pid is not None
        tenant = f"fanout-{devices}"
        target = target_of(server, tenant)
        try:
            writer = Child(ctx, writers_main, writer_config(args, target), "writers")
            children.append(writer)
            writer.expect("ready", 180)
            run.rss_before = _settled_rss(server)
            stall = (args.stall_after, args.stall_for)
            receivers = start_receivers(ctx, target, receiver_plan(devices, args), stall)
            children += [c for c, _ in receivers]
            run.connected = connect_all(receivers, 120 + devices / 20)
            run.rss_connected, run.fds = _settled_rss(server), server.open_fds()
            _load(args, server, run, writer, [c for c, _ in receivers])
            run.rss_after = server.rss_mb()
        finally:
            for child in children:
                child.stop()
            run.log_problems = server.log_problems()
            run.multi_node = server.multi_node_counts()
    return summarize_fanout(args, run), run.profile


def target_of(server: Nodes, tenant: str) -> Target:
    return Target("127.0.0.1", server.ports[0], tenant, mint(tenant, bus=[BU]), server.ports)


def writer_config(args: argparse.Namespace, target: Target) -> WriterConfig:
    writers = max(1, min(args.writers, args.records))
    return WriterConfig(
        target, writers, args.records, args.rate, args.max_outstanding, pad=args.pad
    )


def _settled_rss(server: Nodes, seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return server.rss_mb()


def _load(
    args: argparse.Namespace,
    server: Nodes,
    run: PhaseRun,
    writer: Child,
    receivers: list[Child],
) -> None:
    """Start the clock for everyone, measure the server over the window, collect reports."""
    t0 = time.monotonic_ns() + NS // 2
    t1 = t0 + int(args.warmup * NS)
    t2 = t1 + int(args.duration * NS)
    window = Window(t0, t1, t2, t2 + int(args.drain * NS))
    for child in (writer, *receivers):
        child.send("go", window)
    profiler = _profiler(args, server, run.devices)
    time.sleep(sleep_until(t1 - NS // 2))
    if profiler is not None:
        profiler.start()
    time.sleep(sleep_until(t1))
    run.cpu = server.cpu_window().start()
    time.sleep(sleep_until(t2))
    run.cpu.stop()
    if profiler is not None:
        profiler.stop()
        run.profile = summarize_profile(profiler.out, run.cpu.wall_s, profiler.rate, step_of)
        run.profile.update(devices=run.devices, raw=str(profiler.out))
    timeout = args.drain + 60
    run.writer = writer.ask("report", timeout)  # once its pushes are answered, or at the end
    time.sleep(sleep_until(window.end))  # the receivers get the whole drain, whatever it was
    run.receivers = [child.ask("report", timeout) for child in receivers]


def _profiler(args: argparse.Namespace, server: Nodes, devices: int) -> Profiler | None:
    if devices != args.profile_devices:
        return None
    if not Profiler.available():
        print("  (py-spy is not installed: /tmp/venv/bin/pip install py-spy; no profile)")
        return None
    # node 0 only, when there are several
    return Profiler(server.pid, args.out.with_name(args.out.stem + "_profile.txt"))


def _latencies(raw: bytes) -> list[float]:
    values = array("f")
    values.frombytes(raw)
    return values.tolist()


def _with_missing(latencies: list[float], missing: int) -> tuple[float, float]:
    """p50 and p99 counting never-delivered edits as infinitely late."""
    padded = latencies + [math.inf] * max(0, missing)
    p50, p99 = percentiles(padded, (0.5, 0.99))
    return p50, p99


def summarize_fanout(args: argparse.Namespace, run: PhaseRun) -> FanoutResult:
    w, rs, cpu = run.writer, run.receivers, run.cpu
    assert cpu is not None
    seconds = cpu.wall_s or args.duration

    def total(key: str) -> Any:
        return sum(r[key] for r in rs)

    probe = [r for r in rs if r["role"] == "probe"]
    sinks = [r for r in rs if r["role"] == "sink"]
    stalls = [r for r in rs if r["role"] == "stall"]
    stall_sockets = sum(r["sockets"] for r in stalls)
    stall_seen = sum(r["edits_window"] for r in stalls)
    probe_lat = [x for r in probe for x in _latencies(r["latencies_ms"])]
    sink_lat = [x for r in sinks for x in _latencies(r["latencies_ms"])]
    acked_window = w["acked_window"]
    probe_missing = sum(r["sampled_sockets"] for r in probe) * acked_window - len(probe_lat)
    sink_missing = sum(r["sampled_sockets"] for r in sinks) * acked_window - len(sink_lat)
    p50, p99 = _with_missing(probe_lat, probe_missing)
    s50, s99 = _with_missing(sink_lat, sink_missing)
    # cross-node: a probe on node a should get every acked edit pushed on any node b != a
    by_node = w["acked_window_by_node"]
    remote_lat = [x for r in probe for x in _latencies(r["remote_latencies_ms"])]
    remote_expected = sum(
        sampled * (acked_window - by_node[a])
        for r in probe
        for a, sampled in enumerate(r["sampled_by_node"])
    )
    remote_missing = remote_expected - len(remote_lat)
    r50, r99 = _with_missing(remote_lat, remote_missing) if remote_expected else (0.0, 0.0)
    ack50, ack99 = percentiles(_latencies(w["ack_latencies_ms"]))
    receivers = sum(c["open"] for c in run.connected)
    expected = acked_window * receivers
    client_cpu = total("cpu_s") + w["cpu_s"]
    frames = total("frames_window")
    errors = [r["first_error"] for r in rs if r["first_error"]]
    return FanoutResult(
        devices=run.devices,
        writers=w["writers"],
        records=w["records"],
        rate_offered=args.rate,
        duration_s=seconds,
        receivers_connected=receivers,
        connect_failures=sum(c["failed"] for c in run.connected),
        connect_s=max((c["seconds"] for c in run.connected), default=0.0),
        rss_before_mb=run.rss_before,
        rss_connected_mb=run.rss_connected,
        rss_after_mb=run.rss_after,
        rss_per_connection_kb=(run.rss_connected - run.rss_before) * 1024 / max(1, receivers),
        server_fds_connected=run.fds,
        pushes_sent_per_s=w["sent_window"] / seconds,
        pushes_acked_per_s=acked_window / seconds,
        pushes_skipped=w["skipped_window"],
        push_errors=w["errors"] + w["unanswered"],
        push_first_error=w["first_error"],
        ack_p50_ms=ack50,
        ack_p99_ms=ack99,
        deliveries_per_s=total("arrived_window") / seconds,
        frames_per_s=frames / seconds,
        edits_per_frame=total("arrived_window") / frames if frames else 0.0,
        max_edits_per_frame=max((r["max_edits_per_frame"] for r in rs), default=0),
        expected_deliveries=expected,
        delivered=total("edits_window"),
        delivered_pct=100.0 * total("edits_window") / expected if expected else 0.0,
        latency_samples=len(probe_lat),
        latency_missing=max(0, probe_missing),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        latency_max_ms=max(probe_lat, default=0.0) if probe_missing <= 0 else math.inf,
        sampled_p50_ms=s50,
        sampled_p99_ms=s99,
        sampled_missing=max(0, sink_missing),
        sampled_sockets=sum(r["sampled_sockets"] for r in sinks),
        pages=total("pages"),
        stall_sockets=stall_sockets,
        stall_pages=sum(r["pages"] for r in stalls),
        stall_delivered_pct=(
            100.0 * stall_seen / (acked_window * stall_sockets)
            if stall_sockets and acked_window
            else 0.0
        ),
        stall_server_queued_bytes=max((r["stall_server_queued_bytes"] for r in stalls), default=0),
        stall_max_latency_ms=max(
            (x for r in stalls for x in _latencies(r["latencies_ms"])), default=0.0
        ),
        catchup_frames=total("catchup_frames"),
        lost_sockets=total("lost"),
        close_codes=dict(sum((Counter(r["close_codes"]) for r in rs), Counter())),
        server_log_problems=run.log_problems[0],
        server_log_first=run.log_problems[1],
        duplicates=total("duplicates"),
        receiver_errors=total("error_frames"),
        first_receiver_error=errors[0] if errors else None,
        server_cpu_pct=cpu.server_pct,
        server_sys_pct=cpu.server_sys_s / seconds * 100,
        server_wait_pct=cpu.server_wait_pct,
        server_cpu_us_per_push=cpu.server_s / acked_window * 1e6 if acked_window else 0.0,
        server_cpu_us_per_delivery=(
            cpu.server_s / total("arrived_window") * 1e6 if total("arrived_window") else 0.0
        ),
        client_cpu_pct=client_cpu / seconds * 100,
        other_cpu_pct=cpu.others_pct(client_cpu),
        client_loop_lag_p99_ms=max((r["loop_lag_p99_ms"] for r in rs), default=0.0),
        client_loop_lag_max_ms=max((r["loop_lag_max_ms"] for r in rs), default=0.0),
        per_process=[_process_summary(r) for r in rs],
        nodes=run.nodes,
        remote_samples=len(remote_lat),
        remote_missing=max(0, remote_missing),
        remote_p50_ms=r50,
        remote_p99_ms=r99,
        db_cpu_pct=cpu.db_pct,
        db_cpu_us_per_push=cpu.db_s / acked_window * 1e6 if acked_window else 0.0,
        db_measured=run.db_measured,
        merge_retries=run.multi_node.get("merge_retries", 0.0),
        peer_entries=run.multi_node.get("peer_entries", 0.0),
    )


def _process_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("latencies_ms", "remote_latencies_ms")}


# ---------------------------------------------------------------------------------------
# idle sockets
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class IdleStep:
    target: int
    open: int
    failed: int
    connect_s: float
    rss_mb: float
    kb_per_socket: float  # (RSS - baseline) / open sockets
    step_kb_per_socket: float  # RSS growth of this step / sockets added by it
    server_fds: int
    server_idle_cpu_pct: float
    first_failure: str | None


@dataclass(slots=True)
class IdleResult:
    baseline_rss_mb: float
    server_nofile: int
    steps: list[IdleStep]
    stopped_because: str
    held_s: float = 0.0
    lost_while_held: int = 0
    pings_answered: int = 0
    peak_rss_mb: float = 0.0
    server_log_problems: int = 0
    server_log_first: list[str] = field(default_factory=list)
    nodes: int = 1  # sockets spread over this many nodes; RSS and fds are their sums


def idle_steps(maximum: int, quick: bool) -> list[int]:
    base = (100,) if quick else (100, 500, 1000, 2000, 5000, 7500, 10_000, 15_000)
    return sorted({s for s in base if s < maximum} | {maximum})


def run_idle(args: argparse.Namespace, nofile: int, databases: Databases, nodes: int) -> IdleResult:
    ctx = mp.get_context("spawn")
    with running_nodes(databases, nodes, args.server_src, nofile) as server:
        target = target_of(server, "idle")
        procs = max(1, min(args.idle_procs, math.ceil(args.idle_max / 1000)))
        children = [
            Child(
                ctx, receivers_main, ReceiverConfig("idle", target, 0, i * 1_000_000), f"idle-{i}"
            )
            for i in range(procs)
        ]
        try:
            result = IdleResult(
                _settled_rss(server),
                server.nofile_limit(),
                [],
                "reached the maximum",
                nodes=server.count,
            )
            _grow(args, server, children, result)
            _hold(args, children, result)
            result.peak_rss_mb = server.peak_rss_mb()
        finally:
            for child in children:
                child.stop()
        result.server_log_problems, result.server_log_first = server.log_problems()
    return result


def _grow(
    args: argparse.Namespace, server: Nodes, children: list[Child], result: IdleResult
) -> None:
    current = 0
    for target in idle_steps(args.idle_max, args.quick):
        adds = [(target - current) // len(children)] * len(children)
        adds[0] += (target - current) - sum(adds)
        for child, n in zip(children, adds):
            child.send("connect", n)
        replies = [child.expect("connect", 300) for child in children]
        step = _idle_step(server, result, target, current, replies)
        result.steps.append(step)
        print(
            f"  idle {step.open:>6} sockets: RSS {step.rss_mb:6.0f} MB,"
            f" {step.kb_per_socket:5.1f} KB/socket, {step.failed} failed,"
            f" connect {step.connect_s:.1f} s",
            flush=True,
        )
        current = target
        why = _stop_reason(server, step)
        if why:
            result.stopped_because = why
            return


def _idle_step(
    server: Nodes, result: IdleResult, target: int, previous: int, replies: list[dict[str, Any]]
) -> IdleStep:
    rss = _settled_rss(server)
    cpu = server.cpu_window().start()
    time.sleep(2.0)
    cpu.stop()
    opened = sum(r["open"] for r in replies)
    before = result.steps[-1] if result.steps else None
    prev_rss, prev_open = (before.rss_mb, before.open) if before else (result.baseline_rss_mb, 0)
    failures = [r["first_failure"] for r in replies if r["first_failure"]]
    return IdleStep(
        target=target,
        open=opened,
        failed=sum(r["failed"] for r in replies),
        connect_s=max(r["seconds"] for r in replies),
        rss_mb=rss,
        kb_per_socket=(rss - result.baseline_rss_mb) * 1024 / max(1, opened),
        step_kb_per_socket=(rss - prev_rss) * 1024 / max(1, opened - prev_open),
        server_fds=server.open_fds(),
        server_idle_cpu_pct=cpu.server_pct,
        first_failure=failures[0] if failures else None,
    )


def _stop_reason(server: Nodes, step: IdleStep) -> str | None:
    if not server.alive():
        return "the server died"
    if step.failed:
        return f"{step.failed} connects failed: {step.first_failure}"
    if step.rss_mb > RSS_LIMIT_MB:
        return f"server RSS {step.rss_mb:.0f} MB > {RSS_LIMIT_MB:.0f} MB"
    return None


def _hold(args: argparse.Namespace, children: list[Child], result: IdleResult) -> None:
    """Keep the sockets idle past a heartbeat, then count the ones the server dropped."""
    if args.idle_hold > 0 and result.steps:
        print(
            f"  holding {result.steps[-1].open} idle sockets for {args.idle_hold:.0f} s", flush=True
        )
        time.sleep(args.idle_hold)
        result.held_s = args.idle_hold
    reports = [child.ask("report", 60) for child in children]
    result.lost_while_held = sum(r["lost"] for r in reports)
    result.pings_answered = sum(r["pings"] for r in reports)


# ---------------------------------------------------------------------------------------
# where the server's time goes (profile steps)
# ---------------------------------------------------------------------------------------

SQLITE_THREADS = "sqlite (aiosqlite threads)"
DELIVERY = ("DeviceSession._deliver", "DeviceSession._flush", "_send_changes")
# Innermost matching frame decides; socket writes are told apart by who asked for them.
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fan-out: Hub.publish / Feed.offer", ("Hub.publish", "Feed.offer", "Feed.covers")),
    ("deliver: Feed.take / advance / is_echo", ("Feed.take", "Feed.advance", "Feed.is_echo")),
    ("deliver: merge_page (merge_updates)", ("merge_page", "_merged (server/changes")),
    ("deliver: encode_cursor", ("encode_cursor",)),
    ("deliver: catch-up read_log (loop side)", ("read_log (storage",)),
    ("deliver: aiohttp frame writer", ("(aiohttp/_websocket/writer", "send_bytes")),
    ("deliver: _send (msgpack.packb) and glue", ("DeviceSession._send", *DELIVERY)),
    ("push: rate limiter", ("(server/ratelimit", "Services.limit")),
    ("push: pipeline (merge, constraints, stage)", ("(server/pipeline", "(crdt_models/")),
    ("push: pipeline (gate, live records)", ("(server/gate", "(server/live", "(server/owner")),
    ("push: group commit (loop side)", ("(storage/",)),
    (
        "push: receive, decode, ack",
        (
            "DeviceSession._receive",
            "DeviceSession._push",
            "DeviceSession._decode",
            "parse_items",
            "decode_msgpack",
        ),
    ),
    ("hello / auth", ("DeviceSession._hello", "_subscribe", "TokenVerifier", "(jwt/")),
    ("aiohttp websocket reader / heartbeat", ("(aiohttp/_websocket/reader", "(aiohttp/web_ws")),
    ("aiohttp other", ("(aiohttp/",)),
    ("socket reads (recv syscalls)", ("_read_ready",)),
    ("asyncio loop (select, callbacks, task steps)", ("(asyncio/", "(selectors")),
)


def step_of(frames: list[str], thread: str) -> str:
    if "MainThread" not in thread:
        return SQLITE_THREADS
    if "_SelectorSocketTransport.write" in frames[-1]:  # the send syscall itself
        if any(d in f for f in frames for d in DELIVERY):
            return "deliver: socket send syscall"
        if any("DeviceSession." in f for f in frames):
            return "acks, pongs, errors: socket send syscall"
        return "socket send syscall (callers lost by py-spy; mostly deliveries)"
    return classify(frames, (STEPS,))


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def ms(value: float, drain_s: float) -> str:
    return f">{drain_s:.0f}s" if math.isinf(value) else f"{value:.1f}"


FANOUT_COLUMNS = (
    Column("D", 5),
    Column("push/s", 7, ".0f"),
    Column("acked/s", 7, ".0f"),
    Column("ack p99", 8),
    Column("deliv/s", 8, ".0f"),
    Column("deliv %", 7, ".1f"),
    Column("lat p50", 8),
    Column("lat p99", 8),
    Column("xn p50", 8),
    Column("xn p99", 8),
    Column("smp p99", 8),
    Column("srv CPU%", 8, ".0f", "%"),
    Column("srv wait%", 9, ".0f", "%"),
    Column("db CPU%", 7),
    Column("cli CPU%", 8, ".0f", "%"),
    Column("oth CPU%", 8, ".0f", "%"),
    Column("KB/conn", 7, ".1f"),
    Column("pages", 6),
    Column("lost", 5),
)


def fanout_row(r: FanoutResult, drain_s: float) -> tuple[Any, ...]:
    return (
        r.devices,
        r.pushes_sent_per_s,
        r.pushes_acked_per_s,
        ms(r.ack_p99_ms, drain_s),
        r.deliveries_per_s,
        r.delivered_pct,
        ms(r.latency_p50_ms, drain_s),
        ms(r.latency_p99_ms, drain_s),
        ms(r.remote_p50_ms, drain_s) if r.nodes > 1 else "-",
        ms(r.remote_p99_ms, drain_s) if r.nodes > 1 else "-",
        ms(r.sampled_p99_ms, drain_s) if r.sampled_sockets else "-",
        r.server_cpu_pct,
        r.server_wait_pct,
        f"{r.db_cpu_pct:.0f}%" if r.db_measured else "-",
        r.client_cpu_pct,
        r.other_cpu_pct,
        r.rss_per_connection_kb,
        r.pages,
        r.lost_sockets,
    )


def print_fanout(results: list[FanoutResult], args: argparse.Namespace) -> None:
    print(
        f"\nFan-out: {args.writers} writers push {args.rate:.0f} edits/s in total over"
        f" {args.records} records; every receiver gets every edit ({args.duration:.0f} s window"
        f" after {args.warmup:.0f} s warm-up, {args.drain:.0f} s drain; latencies in ms;"
        " xn: probe latencies of edits pushed on another node)"
    )
    print_table(FANOUT_COLUMNS, [fanout_row(r, args.drain) for r in results])
    for r in results:
        print(
            f"  D={r.devices}: {r.receivers_connected} receivers in {r.connect_s:.1f} s"
            f" ({r.connect_failures} failed), server fds {r.server_fds_connected};"
            f" probe {r.latency_samples} samples ({r.latency_missing} missing), max"
            f" {ms(r.latency_max_ms, args.drain)} ms; ack p50 {ms(r.ack_p50_ms, args.drain)} ms;"
            f" {r.frames_per_s:.0f} frames/s,"
            f" {r.edits_per_frame:.1f} edits/frame (max {r.max_edits_per_frame});"
            f" server {r.server_cpu_us_per_push:.0f} µs/push,"
            f" {r.server_cpu_us_per_delivery:.1f} µs/delivery;"
            f" client loop lag p99 {r.client_loop_lag_p99_ms:.0f} ms;"
            f" server in kernel {r.server_sys_pct:.0f}% of a core"
        )
        if r.nodes > 1:
            print(
                f"     {r.nodes} nodes: {r.remote_samples} cross-node probe latencies"
                f" ({r.remote_missing} missing), p50 {ms(r.remote_p50_ms, args.drain)} ms,"
                f" p99 {ms(r.remote_p99_ms, args.drain)} ms; {r.peer_entries:.0f} log entries"
                f" read from other nodes, {r.merge_retries:.0f} merges done again"
            )
        if r.stall_sockets:
            print(
                f"     {r.stall_sockets} receivers stopped reading for {args.stall_for:.0f} s:"
                f" {r.stall_pages} has_more pages, {r.stall_delivered_pct:.1f}% of the window's"
                f" edits by the end of the drain, slowest {r.stall_max_latency_ms:.0f} ms;"
                f" the server's kernel held {r.stall_server_queued_bytes / 1024:.0f} KB unsent"
                " for one of them when it resumed"
            )
        problems = _fanout_problems(r)
        if problems:
            print("     !! " + "; ".join(problems))


def _fanout_problems(r: FanoutResult) -> list[str]:
    out = []
    if r.push_errors or r.push_first_error:
        out.append(f"push errors {r.push_errors}: {r.push_first_error}")
    if r.pushes_skipped:
        out.append(f"{r.pushes_skipped} pushes skipped (writer at max outstanding)")
    if r.receiver_errors:
        out.append(f"{r.receiver_errors} error frames: {r.first_receiver_error}")
    if r.connect_failures:
        out.append(f"{r.connect_failures} receivers failed to connect")
    if r.duplicates:
        out.append(f"{r.duplicates} edits delivered twice to a probe socket")
    if r.lost_sockets:
        out.append(f"{r.lost_sockets} receivers closed by the server: {r.close_codes}")
    if r.server_log_problems:
        out.append(
            f"the server logged {r.server_log_problems} warnings/errors: {r.server_log_first}"
        )
    return out


IDLE_COLUMNS = (
    Column("sockets", 8),
    Column("failed", 6),
    Column("connect s", 9, ".1f"),
    Column("RSS MB", 7, ".0f"),
    Column("KB/socket", 9, ".1f"),
    Column("step KB/sock", 12, ".1f"),
    Column("srv fds", 7),
    Column("idle CPU%", 9, ".1f", "%"),
)


def print_idle(idle: IdleResult) -> None:
    print(
        f"\nIdle device sockets on {idle.nodes} node{'s' if idle.nodes > 1 else ''} (hello +"
        " caught up, then only heartbeats; RSS and fds summed over the nodes);"
        f" baseline RSS {idle.baseline_rss_mb:.0f} MB, server open-file limit {idle.server_nofile}"
    )
    rows = [
        (
            s.open,
            s.failed,
            s.connect_s,
            s.rss_mb,
            s.kb_per_socket,
            s.step_kb_per_socket,
            s.server_fds,
            s.server_idle_cpu_pct,
        )
        for s in idle.steps
    ]
    print_table(IDLE_COLUMNS, rows)
    print(
        f"  stopped: {idle.stopped_because}; held {idle.held_s:.0f} s: {idle.lost_while_held}"
        f" sockets dropped by the server, {idle.pings_answered} heartbeat pings answered;"
        f" peak RSS {idle.peak_rss_mb:.0f} MB"
    )
    if idle.server_log_problems:
        print(
            f"  !! the server logged {idle.server_log_problems} warnings/errors:"
            f" {idle.server_log_first}"
        )


def print_goals(results: list[FanoutResult], idle: IdleResult | None, drain_s: float) -> None:
    big = [r for r in results if r.devices >= 1000 and r.rate_offered >= 1000]
    if big:
        r = big[-1]
        met = r.latency_p99_ms < 50 and r.delivered_pct >= 99 and r.pushes_acked_per_s >= 990
        print(
            f"goal p99 < 50 ms at {r.devices} devices x {r.rate_offered:.0f} upd/s:"
            f" {'met' if met else 'NOT met'} (p99 {ms(r.latency_p99_ms, drain_s)} ms,"
            f" {r.delivered_pct:.1f}% delivered, {r.pushes_acked_per_s:.0f} pushes/s acked)"
        )
    if idle and idle.steps:
        top = max(idle.steps, key=lambda s: s.open)
        if top.open < 10_000 and idle.stopped_because == "reached the maximum":
            print(f"goal >= 10,000 idle sockets in < 1 GB: not tried (only {top.open} asked)")
            return
        met = top.open >= 10_000 and top.rss_mb < RSS_LIMIT_MB and not idle.lost_while_held
        print(
            f"goal >= 10,000 idle sockets in < 1 GB: {'met' if met else 'NOT met'}"
            f" ({top.open} sockets, {top.rss_mb:.0f} MB)"
        )


def print_profile(summary: dict[str, Any], phase: FanoutResult | None, top: int = 15) -> None:
    print(
        f"\nServer profile at D={summary['devices']} ({summary['samples']} py-spy samples,"
        f" busy cores {summary['busy_cores']}; raw stacks in {summary['raw']})"
    )
    print("threads: " + ", ".join(f"{k} {v}%" for k, v in summary["threads"].items()))
    print("Top functions by own time:")
    for name, share in summary["own"][:top]:
        print(f"  {share:>5.1f}%  {name}")
    print("Where the server's busy time goes (innermost recognised step of each sample):")
    for name, share in summary["steps"]:
        print(f"  {share:>5.1f}%  {name}")
    if phase is not None:
        print(
            "py-spy samples wall time of runnable threads: over the window the server used"
            f" {phase.server_cpu_pct:.0f}% of a core ({phase.server_sys_pct:.0f}% in the kernel)"
            f" and waited {phase.server_wait_pct:.0f}% of a core for a CPU; send() wakes a"
            " client that often preempts the server inside the syscall, so the 'socket send"
            " syscall' share is mostly that wait, not send's own cost."
        )


@dataclass(slots=True)
class BackendRun:
    """Every phase of one backend (database kind and node count)."""

    backend: Backend
    setup: str = ""
    loadavg: str = ""
    results: list[FanoutResult] = field(default_factory=list)
    idle: IdleResult | None = None
    profile: dict[str, Any] | None = None
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def report(args: argparse.Namespace, run: BackendRun) -> dict[str, Any]:
    """Print one backend's tables; its JSON payload."""
    print(
        f"\nfieldsync device-socket fan-out benchmark, {run.backend.label} — load average at"
        f" start {run.loadavg}, {machine_info()['cores']} cores, code {args.code_version}"
    )
    print(f"{run.setup}; writers and receivers spread over the nodes (socket i on node i % N)")
    if run.results:
        print_fanout(run.results, args)
    if run.idle is not None:
        print_idle(run.idle)
    print()
    print_goals(run.results, run.idle, args.drain)
    if run.profile is not None:
        phase = next((r for r in run.results if r.devices == run.profile["devices"]), None)
        print_profile(run.profile, phase)
    for problem in run.failed:
        print(f"!! {problem}")
    print(f"\n{'FAILED' if run.failed else 'ok'} — {run.backend.label}: {run.seconds:.0f} s")
    return {
        "backend": run.backend.key,
        "setup": run.setup,
        "loadavg": run.loadavg,
        "fanout": [_jsonable(asdict(r)) for r in run.results],
        "idle": asdict(run.idle) if run.idle else None,
        "profile": run.profile,
        "failed": run.failed,
        "seconds": run.seconds,
    }


def comparison_rows(
    args: argparse.Namespace, runs: list[BackendRun]
) -> list[tuple[str, list[str]]]:
    """One row per measure, one cell per backend ("-": not measured)."""
    rows: list[tuple[str, list[str]]] = []

    def cells(devices: int, get: Any) -> list[str]:
        found = [next((r for r in run.results if r.devices == devices), None) for run in runs]
        return ["-" if r is None else get(r) for r in found]

    def lat(value: float) -> str:
        return ms(value, args.drain)

    for d in args.device_counts:
        rows.append((f"D={d} receivers ({args.rate:.0f} pushes/s offered)", []))
        rows += [
            ("  pushes acked/s", cells(d, lambda r: f"{r.pushes_acked_per_s:,.0f}")),
            ("  ack p99 ms", cells(d, lambda r: lat(r.ack_p99_ms))),
            ("  deliveries/s", cells(d, lambda r: f"{r.deliveries_per_s:,.0f}")),
            ("  delivered %", cells(d, lambda r: f"{r.delivered_pct:.1f}")),
            ("  latency p50 ms", cells(d, lambda r: lat(r.latency_p50_ms))),
            ("  latency p99 ms", cells(d, lambda r: lat(r.latency_p99_ms))),
            (
                "  cross-node p50 ms",
                cells(d, lambda r: lat(r.remote_p50_ms) if r.nodes > 1 else "-"),
            ),
            (
                "  cross-node p99 ms",
                cells(d, lambda r: lat(r.remote_p99_ms) if r.nodes > 1 else "-"),
            ),
            ("  server CPU % (all nodes)", cells(d, lambda r: f"{r.server_cpu_pct:.0f}")),
            (
                "  postgres CPU %",
                cells(d, lambda r: f"{r.db_cpu_pct:.0f}" if r.db_measured else "-"),
            ),
            ("  server µs/delivery", cells(d, lambda r: f"{r.server_cpu_us_per_delivery:.1f}")),
            (
                "  lost/dup/err/skipped",
                cells(
                    d,
                    lambda r: (
                        f"{r.lost_sockets}/{r.duplicates}/"
                        f"{r.receiver_errors + r.push_errors}/{r.pushes_skipped}"
                    ),
                ),
            ),
        ]
    rows.append(("load avg at start", [r.loadavg.split()[0] if r.loadavg else "-" for r in runs]))
    rows.append(("result", ["FAILED" if r.failed else "ok" for r in runs]))
    return rows


def _jsonable(value: Any) -> Any:
    """Infinity (a latency that never arrived) as the string "inf", for strict JSON readers."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a < 30 s smoke run (D=10,50; idle 500)")
    p.add_argument("--devices", default="10,100,1000", help="receivers per phase, comma-separated")
    p.add_argument("--rate", type=float, default=1000.0, help="pushes (edits) per second, total")
    p.add_argument("--records", type=int, default=100, help="records the writers edit")
    p.add_argument("--writers", type=int, default=10, help="push-only writer sockets")
    p.add_argument("--pad", type=int, default=0, help="bytes added to every edit's remarks")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    p.add_argument("--drain", type=float, default=5.0, help="seconds receivers get to catch up")
    p.add_argument(
        "--max-outstanding",
        type=int,
        default=8,
        help="unacked pushes per writer socket (8 = the server's max_pending_pushes)",
    )
    p.add_argument("--probe", type=int, default=20, help="receivers whose every change is timed")
    p.add_argument(
        "--stall", type=int, default=2, help="receivers that stop reading for a while (0 = none)"
    )
    p.add_argument("--stall-after", type=float, default=2.0, help="seconds into the window")
    p.add_argument("--stall-for", type=float, default=5.0, help="seconds they do not read")
    p.add_argument("--sink-procs", type=int, default=3, help="processes for the other receivers")
    p.add_argument(
        "--sample-every", type=int, default=10, help="time every n-th socket of the sinks"
    )
    p.add_argument(
        "--idle-max",
        type=int,
        default=None,
        help="idle sockets to try (0 = skip; default 10,000, and 0 with --compare)",
    )
    p.add_argument("--idle-procs", type=int, default=4, help="client processes for idle sockets")
    p.add_argument(
        "--idle-hold", type=float, default=40.0, help="seconds to hold the last idle step"
    )
    p.add_argument(
        "--profile-devices",
        type=int,
        default=None,
        help="py-spy the server (node 0) during this D's phase (default: the largest D;"
        " with --compare: never; 0 = never)",
    )
    p.add_argument(
        "--server-src",
        type=Path,
        default=None,
        help="a folder holding server/, storage/, crdt_models/ to run instead (A/B a patch)",
    )
    add_backend_options(p)
    p.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = p.parse_args(argv)
    check_backend_options(p, args)
    if args.idle_max is None:
        args.idle_max = 0 if args.compare else 10_000
    if args.quick:
        args.devices, args.duration, args.warmup, args.drain = "10,50", 2.0, 0.5, 1.0
        args.idle_max, args.idle_hold = min(args.idle_max, 500), 0.0
        args.stall_after, args.stall_for = 0.5, 1.0
    args.device_counts = [int(d) for d in args.devices.split(",") if d.strip()]
    if args.profile_devices is None:
        args.profile_devices = 0 if args.compare else max(args.device_counts, default=0)
    name = "ws_fanout"
    if args.compare:
        name += "_compare"
    elif args.db != "sqlite" or args.nodes > 1:  # keep the SQLite baseline's file
        name += f"_{'sqlite' if args.db == 'sqlite' else 'pg'}_n{args.nodes}"
    args.out = args.out or RESULTS_DIR / f"{name}.json"
    if args.rate <= 0 or args.records < 1 or any(d < 1 for d in args.device_counts):
        p.error("--rate, --records and every D must be positive")
    return args


def run_backend(
    args: argparse.Namespace, databases: Databases, backend: Backend, nofile: int
) -> BackendRun:
    """Every D (fresh nodes and database each), then the idle sockets, on one backend."""
    run = BackendRun(backend, loadavg=loadavg())
    started = time.perf_counter()
    for devices in args.device_counts:
        print(f"phase D={devices} ({backend.label})", flush=True)
        try:
            result, phase_profile = run_fanout(args, devices, nofile, databases, backend.nodes)
        except Exception as exc:  # noqa: BLE001 - reported; the other phases still run
            run.failed.append(f"D={devices}: {type(exc).__name__}: {exc}")
            print(f"  !! {run.failed[-1]}", flush=True)
            continue
        run.setup = databases.describe()
        run.results.append(result)
        run.profile = phase_profile or run.profile
        remote = (
            f", cross-node p99 {ms(result.remote_p99_ms, args.drain)} ms"
            if result.nodes > 1
            else ""
        )
        print(
            f"  -> {result.pushes_acked_per_s:.0f} pushes/s acked,"
            f" {result.deliveries_per_s:.0f} deliveries/s, {result.delivered_pct:.1f}% delivered,"
            f" p50 {ms(result.latency_p50_ms, args.drain)} ms,"
            f" p99 {ms(result.latency_p99_ms, args.drain)} ms{remote},"
            f" server CPU {result.server_cpu_pct:.0f}%",
            flush=True,
        )
    if args.idle_max > 0:
        print(f"idle sockets, up to {args.idle_max} ({backend.label})", flush=True)
        try:
            run.idle = run_idle(args, nofile, databases, backend.nodes)
        except Exception as exc:  # noqa: BLE001
            run.failed.append(f"idle: {type(exc).__name__}: {exc}")
    run.failed += [f"D={r.devices}: {p}" for r in run.results for p in _hard_failures(r)]
    run.seconds = time.perf_counter() - started
    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.loadavg = loadavg()
    args.code_version = code_version()
    nofile = raise_nofile_limit()
    needed = max([*args.device_counts, args.idle_max]) + 200
    if nofile < needed:
        print(f"warning: open-file limit {nofile} < {needed}; some sockets will fail")
    started = time.perf_counter()
    runs, payloads = run_backends(
        args,
        lambda databases, backend: run_backend(args, databases, backend, nofile),
        lambda run: report(args, run),
    )
    payload = results_header(args)
    if args.compare:
        print()
        table = print_side_by_side(
            f"Device-socket fan-out, side by side ({args.writers} writers, {args.rate:.0f}"
            f" pushes/s offered over {args.records} records, {args.duration:.0f} s window;"
            f" sockets spread over the nodes; code {args.code_version})",
            [r.backend.label for r in runs],
            comparison_rows(args, runs),
        )
        payload |= {"table": table, "runs": payloads}
    else:
        payload |= payloads[0]
    failed = any(r.failed for r in runs)
    return finish(args.out, payload, failed, time.perf_counter() - started)


def _hard_failures(r: FanoutResult) -> list[str]:
    """What makes a run FAIL (not merely slow): errors, and lost or duplicated changes."""
    out = []
    if r.push_errors or r.push_first_error:
        out.append(f"push errors: {r.push_first_error}")
    if r.receiver_errors:
        out.append(f"error frames: {r.first_receiver_error}")
    if r.duplicates:
        out.append(f"{r.duplicates} duplicated deliveries")
    if r.connect_failures:
        out.append(f"{r.connect_failures} receivers could not connect")
    return out


if __name__ == "__main__":
    sys.exit(main())
