"""The merge pipeline.

decode -> authorize -> load -> apply -> constrain -> persist -> answer -> fan out.

`Pipeline.push` is the one path every device update takes (HTTP batch push, the device
socket and the Yjs socket). A request checks and merges its items in time slices
(`server.slices`), and between slices other requests run. It merges in its tenant's
turn: one request of a tenant at a time, so tenants take turns slice by slice however
many requests one of them has in flight, and one tenant's large push does not hold the
others behind it. The batch is handed to the store in the same step that gives the turn
back, so merges of a record commit in the order they were made.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from crdt_models import constraints
from crdt_models import record as records
from crdt_models.context import RuleSettings
from crdt_models.registry import get_model
from crdt_models.schema import DomainModel
from crdt_models.written import WrittenValues
from crdt_models.yupdate import UpdateShape, encode_state_vector
from storage import RecordConflict, RecordKey, StorageUnavailable, Store
from storage.types import (
    ClientClaim,
    IdempotencyWrite,
    LogEntry,
    NewEntry,
    NodeInfo,
    Position,
    QuarantineItem,
    RecordWrite,
    WriteBatch,
)

from .errors import ApiError, ErrorCode, ItemError
from .gate import DocFailed, UpdateGate, diff
from .keyed_locks import KeyedLocks
from .live import LiveRecord, LiveRecords, digest
from .merge_types import Actor, ItemResult, PushItem
from .ownership import ClientOwners
from .ratelimit import Buckets, Rate, RateSettings
from .slices import SLICE_S, SliceBudgets, Slices

log = logging.getLogger(__name__)

QUARANTINE_BYTES = 64 << 10
MERGE_ATTEMPTS = 8  # another node moving a record first costs a reload and a new merge
RETRY_PAUSE_S = 0.004  # up to this many seconds times the attempt, at random: nodes that
# collided on a record do not collide again in step
DEFAULT_RATES = RateSettings()
DEFAULT_RULE_SETTINGS = RuleSettings()
Listener = Callable[[Sequence[LogEntry]], None]


@dataclass(slots=True)
class _Checked:
    """A push item after the gate: its record, and the update's shape."""

    item: PushItem
    key: RecordKey
    shape: UpdateShape | None = None
    error: ItemError | None = None


@dataclass(slots=True)
class _Merge:
    """What one push accumulates while merging: the batch to commit and the answers."""

    batch: WriteBatch = field(default_factory=WriteBatch)
    results: list[ItemResult] = field(default_factory=list)
    touched: dict[RecordKey, LiveRecord] = field(default_factory=dict)
    claims: list[tuple[str, int]] = field(default_factory=list)
    charged: list[tuple[str, ...]] = field(default_factory=list)  # record-rate tokens taken


Remember = Callable[[list[ItemResult]], IdempotencyWrite]
T = TypeVar("T")
Attempt = Callable[[dict[RecordKey, LiveRecord]], Awaitable[T]]


class Pipeline:
    def __init__(
        self,
        store: Store,
        live: LiveRecords,
        owners: ClientOwners,
        gate: UpdateGate,
        node: NodeInfo,
        compact_after: int = 64,
        record_rate: Rate = DEFAULT_RATES.record,
        rule_settings: RuleSettings = DEFAULT_RULE_SETTINGS,
        slice_s: float = SLICE_S,
    ) -> None:
        self.store = store
        self.live = live
        self.owners = owners
        self.gate = gate
        self.node = node
        self.listeners: list[Listener] = []
        self.compact_after = compact_after
        self.compaction_due: set[RecordKey] = set()
        self.record_writes = Buckets("record", record_rate)
        self.rule_settings = rule_settings
        self.slices = SliceBudgets(slice_s)
        self.turns: KeyedLocks[str] = KeyedLocks()  # tenant -> the request merging
        self.merge_retries = 0
        self.peer_entries = 0

    async def push(
        self,
        actor: Actor,
        domain: str,
        items: Sequence[PushItem],
        remember: Remember | None = None,
    ) -> list[ItemResult]:
        model = get_model(domain)
        tenant = actor.principal.tenant
        slices = Slices(self.slices.budget(tenant))
        checked = []
        for item in items:
            await slices.pause()
            checked.append(self._check(tenant, domain, item))
        slices.stop()
        quarantine = [c for c in checked if c.error and c.error.code == ErrorCode.MALFORMED_UPDATE]
        keys = [c.key for c in checked if c.error is None]

        async def attempt(recs: dict[RecordKey, LiveRecord]) -> list[ItemResult]:
            await self.owners.preload(tenant, _clients(checked))
            merge_all = functools.partial(self._merge_all, actor, model, checked, recs, slices)
            merge = await self._merge_in_turn(tenant, recs, merge_all)
            merge.batch.quarantine += [self._quarantined(actor, c) for c in quarantine]
            if remember is not None:
                merge.batch.idempotency = remember(merge.results)
            await self._commit(merge)
            return merge.results

        try:
            return await self._attempts(keys, attempt)
        finally:
            self.slices.charge(tenant, slices.busy_s)

    async def _merge_in_turn(
        self,
        tenant: str,
        recs: dict[RecordKey, LiveRecord],
        merge_into: Callable[[_Merge], Awaitable[None]],
    ) -> _Merge:
        """Run `merge_into` in the tenant's turn; a merge that fails half-way is undone.

        The caller must hand the batch to the store with no `await` in between: the
        tenant's next merge may start once the turn is given back, and if it touches the
        same records it must commit after this one (the store keeps the order batches
        were handed to it).
        """
        merge = _Merge()
        await self.turns.acquire(tenant)
        try:
            _not_discarded(recs)
            await merge_into(merge)
        except BaseException:
            self._discard(list(merge.touched.values()), merge.claims, merge.charged)
            raise
        finally:
            self.turns.release(tenant)
        return merge

    async def _attempts(self, keys: list[RecordKey], attempt: Attempt[T]) -> T:
        """Run `attempt` on the pinned records; again on fresh ones if another node moved them."""
        for n in range(1, MERGE_ATTEMPTS + 1):
            recs = await self.live.pin_current(keys)
            try:
                return await attempt(recs)
            except RecordConflict:
                if n == MERGE_ATTEMPTS:
                    raise
                self.merge_retries += 1
                log.info("records moved on elsewhere; merging again (attempt %d)", n + 1)
            finally:
                self.live.unpin(recs.values())
            await asyncio.sleep(random.uniform(0, RETRY_PAUSE_S * n))
        raise AssertionError("unreachable")

    # -- reads of live records (for sockets that hold a record open) ---------

    async def writable_bu(self, actor: Actor, key: RecordKey, bu: str | None) -> str:
        """The bu `actor` may write `key` under (asking for a new record's bu), else ApiError."""
        recs = await self.live.pin_many([key])
        try:
            rec = recs.get(key)
            if rec is None:
                raise ApiError(ErrorCode.STORAGE_UNAVAILABLE, "the record cannot be loaded")
            return self._authorize(actor, PushItem(key.record_id, bu, b"", None), rec)
        except ItemError as exc:
            code = ErrorCode.NOT_FOUND if exc.code == ErrorCode.NOT_FOUND else ErrorCode.BAD_REQUEST
            raise ApiError(code, exc.message) from None
        finally:
            self.live.unpin(recs.values())

    # -- back-office edits ----------------------------------------------------

    async def edit(self, actor: Actor, key: RecordKey, values: Mapping[str, object]) -> ItemResult:
        """A back-office edit: written by the server on the actor's behalf, then the rules run."""
        model = get_model(key.domain)

        async def attempt(recs: dict[RecordKey, LiveRecord]) -> ItemResult:
            rec = recs.get(key)
            if rec is None:
                raise ApiError(ErrorCode.STORAGE_UNAVAILABLE, "the record cannot be loaded")
            if not _visible(rec, actor):
                raise ApiError(ErrorCode.NOT_FOUND, "no such record")

            async def edit_one(merge: _Merge) -> None:
                merge.results.append(self._edit_one(actor, model, rec, values, merge))

            merge = await self._merge_in_turn(key.tenant, recs, edit_one)
            await self._commit(merge)
            return merge.results[0]

        return await self._attempts([key], attempt)

    def _edit_one(
        self,
        actor: Actor,
        model: DomainModel,
        rec: LiveRecord,
        values: Mapping[str, object],
        merge: _Merge,
    ) -> ItemResult:
        before = rec.state
        try:
            constraints.backoffice_edit(rec.doc, model, values)
        except constraints.InvalidEdit as exc:
            raise ApiError(ErrorCode.INVALID_RECORD, str(exc)) from None
        except Exception:  # noqa: BLE001 - pycrdt failed half-way: reload from storage
            self.live.poison(rec)
            log.exception("back-office edit failed on %s", rec.key)
            raise ApiError(
                ErrorCode.STORAGE_UNAVAILABLE, "the record is reloading; retry"
            ) from None
        edit = rec.take_captured()
        if edit is None:
            return ItemResult(rec.key.record_id, "unchanged", rec.version)
        rec.sv = None
        assert rec.bu is not None
        ctx = self._context(actor, rec.bu, datetime.now(UTC))
        compensation, decisions = self._constrain(model, rec, before, ctx)
        self._stage(actor, rec, rec.bu, edit, compensation, decisions, merge)
        return ItemResult(rec.key.record_id, "merged", rec.version, compensation, decisions)

    def _context(
        self, actor: Actor, bu: str, now: datetime, written: WrittenValues | None = None
    ) -> constraints.Context:
        principal = actor.principal
        return constraints.Context(
            principal.user,
            principal.roles,
            actor.device,
            actor.origin,
            now,
            bu,
            self.rule_settings,
            written,
        )

    # -- decode and authorize ---------------------------------------------

    def _check(self, tenant: str, domain: str, item: PushItem) -> _Checked:
        checked = _Checked(item, RecordKey(tenant, domain, item.record_id))
        try:
            if item.update is not None:
                checked.shape = self.gate.check_update(item.update)
            if item.state_vector is not None:
                self.gate.check_state_vector(item.state_vector)
        except ItemError as exc:
            checked.error = exc
        return checked

    # -- merge (an item's merge has no await; the loop is handed back between items) --

    async def _merge_all(
        self,
        actor: Actor,
        model: DomainModel,
        checked: list[_Checked],
        recs: dict[RecordKey, LiveRecord],
        slices: Slices,
        merge: _Merge,
    ) -> None:
        now = datetime.now(UTC)
        slices.start()
        try:
            for c in checked:
                if await slices.pause():
                    _not_discarded(recs)
                merge.results.append(self._merge_item(actor, model, c, recs.get(c.key), merge, now))
        finally:
            slices.stop()

    def _merge_item(
        self,
        actor: Actor,
        model: DomainModel,
        c: _Checked,
        rec: LiveRecord | None,
        merge: _Merge,
        now: datetime,
    ) -> ItemResult:
        try:
            if c.error:
                raise c.error
            if rec is None or rec.poisoned:
                raise ItemError(ErrorCode.RECORD_UNAVAILABLE, "the record is reloading; retry")
            return self._merge_one(actor, model, c, rec, merge, now)
        except ItemError as exc:
            version = rec.version if rec is not None and _visible(rec, actor) else 0
            return ItemResult(c.item.record_id, "error", version, error=exc)

    def _merge_one(
        self,
        actor: Actor,
        model: DomainModel,
        c: _Checked,
        rec: LiveRecord,
        merge: _Merge,
        now: datetime,
    ) -> ItemResult:
        bu = self._authorize(actor, c.item, rec)
        if c.item.update is None:
            return self._catch_up(c.item, rec)
        assert c.shape is not None
        sv = rec.state_vector()
        if c.shape.delete_ranges or c.shape.adds_beyond(sv):  # a re-send of known structs is free
            self._check_record_rate(rec.key)
        self._check_ownership(actor, c.shape, sv, merge)
        created = not rec.exists
        before = rec.state
        held = dict(rec.pending)
        try:
            after_sv = rec.apply(c.item.update)
        except DocFailed as exc:
            self.live.poison(rec)
            merge.batch.quarantine.append(self._quarantined(actor, c, str(exc)))
            raise ItemError(
                ErrorCode.UPDATE_REJECTED, "the server could not apply this update"
            ) from None
        delta = rec.take_captured()
        pending = bool(c.shape.adds_beyond(after_sv))
        fresh_pending = pending and digest(c.item.update) not in rec.pending
        if delta is None and not fresh_pending:
            return self._answer(c.item, rec, "pending" if pending else "unchanged", None, [])
        # held updates this one let in were merged too
        merged = [c.item.update, *(u for d, u in held.items() if d not in rec.pending)]
        written = WrittenValues(rec.doc, merged, sv, after_sv, rec.item_places)
        ctx = self._context(actor, bu, now, written)
        # yrs shows a pending struct's value at once (behind a gap), so pending updates
        # are constrained like any other.
        compensation, decisions = self._constrain(model, rec, before, ctx)
        if fresh_pending:
            rec.hold_pending(c.item.update)
        self._stage(actor, rec, bu, c.item.update, compensation, decisions, merge)
        status = "pending" if pending else ("created" if created else "merged")
        return self._answer(c.item, rec, status, compensation, decisions)

    def _authorize(self, actor: Actor, item: PushItem, rec: LiveRecord) -> str:
        """The record's bu, if the caller may write it; another bu's record does not exist."""
        principal = actor.principal
        if rec.exists and rec.bu is not None:
            if not principal.covers_bu(rec.bu):
                raise ItemError(ErrorCode.NOT_FOUND, "no such record")
            if item.bu is not None and item.bu != rec.bu:
                raise ItemError(
                    ErrorCode.BU_MISMATCH, f"the record belongs to bu {rec.bu!r}, not {item.bu!r}"
                )
            return rec.bu
        if item.bu is None:
            if item.update is None:
                raise ItemError(ErrorCode.NOT_FOUND, "no such record")
            raise ItemError(ErrorCode.INVALID_ITEM, "a new record needs its bu")
        if not principal.covers_bu(item.bu):
            raise ItemError(ErrorCode.NOT_FOUND, f"bu {item.bu!r} is not in your scope")
        return item.bu

    def _catch_up(self, item: PushItem, rec: LiveRecord) -> ItemResult:
        assert item.state_vector is not None
        if not rec.exists:
            raise ItemError(ErrorCode.NOT_FOUND, "no such record")
        return self._answer(item, rec, "unchanged", None, [])

    def _check_record_rate(self, key: RecordKey) -> None:
        """Bound the updates one record takes: each leaves tombstones no compaction removes."""
        wait = self.record_writes.wait_time(tuple(key))
        if wait > 0:
            raise ItemError(
                ErrorCode.RATE_LIMITED,
                f"this record takes at most {self.record_writes.rate} updates; retry in"
                f" {max(1, math.ceil(wait))} s",
            )

    def _check_ownership(
        self, actor: Actor, shape: UpdateShape, sv: dict[int, int], merge: _Merge
    ) -> None:
        tenant = actor.principal.tenant
        for client in shape.adds_beyond(sv):
            owner = self.owners.owner(tenant, client)
            if owner is not None and owner == actor.device:
                continue
            if owner is not None or actor.device is None:
                raise ItemError(
                    ErrorCode.CLIENT_ID_OWNED,
                    f"Yjs client id {client} belongs to another writer; each device (and each"
                    " doc instance) must use its own client id",
                )
            self.owners.claim(tenant, client, actor.device)
            merge.claims.append((tenant, client))
            merge.batch.claims.append(ClientClaim(tenant, client, actor.device))

    def _constrain(
        self,
        model: DomainModel,
        rec: LiveRecord,
        before: records.RecordState | None,
        ctx: constraints.Context,
    ) -> tuple[bytes | None, list[dict[str, Any]]]:
        after = records.read_state(rec.doc, model)
        corrections = constraints.evaluate(model, before, after, ctx)
        if corrections:
            try:
                constraints.compensate(rec.doc, corrections)
                rec.sv = None
            except Exception:  # noqa: BLE001 - a failed compensation must not leave a half doc
                self.live.poison(rec)
                log.exception("compensation failed on %s", rec.key)
                raise ItemError(
                    ErrorCode.RECORD_UNAVAILABLE, "the record is reloading; retry"
                ) from None
            after = records.read_state(rec.doc, model)
        rec.state = after
        return rec.take_captured(), constraints.decisions(corrections)

    def _stage(
        self,
        actor: Actor,
        rec: LiveRecord,
        bu: str,
        update: bytes,
        compensation: bytes | None,
        decisions: list[dict[str, Any]],
        merge: _Merge,
    ) -> None:
        rec.version += 1
        rec.exists, rec.bu = True, bu
        self.record_writes.take(tuple(rec.key))
        merge.charged.append(tuple(rec.key))
        principal = actor.principal
        entries = merge.batch.entries
        entries.append(
            NewEntry(
                rec.key, bu, update, rec.version, str(actor.origin), principal.user, actor.device
            )
        )
        if compensation is not None:
            entries.append(
                NewEntry(
                    rec.key,
                    bu,
                    compensation,
                    rec.version,
                    str(constraints.Origin.SERVER),
                    principal.user,
                    actor.device,
                    json.dumps(decisions),
                )
            )
        assert rec.state is not None
        merge.batch.records.append(
            RecordWrite(
                rec.key,
                bu,
                rec.doc.get_state(),
                json.dumps(records.materialize(rec.state)),
                rec.version,
            )
        )
        merge.touched[rec.key] = rec
        rec.tail += 2 if compensation is not None else 1
        if rec.tail >= self.compact_after:
            self.compaction_due.add(rec.key)

    def _answer(
        self,
        item: PushItem,
        rec: LiveRecord,
        status: str,
        compensation: bytes | None,
        decisions: list[dict[str, Any]],
    ) -> ItemResult:
        update = compensation
        if item.state_vector is not None:
            try:
                update = diff(rec.doc, item.state_vector)
            except DocFailed:
                self.live.poison(rec)
                raise ItemError(
                    ErrorCode.RECORD_UNAVAILABLE, "the record is reloading; retry"
                ) from None
            if update == b"\x00\x00":
                update = None
        result = ItemResult(item.record_id, status, rec.version, update, decisions)
        if status == "pending":
            result.state_vector = encode_state_vector(rec.state_vector())
        return result

    def _quarantined(self, actor: Actor, c: _Checked, reason: str | None = None) -> QuarantineItem:
        """The update kept for inspection (its first QUARANTINE_BYTES), never in the change log."""
        update = c.item.update
        assert update is not None
        why = reason or (c.error.message if c.error else "rejected")
        if len(update) > QUARANTINE_BYTES:
            why += f" ({len(update)} bytes, first {QUARANTINE_BYTES} kept)"
        kept = update[:QUARANTINE_BYTES]
        return QuarantineItem(c.key, actor.principal.user, actor.device, why, kept)

    # -- persist and fan out -----------------------------------------------

    async def _commit(self, merge: _Merge) -> None:
        if merge.batch.is_empty():
            return

        # On failure at once: a request resuming before ours must not merge on these docs.
        # (A partial, not a closure over `merge`: that would make batch and merge a cycle.)
        discard = functools.partial(
            self._discard, list(merge.touched.values()), merge.claims, merge.charged
        )
        merge.batch.on_failure = discard
        try:
            positions = await self.store.commit(merge.batch)
        except StorageUnavailable:
            discard()  # also when the store refused it before it reached the committer
            raise
        finally:
            merge.batch.on_failure = None
        self._fan_out(merge.batch, positions)

    def _discard(
        self,
        touched: list[LiveRecord],
        claims: list[tuple[str, int]],
        charged: list[tuple[str, ...]],
    ) -> None:
        """Undo in memory what a merge that was never committed did: its docs, its client-id
        claims, and the record-rate tokens it took (a merge redone after losing a race to
        another node must not count twice against the record's rate)."""
        for rec in touched:
            self.live.poison(rec)
        self.owners.forget(claims)
        for key in charged:
            self.record_writes.give_back(key)

    def _fan_out(self, batch: WriteBatch, positions: list[Position]) -> None:
        if not self.listeners or not positions:
            return
        now = time.time()
        self.publish(
            [
                LogEntry(
                    pos,
                    e.key,
                    e.bu,
                    e.update,
                    e.version,
                    e.origin,
                    e.actor,
                    e.device,
                    e.decisions,
                    now,
                )
                for pos, e in zip(positions, batch.entries)
            ]
        )

    def take_remote(self, committed: Sequence[LogEntry]) -> None:
        """Entries another node committed: bring cached docs forward, then fan them out."""
        self.peer_entries += len(committed)
        self.live.refresh(committed)
        self.publish(committed)

    def publish(self, committed: Sequence[LogEntry]) -> None:
        """Hand committed entries (this node's or another's) to every live subscriber."""
        for listener in self.listeners:
            try:
                listener(committed)
            except Exception:  # noqa: BLE001 - one broken subscriber must not fail a commit
                log.exception("fan-out listener failed")


def _not_discarded(recs: dict[RecordKey, LiveRecord]) -> None:
    """Before merging and after each pause: a record discarded while we waited (another
    request's commit lost a race, or another node's entries did not follow it) is merged
    again once reloaded."""
    if any(rec.poisoned for rec in recs.values()):
        raise RecordConflict("a record was reloaded while this request waited")


def _clients(checked: list[_Checked]) -> set[int]:
    return {client for c in checked if c.shape is not None for client in c.shape.clients}


def _visible(rec: LiveRecord, actor: Actor) -> bool:
    return rec.exists and rec.bu is not None and actor.principal.covers_bu(rec.bu)
