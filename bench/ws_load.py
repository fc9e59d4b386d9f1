"""The load of the device-socket fan-out benchmark: processes full of device sockets.

The parent (bench/ws_fanout.py) drives each process over a pipe with ``("verb", args...)``
messages and gets ``("verb", payload)`` back; a crash comes back as ``("error", traceback)``.

- *receivers* (probe, stall, sink and idle processes): open N device sockets (hello with
  ``domains: ["activity"]``, caught up), then count and time every ``changes`` frame;
- *writers*: push-only device sockets that create the records and edit them at a fixed rate,
  each edit stamped with the CLOCK_MONOTONIC time it was sent and the node it was pushed to
  (``remarks = "t=<ns>n<node>"``).

With several nodes (``Target.ports``, one per node), socket i of a role talks to node
i % N: writers and receivers are spread over the nodes, so a receiver on one node gets the
edits pushed on another through the nodes' commit notices; receivers time those cross-node
deliveries apart.

Every socket is a ws_client.WsSocket: one asyncio Protocol, no per-frame task or future.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
from common import BASE_TIME, new_task_fields, own_cpu_seconds, percentiles, raise_nofile_limit
from pycrdt import Doc, Map
from ws_client import WsSocket, open_socket

DOMAIN = "activity"
BU = "bu1"
WS_PATH = "/api/v1/ws"
STAMP = re.compile(rb"t=(\d{6,20})(?:n(\d{1,3}))?")  # send time (ns), node pushed to
NS = 1_000_000_000
NEVER = 1 << 62  # a window bound no stamp reaches

# ---------------------------------------------------------------------------------------
# child processes and the parent's handle on them
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int  # node 0
    tenant: str
    token: str
    ports: tuple[int, ...] = ()  # every node's (default: just `port`)

    @property
    def nodes(self) -> int:
        return len(self.ports) or 1

    def node_of(self, index: int) -> int:
        """The node device `index` of a role talks to: index % N."""
        return index % self.nodes

    def port_for(self, index: int) -> int:
        return self.ports[self.node_of(index)] if self.ports else self.port


@dataclass(frozen=True, slots=True)
class Window:
    """CLOCK_MONOTONIC ns: load starts at t0, is measured in [t1, t2), drains until end."""

    t0: int
    t1: int
    t2: int
    end: int


def sleep_until(ns: int) -> float:
    return max(0.0, (ns - time.monotonic_ns()) / NS)


class Child:
    """A spawned process driven over a pipe: ("verb", ...) in, ("verb", payload) out."""

    def __init__(self, ctx: Any, target: Callable[..., None], config: Any, name: str) -> None:
        self.name = name
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(config, child_end), daemon=True, name=name)
        self.proc.start()
        child_end.close()

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def expect(self, verb: str, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"{self.name}: no {verb!r} within {timeout_s:.0f} s")
        got, payload = self.conn.recv()
        if got == "error":
            raise RuntimeError(f"{self.name} failed:\n{payload}")
        if got != verb:
            raise RuntimeError(f"{self.name}: expected {verb!r}, got {got!r}")
        return payload

    def ask(self, verb: str, timeout_s: float, *args: Any) -> Any:
        self.send(verb, *args)
        return self.expect(verb, timeout_s)

    def stop(self) -> None:
        """Ask it to close its sockets and exit; terminate it (by its own PID) if it lingers."""
        try:
            self.ask("stop", 30)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)


def child_entry(run: Callable[[Any, Any], Any], config: Any, conn: Any) -> None:
    """Run `run(config, conn)` in a fresh event loop; report a crash to the parent."""
    raise_nofile_limit()
    try:
        asyncio.run(run(config, conn))
    except Exception:  # noqa: BLE001 - the parent prints it and fails the phase
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass


async def next_command(conn: Any) -> tuple[Any, ...]:
    message: tuple[Any, ...] = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    return message


def frame_bytes(frame: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(frame)
    return packed


# ---------------------------------------------------------------------------------------
# receivers: probe, sink and idle processes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    role: str  # "probe" | "stall" | "sink" | "idle"
    target: Target
    sample_every: int  # latency on every n-th socket (1 = all; 0 = none)
    first_index: int  # device numbers are unique across processes
    connect_concurrency: int = 64
    stall: tuple[float, float] | None = None  # stop reading (s after t1, for s seconds)


@dataclass(slots=True)
class ReceiverStats:
    role: str
    sockets: int = 0
    sampled_sockets: int = 0
    connect_failures: int = 0
    first_failure: str | None = None
    connect_s: float = 0.0
    catchup_frames: int = 0
    frames: int = 0
    changes: int = 0
    pages: int = 0  # has_more frames after the catch-up: a receiver paging the log
    bytes_in: int = 0
    edits_seen: int = 0
    edits_window: int = 0  # edits stamped inside the window, received by the end of the drain
    sampled_window: int = 0  # the same, on sampled sockets only
    sampled_by_node: list[int] = field(default_factory=list)  # sampled sockets per node
    remote_window: int = 0  # sampled edits of the window pushed on another node
    arrived_window: int = 0  # edits that arrived during the window (any stamp)
    frames_window: int = 0
    max_edits_per_frame: int = 0
    duplicates: int = 0
    stall_server_queued_bytes: int = 0  # the server's kernel send queue when a stall ended
    error_frames: int = 0
    first_error: str | None = None
    lost: int = 0  # sockets the server closed
    close_codes: dict[str, int] = field(default_factory=dict)
    pings: int = 0
    cpu_s: float = 0.0
    loop_lag_p99_ms: float = 0.0
    loop_lag_max_ms: float = 0.0
    latencies_ms: bytes = b""  # array('f') of the sampled sockets' latencies
    remote_latencies_ms: bytes = b""  # the same, of edits pushed on another node only


class DeviceState:
    __slots__ = ("caught_up", "node", "sampled", "seen")

    def __init__(self, sampled: bool, node: int) -> None:
        self.caught_up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sampled = sampled
        self.node = node  # the node this socket talks to
        self.seen: set[int] | None = set() if sampled else None


class Receivers:
    """Many receiving devices in one process; counts and times what they are sent."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.stats = ReceiverStats(config.role)
        self.sockets: list[WsSocket] = []
        self.window = Window(NEVER, NEVER, NEVER, NEVER)
        self.latencies = array("f")
        self.remote_latencies = array("f")
        self.stats.sampled_by_node = [0] * config.target.nodes
        self.lags: list[float] = []
        self._closing = False

    # -- connecting ---------------------------------------------------------------

    async def connect(self, count: int) -> dict[str, Any]:
        started = time.perf_counter()
        limit = asyncio.Semaphore(self.config.connect_concurrency)
        first = len(self.sockets)
        results = await asyncio.gather(*(self._connect_one(first + i, limit) for i in range(count)))
        self.stats.connect_s += time.perf_counter() - started
        opened = sum(results)
        return {
            "opened": opened,
            "failed": count - opened,
            "open": sum(1 for s in self.sockets if s.is_open),
            "first_failure": self.stats.first_failure,
            "seconds": time.perf_counter() - started,
        }

    async def _connect_one(self, index: int, limit: asyncio.Semaphore) -> bool:
        every = self.config.sample_every
        target = self.config.target
        device = self.config.first_index + index
        state = DeviceState(sampled=every > 0 and index % every == 0, node=target.node_of(device))
        async with limit:
            try:
                sock = await open_socket(
                    target.host, target.port_for(device), WS_PATH, self._on_frame
                )
                sock.tag = state
                sock.send(self._hello(index))
                async with asyncio.timeout(60):
                    await state.caught_up
            except Exception as exc:  # noqa: BLE001 - counted, and the parent decides
                self.stats.connect_failures += 1
                self.stats.first_failure = (
                    self.stats.first_failure or f"{type(exc).__name__}: {exc}"
                )
                return False
        self.sockets.append(sock)
        self.stats.sockets += 1
        self.stats.sampled_sockets += state.sampled
        self.stats.sampled_by_node[state.node] += state.sampled
        return True

    def _hello(self, index: int) -> bytes:
        device = f"{self.config.role}-{self.config.first_index + index}"
        return frame_bytes(
            {"t": "hello", "token": self.config.target.token, "device": device, "domains": [DOMAIN]}
        )

    # -- receiving ----------------------------------------------------------------

    def _on_frame(self, sock: WsSocket, payload: bytes, now: int) -> None:
        frame = msgpack.unpackb(payload)
        kind = frame.get("t")
        if kind == "changes":
            self._on_changes(sock, frame, now)
        elif kind == "error":
            self.stats.error_frames += 1
            self.stats.first_error = self.stats.first_error or str(frame)

    def _on_changes(self, sock: WsSocket, frame: dict[str, Any], now: int) -> None:
        st, state = self.stats, sock.tag
        assert isinstance(state, DeviceState)
        if not state.caught_up.done():
            st.catchup_frames += 1
            if not frame["has_more"]:
                state.caught_up.set_result(None)
            return
        st.frames += 1
        st.changes += len(frame["changes"])
        st.pages += frame["has_more"]
        edits = self._on_stamps(state, frame["changes"], now)
        st.edits_seen += edits
        st.max_edits_per_frame = max(st.max_edits_per_frame, edits)
        w = self.window
        if w.t1 <= now < w.t2:
            st.frames_window += 1
            st.arrived_window += edits

    def _on_stamps(self, state: DeviceState, changes: list[dict[str, Any]], now: int) -> int:
        t1, t2 = self.window.t1, self.window.t2
        edits = 0
        for change in changes:
            for stamp, node in STAMP.findall(change["update"]):
                edits += 1
                sent = int(stamp)
                if not t1 <= sent < t2:
                    continue
                self.stats.edits_window += 1
                if state.seen is not None:
                    if sent in state.seen:
                        self.stats.duplicates += 1
                        continue
                    state.seen.add(sent)
                    self.stats.sampled_window += 1
                    latency = (now - sent) / 1e6
                    self.latencies.append(latency)
                    if node and int(node) != state.node:
                        self.stats.remote_window += 1
                        self.remote_latencies.append(latency)
        return edits

    # -- the measured window ------------------------------------------------------

    async def measure(self, window: Window) -> None:
        """Client CPU over [t1, t2) and the event loop's lag (how late a 20 ms timer fires)."""
        self.window = window
        stalling = asyncio.create_task(self._stall(window)) if self.config.stall else None
        await asyncio.sleep(sleep_until(window.t1))
        cpu0 = own_cpu_seconds()
        while time.monotonic_ns() < window.t2:
            before = time.monotonic()
            await asyncio.sleep(0.02)
            self.lags.append((time.monotonic() - before - 0.02) * 1000)
        self.stats.cpu_s = own_cpu_seconds() - cpu0
        if stalling is not None:
            await stalling

    async def _stall(self, window: Window) -> None:
        """Stop reading every socket for a while: the server must drop them to log paging."""
        assert self.config.stall is not None
        after_s, for_s = self.config.stall
        await asyncio.sleep(sleep_until(window.t1 + int(after_s * NS)))
        transports = [s.transport for s in self.sockets if s.transport is not None]
        for transport in transports:
            transport.pause_reading()
        await asyncio.sleep(for_s)
        queued = [self._server_send_queue(s) for s in self.sockets]
        self.stats.stall_server_queued_bytes = max(queued, default=0)
        for transport in transports:
            if not transport.is_closing():
                transport.resume_reading()

    def _server_send_queue(self, sock: WsSocket) -> int:
        """Bytes the server's kernel holds for this socket, unsent (`ss` Send-Q), or -1."""
        if sock.transport is None:
            return -1
        client_port = sock.transport.get_extra_info("sockname")[1]
        query = f"( sport = :{sock.port} and dport = :{client_port} )"
        try:
            out = subprocess.run(
                ["ss", "-tnH", query], capture_output=True, text=True, timeout=5
            ).stdout.split()
            return int(out[2])  # State Recv-Q Send-Q ...
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            return -1

    def report(self) -> dict[str, Any]:
        st = self.stats
        st.bytes_in = sum(s.bytes_in for s in self.sockets)
        st.pings = sum(s.pings for s in self.sockets)
        lost = [s for s in self.sockets if s.lost.done()]
        st.lost = len(lost)
        st.close_codes = dict(Counter(str(s.close_code) for s in lost))
        p99, top = percentiles(self.lags, (0.99, 1.0))
        st.loop_lag_p99_ms, st.loop_lag_max_ms = p99, top
        st.latencies_ms = self.latencies.tobytes()
        st.remote_latencies_ms = self.remote_latencies.tobytes()
        return asdict(st)

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()


async def receivers_run(config: ReceiverConfig, conn: Any) -> None:
    """Commands: connect N | go WINDOW | report | stop."""
    receivers = Receivers(config)
    measuring: asyncio.Task[None] | None = None
    while True:
        verb, *args = await next_command(conn)
        if verb == "connect":
            conn.send(("connect", await receivers.connect(args[0])))
        elif verb == "go":
            measuring = asyncio.create_task(receivers.measure(args[0]))
        elif verb == "report":
            if measuring is not None:
                await measuring
            conn.send(("report", receivers.report()))
        elif verb == "stop":
            receivers.close_all()
            await asyncio.sleep(0.2)
            conn.send(("stop", None))
            return


def receivers_main(config: ReceiverConfig, conn: Any) -> None:
    child_entry(receivers_run, config, conn)


# ---------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriterConfig:
    target: Target
    writers: int
    records: int
    rate: float
    max_outstanding: int
    pad: int = 0
    seed: int = 7


@dataclass(slots=True)
class WriterStats:
    writers: int = 0
    records: int = 0
    create_s: float = 0.0
    sent: int = 0
    acked: int = 0
    sent_window: int = 0
    acked_window: int = 0
    acked_window_by_node: list[int] = field(default_factory=list)  # by the node pushed to
    skipped_window: int = 0  # due but not sent: the writer had max_outstanding unacked pushes
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    first_error: str | None = None
    unanswered: int = 0
    lost: int = 0
    cpu_s: float = 0.0
    ack_latencies_ms: bytes = b""


class Record:
    """One record a writer owns: its Yjs doc and the update of its last edit."""

    __slots__ = ("doc", "fields", "last", "record_id")

    def __init__(self, record_id: str, client_id: int) -> None:
        self.record_id = record_id
        self.doc: Doc[Any] = Doc(client_id=client_id)
        self.fields = self.doc.get("fields", type=Map)
        self.last = b""
        self.doc.observe(self._keep)

    def _keep(self, event: Any) -> None:
        self.last = event.update

    def edit(self, values: dict[str, Any]) -> bytes:
        with self.doc.transaction():
            for k, v in values.items():
                self.fields[k] = v
        return self.last


class Writers:
    """Push-only devices that create the records, then edit them at a fixed total rate."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.stats = WriterStats(writers=config.writers, records=config.records)
        self.stats.acked_window_by_node = [0] * config.target.nodes
        self.sockets: list[WsSocket] = []
        self.records: list[tuple[int, Record]] = []  # (writer number, record)
        self.pending: dict[int, tuple[int, int]] = {}  # push id -> (stamp ns, writer)
        self.outstanding = [0] * config.writers
        self.window = Window(NEVER, NEVER, NEVER, NEVER)
        self.ack_latencies = array("f")
        self.next_id = 0
        self.padding = " " + "x" * (config.pad - 1) if config.pad > 0 else ""
        self.all_acked = asyncio.Event()

    async def open(self) -> None:
        t = self.config.target
        for w in range(self.config.writers):  # writer w pushes to node w % N
            sock = await open_socket(t.host, t.port_for(w), WS_PATH, self._on_frame)
            hello = {"t": "hello", "token": t.token, "device": f"writer-{w}", "domains": []}
            sock.send(frame_bytes(hello))
            self.sockets.append(sock)

    async def create_records(self) -> None:
        started = time.perf_counter()
        rng = random.Random(self.config.seed)
        for r in range(self.config.records):
            writer = r % self.config.writers
            record = Record(f"00000000-0000-4000-8000-{r:012d}", 50_000_000 + writer)
            self.records.append((writer, record))
            plan = BASE_TIME + rng.randrange(0, 90 * 86400, 900)
            self._push(writer, record, record.edit(new_task_fields(rng, r, plan)), 0)
        await self.drained(120)
        if self.stats.acked != self.config.records:
            raise RuntimeError(f"creating the records failed: {self.stats}")
        self.stats.create_s = time.perf_counter() - started
        self.stats.sent = self.stats.acked = 0
        self.stats.statuses.clear()

    def _push(self, writer: int, record: Record, update: bytes, stamp: int) -> None:
        self.next_id += 1
        self.pending[self.next_id] = (stamp, writer)
        self.outstanding[writer] += 1
        self.stats.sent += 1
        self.all_acked.clear()
        item = {"record_id": record.record_id, "bu": BU, "update": update}
        frame = {"t": "push", "id": self.next_id, "domain": DOMAIN, "items": [item]}
        self.sockets[writer].send(frame_bytes(frame))

    def _on_frame(self, sock: WsSocket, payload: bytes, now: int) -> None:
        frame = msgpack.unpackb(payload)
        kind = frame.get("t")
        if kind not in ("ack", "error"):
            return
        stamp, writer = self.pending.pop(frame.get("id"), (0, -1))
        if writer >= 0:
            self.outstanding[writer] -= 1
        if not self.pending:
            self.all_acked.set()
        st = self.stats
        if kind == "error":
            st.errors += 1
            st.first_error = st.first_error or str(frame)
            return
        status = frame["results"][0]["status"]
        st.statuses[status] = st.statuses.get(status, 0) + 1
        if status not in ("created", "merged"):
            st.first_error = st.first_error or str(frame["results"][0])
            return
        st.acked += 1
        if self.window.t1 <= stamp < self.window.t2:
            st.acked_window += 1
            st.acked_window_by_node[self.config.target.node_of(writer)] += 1
            self.ack_latencies.append((now - stamp) / 1e6)

    async def drained(self, timeout_s: float) -> None:
        if self.pending:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.all_acked.wait()
            except TimeoutError:
                pass

    async def load(self, window: Window) -> None:
        """Edit records round-robin at the configured rate from t0 to t2, paced by the clock."""
        self.window = window
        await asyncio.sleep(sleep_until(window.t0))
        rate, n, due_count, k = self.config.rate, len(self.records), 0, 0
        cpu0 = own_cpu_seconds()
        while (now := time.monotonic_ns()) < window.t2:
            due_count = int((now - window.t0) * rate / NS)
            while k < due_count:
                writer, record = self.records[k % n]
                k += 1
                self._edit_and_push(writer, record, window)
            await asyncio.sleep(0.001)
        await self.drained(sleep_until(window.end))
        self.stats.cpu_s = own_cpu_seconds() - cpu0

    def _edit_and_push(self, writer: int, record: Record, window: Window) -> None:
        stamp = time.monotonic_ns()
        in_window = window.t1 <= stamp < window.t2
        if self.outstanding[writer] >= self.config.max_outstanding:
            self.stats.skipped_window += in_window
            return
        self.stats.sent_window += in_window
        remarks = f"t={stamp}n{self.config.target.node_of(writer)}" + self.padding
        self._push(writer, record, record.edit({"remarks": remarks}), stamp)

    def report(self) -> dict[str, Any]:
        self.stats.unanswered = len(self.pending)
        self.stats.lost = sum(1 for s in self.sockets if s.lost.done())
        self.stats.ack_latencies_ms = self.ack_latencies.tobytes()
        return asdict(self.stats)


async def writers_run(config: WriterConfig, conn: Any) -> None:
    """ready (records created) -> go WINDOW -> report -> stop."""
    writers = Writers(config)
    await writers.open()
    await writers.create_records()
    conn.send(("ready", asdict(writers.stats)))
    loading: asyncio.Task[None] | None = None
    while True:
        verb, *args = await next_command(conn)
        if verb == "go":
            loading = asyncio.create_task(writers.load(args[0]))
        elif verb == "report":
            if loading is not None:
                await loading
            conn.send(("report", writers.report()))
        elif verb == "stop":
            for sock in writers.sockets:
                sock.close()
            conn.send(("stop", None))
            return


def writers_main(config: WriterConfig, conn: Any) -> None:
    child_entry(writers_run, config, conn)
