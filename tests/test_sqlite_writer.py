"""SQLite's writer thread tells the event loop a group is durable the moment COMMIT
returns, ahead of the hop back through the awaiting coroutines."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.base import RecordConflict
from storage.sqlite import SQLiteStore
from storage.types import NewEntry, Position, RecordKey, RecordWrite, WriteBatch

KEY = RecordKey("t1", "activity", "rec-1")


def _write(version: int) -> WriteBatch:
    return WriteBatch(
        entries=[NewEntry(KEY, "bu1", b"update-%d" % version, version, "device", "u1", "d1")],
        records=[RecordWrite(KEY, "bu1", b"sv", "{}", version)],
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "db.sqlite")
    await store.open()
    await store.register_node(None, 1)
    try:
        yield store
    finally:
        await store.close()


async def test_a_group_is_reported_durable_on_the_loop_before_the_writer_returns(
    store: SQLiteStore,
) -> None:
    reported: list[tuple[int, list[list[Position]]]] = []

    def durable(positions: list[list[Position]]) -> None:
        reported.append((threading.get_ident(), positions))

    positions = await store._write_group([_write(1)], durable)
    # already called, and on the loop's thread: it was queued before the hop back
    assert reported == [(threading.get_ident(), positions)]
    assert [[p.seq for p in batch] for batch in positions] == [[1]]
    assert (await store.load_records([KEY]))[KEY].row.version == 1


async def test_a_group_that_fails_is_never_reported_durable(store: SQLiteStore) -> None:
    await store.commit(_write(1))
    reported: list[list[list[Position]]] = []
    with pytest.raises(RecordConflict):
        await store._write_group([_write(1)], reported.append)  # version 1 is taken
    assert reported == []
    assert (await store.load_records([KEY]))[KEY].row.version == 1
