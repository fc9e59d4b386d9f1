"""SQLite's WAL is checkpointed in the background, never by the commit that fills it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.sqlite import SQLiteStore
from storage.sqlite_checkpoint import BACKSTOP_PAGES
from storage.types import NewEntry, RecordKey, RecordWrite, WriteBatch

UPDATE_BYTES = 100_000
DEFAULT_AUTOCHECKPOINT_PAGES = 1000  # SQLite's, which the writer no longer uses


def _batch(n: int) -> WriteBatch:
    key = RecordKey("t1", "activity", f"rec-{n}")
    update = os.urandom(UPDATE_BYTES)  # incompressible, and no page is shared
    return WriteBatch(
        entries=[NewEntry(key, "bu1", update, 1, "device", "user-1", "dev-1")],
        records=[RecordWrite(key, "bu1", b"sv", "{}", 1)],
    )


async def _opened(path: Path, every_s: float) -> SQLiteStore:
    store = SQLiteStore(path, checkpoint_every_s=every_s)
    await store.open()
    await store.register_node(None, 1)
    return store


@pytest.fixture
async def slow_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A store whose background checkpoint has run once and then waits an hour."""
    store = await _opened(tmp_path / "db.sqlite", every_s=3600)
    await store.commit(_batch(0))
    for _ in range(500):
        if store.checkpointer.runs:
            break
        await asyncio.sleep(0.01)
    assert store.checkpointer.runs == 1
    try:
        yield store
    finally:
        await store.close()


async def test_commits_leave_the_checkpoint_to_the_background(slow_store: SQLiteStore) -> None:
    db, wal = slow_store.path, Path(f"{slow_store.path}-wal")
    db_before = db.stat().st_size
    pages = 0
    for n in range(1, 60):
        await slow_store.commit(_batch(n))
        pages += UPDATE_BYTES // 4096
    assert DEFAULT_AUTOCHECKPOINT_PAGES < pages < BACKSTOP_PAGES
    # Past SQLite's default threshold, and still nothing was copied into the database
    # file: the commits did not checkpoint.
    assert db.stat().st_size == db_before
    assert wal.stat().st_size > pages * 4096

    result = await slow_store.checkpointer.checkpoint()
    assert result.complete and result.wal_frames > pages
    assert db.stat().st_size > db_before + pages * 4096
    loaded = await slow_store.load_records([RecordKey("t1", "activity", "rec-59")])
    assert len(loaded[RecordKey("t1", "activity", "rec-59")].tail[0].update) == UPDATE_BYTES


async def test_what_is_committed_is_checkpointed_soon(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "db.sqlite", every_s=0.05)
    try:
        copied = store.path.stat().st_size + 20 * UPDATE_BYTES
        for n in range(20):
            await store.commit(_batch(n))
        for _ in range(500):
            if store.path.stat().st_size > copied:
                break
            await asyncio.sleep(0.01)
        assert store.path.stat().st_size > copied
        assert store.checkpointer.last is not None and store.checkpointer.last.complete
        assert store.checkpointer.failures == 0
    finally:
        await store.close()


async def test_nothing_written_nothing_checkpointed(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "db.sqlite", every_s=0.01)
    try:
        await asyncio.sleep(0.1)
        assert store.checkpointer.runs == 0
    finally:
        await store.close()
