"""The group committer: one transaction per group; a failure reaches everyone behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from storage.base import RecordConflict, StorageUnavailable
from storage.group_commit import GroupCommitter
from storage.types import Position, WriteBatch


async def test_a_failed_group_runs_every_hook_before_any_caller_hears() -> None:
    """A request resuming between the failure and its own handler must not merge on
    the failed batches' docs: every hook, queued batches' too, runs first."""
    release = asyncio.Event()
    calls: list[str] = []

    async def write_group(batches: Sequence[WriteBatch]) -> list[list[Position]]:
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


async def test_other_failures_are_storage_unavailable() -> None:
    async def write_group(batches: Sequence[WriteBatch]) -> list[list[Position]]:
        raise OSError("disk gone")

    committer = GroupCommitter(write_group)
    committer.start()
    with pytest.raises(StorageUnavailable) as caught:
        await committer.submit(WriteBatch(expire_before=1.0))
    assert not isinstance(caught.value, RecordConflict)
    await committer.close()
