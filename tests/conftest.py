"""Shared fixtures: real stores on real files (and, later, a real PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from storage import Store
from storage.sqlite import SQLiteStore

STORE_BACKENDS = ["sqlite"]

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture(params=STORE_BACKENDS)
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    opened: list[Store] = []

    async def make(register: bool = True) -> Store:
        """Open the backend's store on this test's database (again, if called twice)."""
        store = SQLiteStore(tmp_path / "fieldsync.db")
        await store.open()
        opened.append(store)
        if register:
            await store.register_node(None, 1001)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()
