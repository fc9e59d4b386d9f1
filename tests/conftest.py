"""Shared fixtures: real stores on real SQLite files and on a real PostgreSQL.

Every test that uses a store (`store`, `store_factory`) or a server (`config`, `client`,
`make_client`, `api`) runs once per backend. PostgreSQL comes from the binaries on this
machine (tests/pg_cluster.py): one throwaway cluster per session, one fresh database
per test. Without the binaries the postgres runs are skipped, unless `CI` is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from server.app import create_app
from server.config import Config
from storage import Store
from storage.postgres import PostgresStore
from storage.sqlite import SQLiteStore
from storage.types import NodeId
from tests.helpers import GENEROUS, SECRET, Api, Client, token
from tests.pg_cluster import DatabaseSupply, PostgresCluster, find_bin_dir

# the example database stays under tests/, not at the top of the checkout
set_hypothesis_home_dir(str(Path(__file__).parent / ".hypothesis"))

STORE_BACKENDS = ["sqlite", "postgres"]

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole session, stopped and removed at its end."""
    if find_bin_dir() is None:
        reason = "no PostgreSQL binaries under /usr/lib/postgresql/*/bin (or FIELDSYNC_PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
        pytest.skip(f"{reason}: PostgreSQL runs skipped")
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def _empty_databases(postgres_cluster: PostgresCluster) -> Iterator[DatabaseSupply]:
    supply = DatabaseSupply(postgres_cluster, f"store_{os.getpid()}")
    yield supply
    supply.close()


@pytest.fixture(scope="session")
def _server_databases(postgres_cluster: PostgresCluster) -> Iterator[DatabaseSupply]:
    supply = DatabaseSupply(postgres_cluster, f"server_{os.getpid()}", prepare=_migrate)
    yield supply
    supply.close()


def _migrate(dsn: str) -> None:
    async def migrate() -> None:
        store = PostgresStore(dsn)
        await store.open()
        await store.close()

    asyncio.run(migrate())


@pytest.fixture
def postgres_database(_empty_databases: DatabaseSupply) -> Iterator[str]:
    """A fresh, empty database for one test (the store migrates it); its DSN."""
    name, dsn = _empty_databases.take()
    yield dsn
    _empty_databases.give_back(name)


@pytest.fixture
def postgres_server_database(_server_databases: DatabaseSupply) -> Iterator[str]:
    """A fresh database for one test, already migrated (servers start faster); its DSN."""
    name, dsn = _server_databases.take()
    yield dsn
    _server_databases.give_back(name)


def _database(request: pytest.FixtureRequest, sqlite_path: Path, postgres: str) -> str:
    """This test's database for the backend it runs on: a SQLite path or a PostgreSQL DSN."""
    if request.param == "postgres":
        return str(request.getfixturevalue(postgres))
    return str(sqlite_path)


@pytest.fixture(params=STORE_BACKENDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    opened: list[Store] = []
    db = _database(request, tmp_path / "fieldsync.db", "postgres_database")

    async def make(register: bool = True) -> Store:
        """Open the backend's store on this test's database (again, if called twice)."""
        store: Store
        if request.param == "postgres":
            store = PostgresStore(db)
        else:
            store = SQLiteStore(db)
        await store.open()
        opened.append(store)
        if register:
            # A shared database has no "local" node: name it, so a reopen continues it.
            await store.register_node(NodeId("test-node") if store.shared else None, 1001)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()


@pytest.fixture(params=STORE_BACKENDS)
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    db = _database(request, tmp_path / "server.db", "postgres_server_database")
    return Config(db=db, jwt_secret=SECRET, rates=GENEROUS)


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> Client:
    """A real aiohttp server on 127.0.0.1 over a real database (each backend)."""
    started: Client = await aiohttp_client(create_app(config))
    return started


@pytest.fixture
def make_client(aiohttp_client: Any, config: Config) -> Callable[..., Awaitable[Client]]:
    """A server with some settings changed: make_client(sockets=SocketSettings(...))."""

    async def make(**changes: Any) -> Client:
        started: Client = await aiohttp_client(create_app(dataclasses.replace(config, **changes)))
        return started

    return make


@pytest.fixture
def api(client: Client) -> Callable[..., Api]:
    def make(
        tenant: str = "t1",
        bus: tuple[str, ...] = ("bu1",),
        user: str = "u1",
        device: str = "dev-1",
        roles: tuple[str, ...] = (),
    ) -> Api:
        return Api(client, token(tenant, bus, user, roles), device)

    return make
