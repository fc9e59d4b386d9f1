"""One writer task that commits many concurrent batches in a single transaction.

Concurrent requests each call `submit(batch)`; the writer takes everything queued,
writes it in one database transaction, and resolves every caller only once that
transaction is durable. A failed transaction fails its whole group and everything
queued behind it: those batches were merged on top of state that never became durable.

Except after a record conflict (another node moved a record first), when the backend
can say which records went stale: then only the batches that wrote them fail, with
every later batch that wrote a record one of those did (it was merged on top of it);
the rest of the group is committed again at once and the queue keeps the rest. Under
contention one stale record no longer sends a whole group of other records' merges
back to be redone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import RecordConflict, StorageError, StorageUnavailable
from .types import NodeId, Position, RecordKey, Seq, WriteBatch

log = logging.getLogger(__name__)

Durable = Callable[[list[list[Position]]], None]
# `write_group(batches, durable)`: one transaction for the group; returns each batch's
# positions. A backend that commits on a thread of its own calls `durable(positions)` on
# the event loop (`call_soon_threadsafe`) the moment the commit returns: the callers then
# resume in the next loop pass, not three passes later through the awaiting coroutines.
WriteGroup = Callable[[Sequence[WriteBatch], Durable], Awaitable[list[list[Position]]]]
StaleRecords = Callable[[Sequence[WriteBatch]], Awaitable[set[RecordKey] | None]]
Pending = tuple[WriteBatch, "asyncio.Future[list[Position]]"]


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    max_batches: int = 512
    max_entries: int = 20_000


class GroupCommitter:
    def __init__(
        self,
        write_group: WriteGroup,
        policy: GroupPolicy | None = None,
        stale_records: StaleRecords | None = None,
    ) -> None:
        self._write_group = write_group
        self._stale_records = stale_records
        self._policy = policy or GroupPolicy()
        self._queue: asyncio.Queue[tuple[WriteBatch, asyncio.Future[list[Position]]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fieldsync-group-commit")

    async def submit(self, batch: WriteBatch) -> list[Position]:
        if self._closed or self._task is None:
            raise StorageUnavailable("the store is closed")
        fut: asyncio.Future[list[Position]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((batch, fut))
        # A caller cancelled while it waits cancels its own future only: the batch is
        # written all the same (the writer skips futures that are done). No asyncio.shield:
        # its extra future put one more event-loop pass between the commit and the caller
        # (p99 of that step 1.9-2.6 ms -> 1.2-1.4 ms under the noisy-neighbour flood).
        return await fut

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        self._closed = True
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def _run(self) -> None:
        while True:
            group = [await self._queue.get()]
            group.extend(self._drain(len(group[0][0].entries)))
            try:
                await self._commit(group)
            finally:
                for _ in group:
                    self._queue.task_done()

    def _drain(self, entries: int) -> list[tuple[WriteBatch, asyncio.Future[list[Position]]]]:
        taken: list[tuple[WriteBatch, asyncio.Future[list[Position]]]] = []
        policy = self._policy
        while not self._queue.empty() and len(taken) + 1 < policy.max_batches:
            if entries >= policy.max_entries:
                break
            item = self._queue.get_nowait()
            entries += len(item[0].entries)
            taken.append(item)
        return taken

    async def _commit(self, group: list[Pending]) -> None:
        settled = False

        def durable(positions: list[list[Position]]) -> None:
            nonlocal settled
            settled = True
            _settle(group, positions)

        try:
            positions = await self._write_group([batch for batch, _ in group], durable)
        except Exception as exc:  # any database failure: nobody in the group is acknowledged
            if settled:  # the group is durable and its callers were told so: keep it
                log.exception("a group commit failed after it was durable")
                return
            failure = _failure(exc)
            level = logging.INFO if isinstance(failure, RecordConflict) else logging.ERROR
            log.log(level, "group commit of %d batches failed: %s", len(group), exc)
            stale = await self._stale(group, failure)
            if stale is None:
                for batch, fut in group:
                    _fail(batch, fut, failure)
                self._fail_queued(failure)
                return
            kept = self._fail_dependents(group, stale, failure)
            if kept:
                await self._commit(kept)
            return
        if not settled:
            durable(positions)

    def _fail_queued(self, failure: StorageUnavailable) -> None:
        while not self._queue.empty():
            batch, fut = self._queue.get_nowait()
            self._queue.task_done()
            _fail(batch, fut, failure)

    async def _stale(
        self, group: list[Pending], failure: StorageUnavailable
    ) -> set[RecordKey] | None:
        """The records a conflict was about, if the backend can tell (None: fail everything)."""
        if not isinstance(failure, RecordConflict) or self._stale_records is None:
            return None
        try:
            stale = await self._stale_records([batch for batch, _ in group])
        except Exception:  # noqa: BLE001 - cannot tell: fail the group as a whole
            log.exception("could not find the stale records of a failed group")
            return None
        if not stale or not any(_touched(batch) & stale for batch, _ in group):
            return None  # the conflict was not about a record version (a client id claim)
        return stale

    def _fail_dependents(
        self, group: list[Pending], stale: set[RecordKey], failure: StorageUnavailable
    ) -> list[Pending]:
        """Fail the group's and the queue's batches that wrote a stale record or built on
        one that did (in order); return the group's others, to commit again."""
        tainted = set(stale)
        kept = [p for p in group if not _fails_with(p, tainted, failure)]
        queued = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
            self._queue.task_done()
        for pending in queued:
            if not _fails_with(pending, tainted, failure):
                self._queue.put_nowait(pending)
        return kept


class GroupCommitted:
    """`Store.commit` for a backend whose writes all go through one GroupCommitter."""

    _committer: GroupCommitter | None
    _node: NodeId | None

    async def commit(self, batch: WriteBatch) -> list[Position]:
        if self._committer is None:
            raise StorageUnavailable("the store is not open")
        if batch.entries and self._node is None:
            raise StorageError("register_node() must run before entries are appended")
        return await self._committer.submit(batch)


def number_entries(
    batches: Sequence[WriteBatch], node: NodeId | None, first_seq: int, now: float
) -> tuple[list[list[Position]], list[tuple[Any, ...]]]:
    """Give the group's entries this node's next seqs, from `first_seq`.

    Returns each batch's positions and the log rows: node_id, seq, tenant, domain,
    record_id, bu, update, version, origin, actor, device, decisions, received_at.
    """
    positions: list[list[Position]] = []
    rows: list[tuple[Any, ...]] = []
    seq = first_seq
    for batch in batches:
        mine = []
        for e in batch.entries:
            assert node is not None, "register_node() runs before entries are appended"
            mine.append(Position(node, Seq(seq)))
            k = e.key
            rows.append(
                (node, seq, *k, e.bu, e.update, e.version, e.origin, e.actor, e.device)
                + (e.decisions, now)
            )
            seq += 1
        positions.append(mine)
    return positions, rows


def _failure(exc: Exception) -> StorageUnavailable:
    """What every batch of a failed group (and behind it) is told; a conflict stays one."""
    if isinstance(exc, RecordConflict):
        return RecordConflict(str(exc))
    return StorageUnavailable(f"commit failed: {exc}")


def _touched(batch: WriteBatch) -> set[RecordKey]:
    return {w.key for w in batch.records} | {e.key for e in batch.entries}


def _fails_with(pending: Pending, tainted: set[RecordKey], failure: StorageUnavailable) -> bool:
    """Fail the batch if it wrote a tainted record; what it wrote is then tainted too."""
    batch, fut = pending
    touched = _touched(batch)
    if not touched & tainted:
        return False
    tainted |= touched
    _fail(batch, fut, failure)
    return True


def _settle(group: list[Pending], positions: list[list[Position]]) -> None:
    for (_, fut), pos in zip(group, positions):
        if not fut.done():  # a cancelled caller: its batch was written all the same
            fut.set_result(pos)


def _fail(batch: WriteBatch, fut: asyncio.Future[list[Position]], exc: BaseException) -> None:
    if batch.on_failure is not None:
        try:
            batch.on_failure()
        except Exception:  # noqa: BLE001 - the failure must still reach the caller
            log.exception("a failed batch's on_failure hook failed")
    if not fut.done():
        fut.set_exception(exc)
