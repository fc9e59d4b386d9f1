"""Shared fixtures: real stores on real files (and, later, a real PostgreSQL)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config
from storage import Store
from storage.sqlite import SQLiteStore
from tests.helpers import GENEROUS, SECRET, Api, token

STORE_BACKENDS = ["sqlite"]

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture(params=STORE_BACKENDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
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


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(db=str(tmp_path / "server.db"), jwt_secret=SECRET, rates=GENEROUS)


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> TestClient:
    """A real aiohttp server on 127.0.0.1 over a real SQLite file."""
    return await aiohttp_client(create_app(config))


@pytest.fixture
def make_client(aiohttp_client: Any, config: Config) -> Callable[..., Awaitable[TestClient]]:
    """A server with some settings changed: make_client(sockets=SocketSettings(...))."""

    async def make(**changes: Any) -> TestClient:
        return await aiohttp_client(create_app(dataclasses.replace(config, **changes)))

    return make


@pytest.fixture
def api(client: TestClient) -> Callable[..., Api]:
    def make(
        tenant: str = "t1",
        bus: tuple[str, ...] = ("bu1",),
        user: str = "u1",
        device: str = "dev-1",
        roles: tuple[str, ...] = (),
    ) -> Api:
        return Api(client, token(tenant, bus, user, roles), device)

    return make
