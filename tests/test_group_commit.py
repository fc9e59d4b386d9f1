"""The group committer: one transaction per group; a failure reaches everyone behind it,
except after a record conflict, which fails only the batches that built on a stale record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from storage import Store
from storage.base import RecordConflict, StorageUnavailable
from storage.group_commit import Durable, GroupCommitter
from storage.types import NewEntry, NodeId, Position, RecordKey, RecordWrite, Seq, WriteBatch
from tests.conftest import StoreFactory

X = RecordKey("t1", "activity", "rec-x")
Y = RecordKey("t1", "activity", "rec-y")


def _write(
    key: RecordKey, version: int, update: bytes, hook: list[str] | None = None
) -> WriteBatch:
    return WriteBatch(
        entries=[NewEntry(key, "bu1", update, version, "device", "user-1", "dev-1")],
        records=[RecordWrite(key, "bu1", b"sv%d" % version, f'{{"v": {version}}}', version)],
        on_failure=None if hook is None else lambda: hook.append(update.decode()),
    )


async def test_a_failed_group_runs_every_hook_before_any_caller_hears() -> None:
    """A request resuming between the failure and its own handler must not merge on
    the failed batches' docs: every hook, queued batches' too, runs first."""
    release = asyncio.Event()
    calls: list[str] = []

    async def write_group(batches: Sequence[WriteBatch], durable: Durable) -> list[list[Position]]:
        await release.wait()
        raise RecordConflict("another node wrote first")

    committer = GroupCommitter(write_group)
    committer.start()
    first = WriteBatch(expire_before=1.0, on_failure=lambda: calls.append("first"))
    queued = WriteBatch(expire_before=2.0, on_failure=lambda: calls.append("queued"))
    waiting = asyncio.create_task(committer.submit(first))
    await asyncio.sleep(0)
    behind = asyncio.create_task(committer.submit(queued))
    await asyncio.sleep(0)

    release.set()
    with pytest.raises(RecordConflict):  # a conflict stays a conflict for everyone
        await waiting
    # by the time the first caller hears of it, both docs were already discarded
    assert calls == ["first", "queued"]
    with pytest.raises(RecordConflict):
        await behind
    await committer.close()


async def test_a_cancelled_caller_s_batch_is_written_all_the_same() -> None:
    release = asyncio.Event()
    written: list[WriteBatch] = []

    async def write_group(batches: Sequence[WriteBatch], durable: Durable) -> list[list[Position]]:
        await release.wait()
        written.extend(batches)
        return [[] for _ in batches]

    committer = GroupCommitter(write_group)
    committer.start()
    gone, stays = WriteBatch(expire_before=1.0), WriteBatch(expire_before=2.0)
    cancelled = asyncio.create_task(committer.submit(gone))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(committer.submit(stays))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    assert await waiting == []
    assert written == [gone, stays]
    await committer.close()


async def test_a_caller_resumes_in_the_loop_pass_after_its_group_is_written() -> None:
    """Every pass between the commit and the caller runs whatever else is ready on a busy
    loop first."""
    written = asyncio.Event()

    async def write_group(batches: Sequence[WriteBatch], durable: Durable) -> list[list[Position]]:
        written.set()
        return [[] for _ in batches]

    committer = GroupCommitter(write_group)
    committer.start()
    waiting = asyncio.create_task(committer.submit(WriteBatch()))
    await written.wait()  # resumes in the pass that wakes the caller, just before it
    passes = 0
    while not waiting.done():
        await asyncio.sleep(0)
        passes += 1
    assert passes == 1, passes  # with asyncio.shield: 2
    await committer.close()


async def test_callers_resume_once_the_group_is_durable_before_the_writer_returns() -> None:
    """A backend that commits on its own thread says so at once (`durable`); its callers
    do not wait for the hop back through the awaiting coroutines."""
    returned = asyncio.Event()
    position = Position(NodeId("node-a"), Seq(1))

    async def write_group(batches: Sequence[WriteBatch], durable: Durable) -> list[list[Position]]:
        durable([[position]])
        await returned.wait()
        return [[position]]

    committer = GroupCommitter(write_group)
    committer.start()
    assert await committer.submit(WriteBatch()) == [position]
    returned.set()
    await committer.close()


async def test_a_failure_after_the_group_was_durable_fails_nobody() -> None:
    """Its callers were told the batch is written; nothing of it may be undone then."""
    undone: list[str] = []
    position = Position(NodeId("node-a"), Seq(1))

    async def write_group(batches: Sequence[WriteBatch], durable: Durable) -> list[list[Position]]:
        durable([[position]])
        raise OSError("after the commit")

    committer = GroupCommitter(write_group)
    committer.start()
    batch = WriteBatch(expire_before=1.0, on_failure=lambda: undone.append("undone"))
    assert await committer.submit(batch) == [position]
    assert undone == []
    await committer.close()


async def test_other_failures_are_storage_unavailable() -> None:
    async def write_group(batches: Sequence[WriteBatch], durable: Durable) -> list[list[Position]]:
        raise OSError("disk gone")

    committer = GroupCommitter(write_group)
    committer.start()
    with pytest.raises(StorageUnavailable) as caught:
        await committer.submit(WriteBatch(expire_before=1.0))
    assert not isinstance(caught.value, RecordConflict)
    await committer.close()


async def test_a_stale_record_fails_only_the_batches_built_on_it(
    store_factory: StoreFactory,
) -> None:
    """Node b moves X first. Of node a's four batches, submitted together, the X pair (the
    second merged on the first) fails; the Y pair, which merged on nothing stale, commits."""
    a: Store = await store_factory(register=False)
    b: Store = await store_factory(register=False)
    await a.register_node(NodeId("node-a"), 601)
    await b.register_node(NodeId("node-b"), 602)
    await a.commit(_write(X, 1, b"x1"))
    await a.commit(_write(Y, 1, b"y1"))
    await b.commit(_write(X, 2, b"x2-from-b"))
    failed: list[str] = []
    outcomes = await asyncio.gather(
        a.commit(_write(X, 2, b"x2", failed)),
        a.commit(_write(Y, 2, b"y2", failed)),
        a.commit(_write(X, 3, b"x3", failed)),  # merged on top of x2
        a.commit(_write(Y, 3, b"y3", failed)),
        return_exceptions=True,
    )
    assert [type(o).__name__ for o in outcomes] == [
        "RecordConflict",
        "list",
        "RecordConflict",
        "list",
    ]
    assert sorted(failed) == ["x2", "x3"]
    assert await a.record_versions([X, Y]) == {X: 2, Y: 3}
    entries, _ = await a.read_log("t1", "activity", {}, 100)
    assert sorted(e.update for e in entries) == [b"x1", b"x2-from-b", b"y1", b"y2", b"y3"]
