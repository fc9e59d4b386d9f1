"""Fan-out of committed changes to live subscribers.

The pipeline publishes each commit's log entries here, after the commit. A
subscriber never gets more than a bounded buffer: one that falls behind is told so
and catches up by reading the log from its cursor, the same path an offline device
takes. Publishing is synchronous and never blocks on a slow client.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from storage.types import LogEntry, NodeId, RecordKey

from .auth import Principal


@dataclass(frozen=True, slots=True)
class BufferLimits:
    max_entries: int = 2000
    max_bytes: int = 4 << 20


@dataclass(eq=False)
class Feed:
    """One subscriber's view of one scope: committed entries past its cursor, bounded."""

    tenant: str
    domain: str
    bus: frozenset[str] | None
    device: str | None
    limits: BufferLimits
    wakeup: asyncio.Event
    record_id: str | None = None
    clock: dict[NodeId, int] = field(default_factory=dict)
    buffer: deque[LogEntry] = field(default_factory=deque)
    buffered_bytes: int = 0
    behind: bool = True  # starts by paging from its cursor
    overflows: int = 0

    def covered(self, entries: Sequence[LogEntry]) -> Sequence[LogEntry]:
        bus = self.bus
        return entries if bus is None else [e for e in entries if e.bu in bus]

    def offer(self, entries: Sequence[LogEntry], size: int) -> None:
        """Buffer committed entries (`size`: their update bytes), or fall behind past the limits."""
        if not entries:
            return
        self.wakeup.set()
        if self.behind:
            return
        self.buffer.extend(entries)
        self.buffered_bytes += size
        limits = self.limits
        if len(self.buffer) > limits.max_entries or self.buffered_bytes > limits.max_bytes:
            self.overflows += 1
            self.fall_behind()

    def fall_behind(self) -> None:
        """Drop the buffer: the next read pages from the log at the cursor instead."""
        self.buffer.clear()
        self.buffered_bytes = 0
        self.behind = True

    def take(self) -> list[LogEntry]:
        """Buffered entries past the cursor, oldest first; the cursor moves past them."""
        taken = [e for e in self.buffer if e.position.seq > self.clock.get(e.position.node_id, 0)]
        self.buffer.clear()
        self.buffered_bytes = 0
        self.advance(taken)
        return taken

    def advance(self, entries: Iterable[LogEntry]) -> None:
        for e in entries:
            node, seq = e.position
            if seq > self.clock.get(node, 0):
                self.clock[node] = seq

    def is_echo(self, entry: LogEntry) -> bool:
        """A device's own pushes are not sent back to it; compensations are."""
        return self.device is not None and entry.device == self.device and entry.origin == "device"


class FrameCache:
    """The last few encoded `changes` frames, shared by every subscriber that needs one."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._frames: OrderedDict[Hashable, bytes] = OrderedDict()
        self.hits = 0

    def get(self, key: Hashable) -> bytes | None:
        frame = self._frames.get(key)
        if frame is not None:
            self.hits += 1
        return frame

    def put(self, key: Hashable, frame: bytes) -> None:
        self._frames[key] = frame
        if len(self._frames) > self._size:
            self._frames.popitem(last=False)


class Hub:
    """Routes each committed entry to the feeds of its scope and of its record."""

    def __init__(self) -> None:
        self._feeds: dict[tuple[str, ...], set[Feed]] = {}
        self.frames = FrameCache()

    def subscribe(self, feed: Feed) -> None:
        self._feeds.setdefault(_key(feed), set()).add(feed)

    def unsubscribe(self, feed: Feed) -> None:
        key = _key(feed)
        feeds = self._feeds.get(key)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._feeds[key]

    def publish(self, entries: Sequence[LogEntry]) -> None:
        """Offer one commit's entries to every feed of their scope and of their record."""
        by_key: dict[tuple[str, ...], list[LogEntry]] = {}
        for entry in entries:
            record = entry.key
            by_key.setdefault((record.tenant, record.domain), []).append(entry)
            by_key.setdefault(record, []).append(entry)
        for key, group in by_key.items():
            feeds = self._feeds.get(key)
            if not feeds:
                continue
            size = sum(len(e.update) for e in group)
            for feed in feeds:
                shown = feed.covered(group)
                feed.offer(shown, size if shown is group else sum(len(e.update) for e in shown))

    def feed_count(self) -> int:
        return sum(len(feeds) for feeds in self._feeds.values())


def _key(feed: Feed) -> tuple[str, ...]:
    """A scope feed listens to (tenant, domain); a record feed to its RecordKey."""
    if feed.record_id is not None:
        return RecordKey(feed.tenant, feed.domain, feed.record_id)
    return (feed.tenant, feed.domain)


def scope_feed(
    principal: Principal,
    domain: str,
    device: str | None,
    wakeup: asyncio.Event,
    limits: BufferLimits,
) -> Feed:
    return Feed(principal.tenant, domain, principal.bus, device, limits, wakeup)
