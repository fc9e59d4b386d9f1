"""Live records: the in-memory Yjs doc of each record, loaded once and shared.

Each record is loaded exactly once however many requests ask for it at the same
time (single flight). Requests pin what they use so it is not evicted under them.
A record whose doc failed, or whose commit failed, is *poisoned*: it leaves the
cache, and the next request reloads it from storage once every in-flight commit that
touched it has settled, so the reload sees exactly what became durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Subscription, TransactionEvent, merge_updates

from crdt_models import record as records
from crdt_models.registry import get_model
from crdt_models.written import DocPlaces
from crdt_models.yupdate import MalformedUpdate, inspect_update
from storage import RecordKey, Store
from storage.types import LogEntry, StoredRecord

from .errors import ApiError, ErrorCode
from .gate import DocFailed, apply_update, contained, state_of

log = logging.getLogger(__name__)


MAX_HELD_PENDING = 256  # per record; more stay in the log and integrate on the next load


def digest(update: bytes) -> bytes:
    return hashlib.blake2b(update, digest_size=16).digest()


@dataclass(eq=False, slots=True)
class LiveRecord:
    key: RecordKey
    doc: Doc[Any]
    bu: str | None = None
    version: int = 0
    exists: bool = False
    state: records.RecordState | None = None
    pending: dict[bytes, bytes] = field(default_factory=dict)  # digest -> update missing parents
    captured: list[bytes] = field(default_factory=list)
    sv: dict[int, int] | None = field(default_factory=dict)  # decoded state vector, None: stale
    tail: int = 0  # log entries not yet folded into the stored snapshot
    pins: int = 0
    poisoned: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    subscription: Subscription | None = None
    places: DocPlaces | None = None  # built the first time a rule needs it (rarely)

    def apply(self, update: bytes) -> dict[int, int]:
        """Apply an update (DocFailed if pycrdt fails) and return the new state vector.

        Updates still waiting for causal parents are applied again whenever the state
        vector moves: yrs 0.28 (pycrdt 0.14.13) can drop a waiting struct when its parent
        arrives after a later struct of the same writer — a second apply integrates it.
        """
        before = self.state_vector()
        apply_update(self.doc, update)
        self.sv = state_of(self.doc)
        if self.pending and self.sv != before:
            self._retry_pending()
        return self.sv

    def item_places(self) -> DocPlaces:
        """Where the doc's items live, kept across merges (``crdt_models.written``)."""
        if self.places is None:
            self.places = DocPlaces()
        return self.places

    def capture(self, event: TransactionEvent) -> None:
        """The doc's observer (a bound method: a closure would cost every cached record
        two more objects for the garbage collector to walk)."""
        self.captured.append(event.update)

    def hold_pending(self, update: bytes) -> None:
        if len(self.pending) < MAX_HELD_PENDING:
            self.pending[digest(update)] = update

    def _retry_pending(self) -> None:
        for _ in range(len(self.pending)):
            waiting = [u for u in self.pending.values() if _adds_beyond(u, self.state_vector())]
            self.pending = {digest(u): u for u in waiting}
            before = self.state_vector()
            for update in waiting:
                apply_update(self.doc, update)
            self.sv = state_of(self.doc)
            if self.sv == before:
                return

    def state_vector(self) -> dict[int, int]:
        if self.sv is None:
            self.sv = state_of(self.doc)
        return self.sv

    def release(self) -> None:
        """Drop the doc's observer: pycrdt keeps an observed doc alive (and its memory) forever."""
        if self.subscription is not None:
            self.doc.unobserve(self.subscription)
            self.subscription = None

    def take_captured(self) -> bytes | None:
        """The integrated delta of the transactions since the last call (None: nothing changed)."""
        changes = [u for u in self.captured if u != b"\x00\x00"]
        self.captured.clear()
        if not changes:
            return None
        if len(changes) == 1:
            return changes[0]
        merged: bytes = merge_updates(*changes)
        return merged


class RecordUnavailable(Exception):
    """The stored record could not be rebuilt into a doc (logged; never expected)."""


class LiveRecords:
    def __init__(self, store: Store, client_id: int, capacity: int) -> None:
        self._store = store
        self._client_id = client_id
        self._capacity = capacity
        self._live: OrderedDict[RecordKey, LiveRecord] = OrderedDict()
        self._loading: dict[RecordKey, asyncio.Future[LiveRecord]] = {}
        self._settling: dict[RecordKey, LiveRecord] = {}
        self.other_writers = False  # set once another node writes the same database

    def __len__(self) -> int:
        return len(self._live)

    async def pin_many(self, keys: Iterable[RecordKey]) -> dict[RecordKey, LiveRecord]:
        """The live records of `keys` (new empty ones for records not stored), pinned.

        A record whose stored state cannot be rebuilt is left out of the answer.
        """
        wanted = list(dict.fromkeys(keys))
        failed: set[RecordKey] = set()
        while True:
            await self._await_settling(wanted)
            missing = [k for k in wanted if k not in self._live and k not in self._loading]
            if missing:
                failed |= await self._load(missing)
            for key in wanted:
                if key in self._loading:
                    try:
                        await self._loading[key]
                    except RecordUnavailable:
                        failed.add(key)
            # no await from here on: what is live now is what gets pinned
            if all(k in self._live or k in failed for k in wanted):
                return self._pin([k for k in wanted if k not in failed])

    async def pin_current(self, keys: list[RecordKey]) -> dict[RecordKey, LiveRecord]:
        """`pin_many`, reloading any record another node has written past our copy.

        Without this, a device that wrote through one node and then syncs through
        another could be answered from a copy that lacks its own acknowledged write.
        """
        recs = await self.pin_many(keys)
        if not self.other_writers or not recs:
            return recs
        for _ in range(2):
            stored = await self._store.record_versions(recs)
            stale = [r for k, r in recs.items() if stored.get(k, 0) > r.version]
            if not stale:
                break
            for rec in stale:
                self.poison(rec)
            self.unpin(recs.values())
            recs = await self.pin_many(keys)
        return recs

    def _pin(self, keys: list[RecordKey]) -> dict[RecordKey, LiveRecord]:
        out = {}
        for key in keys:
            rec = self._live[key]
            rec.pins += 1
            rec.settled.clear()
            self._live.move_to_end(key)
            out[key] = rec
        self._evict()
        return out

    def unpin(self, recs: Iterable[LiveRecord]) -> None:
        for rec in recs:
            rec.pins -= 1
            if rec.pins == 0:
                rec.settled.set()
                if rec.poisoned:
                    self._settling.pop(rec.key, None)
                    rec.release()
        self._evict()

    def poison(self, rec: LiveRecord) -> None:
        """Discard the doc: the next request reloads the record from storage."""
        if rec.poisoned:
            return
        log.warning("discarding the in-memory doc of %s", rec.key)
        rec.poisoned = True
        if self._live.get(rec.key) is rec:
            del self._live[rec.key]
        if rec.pins > 0:
            rec.settled.clear()
            self._settling[rec.key] = rec
        else:
            rec.release()

    async def _await_settling(self, keys: list[RecordKey]) -> None:
        for key in keys:
            rec = self._settling.get(key)
            if rec is not None:
                await rec.settled.wait()

    async def _load(self, keys: list[RecordKey]) -> set[RecordKey]:
        """Load records into the cache (empty ones if not stored); returns those that failed."""
        loop = asyncio.get_running_loop()
        futures = {k: loop.create_future() for k in keys}
        self._loading.update(futures)
        failed: set[RecordKey] = set()
        try:
            stored = await self._store.load_records(keys)
            for key, fut in futures.items():
                try:
                    rec = self._build(key, stored.get(key))
                except RecordUnavailable as exc:
                    failed.add(key)
                    _resolve(fut, exc)
                    continue
                self._live[key] = rec
                fut.set_result(rec)
        except BaseException as exc:
            for fut in futures.values():
                _resolve(fut, exc)
            raise
        finally:
            for key in keys:
                self._loading.pop(key, None)
        return failed

    def _new(self, key: RecordKey) -> LiveRecord:
        doc = records.new_doc(client_id=self._client_id)
        rec = LiveRecord(key=key, doc=doc)
        rec.subscription = doc.observe(rec.capture)
        return rec

    def _build(self, key: RecordKey, stored: StoredRecord | None) -> LiveRecord:
        rec = self._new(key)
        if stored is None:
            return rec
        updates = [stored.row.snapshot] if stored.row.snapshot else []
        updates += [e.update for e in stored.tail]
        try:
            # one merged update: applying a log tail one by one in log order can hit the
            # yrs pending-struct loss that LiveRecord.apply works around
            if updates:
                apply_update(rec.doc, _merged(updates))
            sv = state_of(rec.doc)
        except DocFailed as exc:
            log.error("stored record %s does not load: %s", key, exc)
            raise RecordUnavailable(str(key)) from exc
        rec.captured.clear()
        rec.sv, rec.tail = sv, len(stored.tail)
        rec.bu, rec.version, rec.exists = stored.row.bu, stored.row.version, True
        rec.state = records.read_state(rec.doc, get_model(key.domain))
        for entry in stored.tail:
            if _adds_beyond(entry.update, sv):
                rec.hold_pending(entry.update)
        return rec

    async def state_vector(self, key: RecordKey) -> bytes:
        """The record's current state vector (empty for a record not yet written)."""
        return await self._read(key, lambda rec: rec.doc.get_state())

    async def full_state(self, key: RecordKey) -> bytes:
        """The record's whole state as one update."""
        return await self._read(key, lambda rec: rec.doc.get_update())

    async def _read(self, key: RecordKey, read: Callable[[LiveRecord], bytes]) -> bytes:
        recs = await self.pin_current([key])
        try:
            rec = recs.get(key)
            if rec is None or rec.poisoned:
                raise ApiError(ErrorCode.STORAGE_UNAVAILABLE, "the record cannot be loaded")
            return contained("read a record", read, rec)
        except DocFailed:
            self.poison(recs[key])
            raise ApiError(ErrorCode.STORAGE_UNAVAILABLE, "the record is reloading") from None
        finally:
            self.unpin(recs.values())

    def refresh(self, entries: Sequence[LogEntry]) -> None:
        """Bring cached docs forward by entries another node committed.

        Their rules already ran on that node, so the updates are applied as they are. A
        cached record they do not continue exactly (it missed some of its history) is
        discarded and reloads; a local merge based on the old state fails its commit
        with a conflict and merges again.
        """
        for key, group in _by_record(entries).items():
            rec = self._live.get(key)
            if rec is None or rec.poisoned:
                continue
            newer = [e for e in group if e.version > rec.version]
            if not newer:
                continue
            if not _continues(rec.version, newer) or not self._take_remote(rec, newer):
                self.poison(rec)

    @staticmethod
    def _take_remote(rec: LiveRecord, entries: list[LogEntry]) -> bool:
        try:
            for entry in entries:
                if _adds_beyond(entry.update, rec.apply(entry.update)):
                    rec.hold_pending(entry.update)
            rec.take_captured()
            rec.state = records.read_state(rec.doc, get_model(rec.key.domain))
        except DocFailed:
            return False
        rec.version, rec.exists, rec.bu = entries[-1].version, True, entries[-1].bu
        rec.tail += len(entries)
        return True

    def folded(self, key: RecordKey, entries: int) -> None:
        """Compaction folded `entries` of the record's tail into its snapshot."""
        rec = self._live.get(key)
        if rec is not None:
            rec.tail = max(0, rec.tail - entries)

    def _evict(self) -> None:
        excess = len(self._live) - self._capacity
        if excess <= 0:
            return
        unpinned = (k for k, r in self._live.items() if r.pins == 0)
        for key in list(itertools.islice(unpinned, excess)):
            self._live.pop(key).release()


def _resolve(fut: asyncio.Future[LiveRecord], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: each waiter re-raises it itself


def _by_record(entries: Sequence[LogEntry]) -> dict[RecordKey, list[LogEntry]]:
    grouped: dict[RecordKey, list[LogEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.key, []).append(entry)
    return grouped


def _continues(version: int, entries: list[LogEntry]) -> bool:
    """Whether entries follow `version` with no gap (an update and its compensation share one)."""
    if entries[0].version != version + 1:
        return False
    return all(b.version - a.version in (0, 1) for a, b in itertools.pairwise(entries))


def _merged(updates: list[bytes]) -> bytes:
    if len(updates) == 1:
        return updates[0]
    merged: bytes = contained("merge_updates", merge_updates, *updates)
    return merged


def _adds_beyond(update: bytes, state: dict[int, int]) -> bool:
    try:
        return bool(inspect_update(update).adds_beyond(state))
    except MalformedUpdate:
        return False
