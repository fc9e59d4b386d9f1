"""PostgreSQL-only behaviour of the shared Store, against a real cluster.

The contract itself runs on every backend (test_storage_contract.py); here: durability
settings, node locks, commit notices, migrations, and surviving a database restart.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from storage import open_store
from storage.base import RecordConflict, StorageError, StorageUnavailable
from storage.postgres import PostgresStore
from storage.postgres_schema import SCHEMA_VERSION
from storage.types import (
    NewEntry,
    NodeId,
    Position,
    RecordKey,
    RecordWrite,
    Seq,
    WriteBatch,
)
from tests.pg_cluster import PostgresCluster

KEY = RecordKey("t1", "activity", "rec-1")


def _write(key: RecordKey, version: int, update: bytes = b"u") -> WriteBatch:
    return WriteBatch(
        entries=[NewEntry(key, "bu1", update, version, "device", "user-1", "dev-1")],
        records=[RecordWrite(key, "bu1", b"sv%d" % version, f'{{"v": {version}}}', version)],
    )


async def _eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _sql(dsn: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one statement, or (without arguments) run a script of several."""
    conn = await asyncpg.connect(dsn)
    try:
        if args or sql.lstrip().upper().startswith("SELECT"):
            return list(await conn.fetch(sql, *args))
        await conn.execute(sql)
        return []
    finally:
        await conn.close()


@pytest.fixture
async def stores(postgres_database: str) -> AsyncIterator[Callable[..., Awaitable[PostgresStore]]]:
    """Open PostgresStores on this test's fresh database; all closed at the end."""
    opened: list[PostgresStore] = []

    async def make(node: str | None = None, client_id: int | None = None) -> PostgresStore:
        store = PostgresStore(postgres_database)
        await store.open()
        opened.append(store)
        if node is not None:
            await store.register_node(NodeId(node), client_id or random.randrange(1, 1 << 40))
        return store

    yield make
    for store in opened:
        await store.close()


# -- opening -------------------------------------------------------------------


def test_open_store_picks_postgres_for_postgres_urls() -> None:
    for url in ("postgresql://u@127.0.0.1:1/db", "postgres://u@127.0.0.1:1/db"):
        store = open_store(url)
        assert isinstance(store, PostgresStore) and store.shared


async def test_synchronous_commit_off_is_refused(postgres_database: str) -> None:
    name = postgres_database.rsplit("/", 1)[1]
    await _sql(postgres_database, f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    store = PostgresStore(postgres_database)
    with pytest.raises(StorageError, match="synchronous_commit=off"):
        await store.open()
    await store.close()
    for durable in ("local", "remote_write", "on"):
        await _sql(postgres_database, f'ALTER DATABASE "{name}" SET synchronous_commit = {durable}')
        store = PostgresStore(postgres_database)
        await store.open()
        await store.close()


async def test_migrations_are_idempotent_across_reopen_and_concurrent_opens(
    postgres_database: str,
) -> None:
    together = [PostgresStore(postgres_database) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in together))  # race to migrate an empty database
    await together[0].register_node(NodeId("node-a"), 11)
    await together[0].commit(_write(KEY, 1))
    for store in together:
        await store.close()
    again = PostgresStore(postgres_database)
    await again.open()  # nothing left to migrate; the data stays
    try:
        assert (await again.get_record(KEY)) is not None
    finally:
        await again.close()
    rows = await _sql(postgres_database, "SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    # a database migrated by a newer fieldsync is refused, not downgraded
    await _sql(postgres_database, "INSERT INTO schema_version VALUES ($1, 0)", SCHEMA_VERSION + 1)
    newer = PostgresStore(postgres_database)
    with pytest.raises(StorageError, match="newer"):
        await newer.open()


# -- nodes -----------------------------------------------------------------------


async def test_a_node_runs_once_per_database(stores: Any) -> None:
    first: PostgresStore = await stores("node-a", 21)
    second: PostgresStore = await stores()
    with pytest.raises(StorageError, match="node node-a is already running"):
        await second.register_node(NodeId("node-a"), 22)
    # the same node may not write under two processes, but a new one may start beside it
    fresh = await second.register_node(None, 23)
    assert fresh.node_id.startswith("n-") and len(fresh.node_id) == 14
    assert await second.register_node(None, 24) == fresh  # this store's node, kept
    with pytest.raises(StorageError, match="client id 21"):  # client ids are unique too
        await (await stores()).register_node(None, 21)
    await first.commit(_write(KEY, 1))
    await first.close()
    third: PostgresStore = await stores()
    taken_over = await third.register_node(NodeId("node-a"), 99)
    assert taken_over.client_id == 21  # a known node keeps its client id
    positions = await third.commit(_write(KEY, 2))
    assert positions == [Position(NodeId("node-a"), Seq(2))]  # and continues its sequence


async def test_watch_hears_other_nodes_commits_but_not_its_own(stores: Any) -> None:
    a: PostgresStore = await stores("node-a")
    b: PostgresStore = await stores("node-b")
    heard_a: list[tuple[str, int]] = []
    heard_b: list[tuple[str, int]] = []
    await a.watch(lambda node, seq: heard_a.append((node, seq)))
    await b.watch(lambda node, seq: heard_b.append((node, seq)))
    await a.commit(_write(KEY, 1))
    await a.commit(WriteBatch(entries=_write(KEY, 2).entries * 3, records=_write(KEY, 2).records))
    await _eventually(lambda: len(heard_b) == 2)
    await b.commit(_write(RecordKey("t1", "activity", "rec-2"), 1))
    await _eventually(lambda: len(heard_a) == 1)
    await b.commit(WriteBatch(expire_before=time.time()))  # no entries: nothing to tell
    await a.commit(_write(KEY, 3))  # notices arrive in commit order: a's is last
    await _eventually(lambda: len(heard_b) == 3)
    assert heard_a == [("node-b", 1)]
    assert heard_b == [("node-a", 1), ("node-a", 4), ("node-a", 5)]


async def test_a_dropped_listen_connection_comes_back_with_its_lock_and_notices(
    stores: Any, postgres_database: str
) -> None:
    a: PostgresStore = await stores("node-a")
    b: PostgresStore = await stores("node-b")
    heard: list[tuple[str, int]] = []
    await a.watch(lambda node, seq: heard.append((node, seq)))
    await b.commit(_write(KEY, 1))
    await _eventually(lambda: heard == [("node-b", 1)])
    # end the session that holds node-a's lock, as a network failure or an admin would
    [[holder]] = await _sql(
        postgres_database,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory'"
        " AND ((classid::bigint << 32) | objid::bigint)"
        " = hashtextextended('fieldsync-node:' || $1, 0)",
        "node-a",
    )
    await _sql(postgres_database, "SELECT pg_terminate_backend($1)", holder)

    async def relocked() -> bool:
        rows = await _sql(
            postgres_database,
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND ((classid::bigint << 32) | objid::bigint)"
            " = hashtextextended('fieldsync-node:' || $1, 0)",
            "node-a",
        )
        return bool(rows) and rows[0][0] != holder

    deadline = time.monotonic() + 10
    while not await relocked():  # a re-connected in the background, without a commit
        assert time.monotonic() < deadline, "the node lock was not taken again"
        await asyncio.sleep(0.05)
    intruder: PostgresStore = await stores()
    with pytest.raises(StorageError, match="already running"):
        await intruder.register_node(NodeId("node-a"), 41)
    await b.commit(_write(KEY, 2))
    await _eventually(lambda: ("node-b", 2) in heard)
    assert await a.commit(_write(KEY, 3)) == [Position(NodeId("node-a"), Seq(1))]
    # a writer connection that died between groups costs no commit: only BEGIN was sent
    await _sql(
        postgres_database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'fieldsync-write'",
    )
    assert await a.commit(_write(KEY, 4)) == [Position(NodeId("node-a"), Seq(2))]
    assert await b.commit(_write(KEY, 5)) == [Position(NodeId("node-b"), Seq(3))]


async def test_two_nodes_writing_the_same_records_conflict_but_never_deadlock(
    stores: Any,
) -> None:
    nodes = [await stores("node-a"), await stores("node-b")]
    keys = [RecordKey("t1", "activity", f"hot-{i}") for i in range(6)]
    written = {k: 0 for k in keys}
    conflicts = 0

    async def writer(store: PostgresStore, rounds: int) -> None:
        nonlocal conflicts
        for _ in range(rounds):
            chosen = random.sample(keys, 4)  # groups touch overlapping records in any order
            rows = {k: await store.get_record(k) for k in chosen}
            batch = WriteBatch()
            for k in chosen:
                row = rows[k]
                batch.entries += _write(k, (row.version if row else 0) + 1).entries
                batch.records += _write(k, (row.version if row else 0) + 1).records
            try:
                await store.commit(batch)
            except RecordConflict:
                conflicts += 1
                continue
            for k in chosen:
                written[k] += 1

    started = time.monotonic()
    await asyncio.gather(*(writer(s, 40) for s in nodes for _ in range(3)))
    assert time.monotonic() - started < 20  # no deadlock waits (1 s each)
    for k in keys:
        row = await nodes[0].get_record(k)
        assert (row.version if row else 0) == written[k]
        assert len(await nodes[0].record_log(k)) == written[k]
    assert sum(written.values()) > 0


# -- the database goes away and comes back ----------------------------------------


@pytest.fixture(scope="module")
def own_cluster(postgres_cluster: PostgresCluster) -> Iterator[PostgresCluster]:
    """A cluster of this module's own, so stopping it disturbs no other test."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


async def test_a_store_survives_a_database_restart_and_loses_no_acknowledged_write(
    own_cluster: PostgresCluster,
) -> None:
    dsn = own_cluster.create_database(f"restart_{uuid.uuid4().hex[:8]}")
    store = PostgresStore(dsn, read_retries=1)
    other = PostgresStore(dsn)
    await store.open()
    await other.open()
    try:
        await store.register_node(NodeId("node-r"), 31)
        await other.register_node(NodeId("node-o"), 32)
        heard: list[tuple[str, int]] = []
        await store.watch(lambda node, seq: heard.append((node, seq)))
        acked: dict[str, Position] = {}
        failed: list[str] = []
        stop = asyncio.Event()

        async def writer(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                key = RecordKey("t1", "activity", f"w{n}-{i}")
                try:
                    [position] = await store.commit(_write(key, 1, key.record_id.encode()))
                except StorageUnavailable:
                    failed.append(key.record_id)
                    await asyncio.sleep(0.01)
                    continue
                acked[key.record_id] = position

        writers = [asyncio.create_task(writer(n)) for n in range(4)]
        await _eventually(lambda: len(acked) >= 100)
        own_cluster.stop(mode="immediate")  # mid-flight: groups are being written
        await _eventually(lambda: len(failed) >= 8)
        with pytest.raises(StorageUnavailable):
            await store.commit(_write(KEY, 1))
        with pytest.raises(StorageUnavailable):
            await store.get_record(KEY)
        down_acked = len(acked)
        await asyncio.sleep(0.2)
        assert len(acked) == down_acked  # nothing is acknowledged while it is down

        own_cluster.start()
        # the same store, not reopened: writers go on committing
        await _eventually(lambda: len(acked) >= down_acked + 100, timeout=20)
        stop.set()
        await asyncio.gather(*writers)

        entries = await store.read_node_log(NodeId("node-r"), 0, 1_000_000)
        stored = {e.key.record_id: e.position for e in entries}
        lost = {r for r, p in acked.items() if stored.get(r) != p}
        assert not lost, f"{len(lost)} acknowledged writes lost"
        # one dense sequence, whatever the failed groups' COMMITs did
        assert [e.position.seq for e in entries] == list(range(1, len(entries) + 1))
        assert len(entries) == len(acked) + len(set(failed) & set(stored))

        # the node lock came back with the listen connection, and so did notices
        intruder = PostgresStore(dsn)
        await intruder.open()
        try:
            with pytest.raises(StorageError, match="already running"):
                await intruder.register_node(NodeId("node-r"), 33)
        finally:
            await intruder.close()
        [position] = await other.commit(_write(RecordKey("t1", "activity", "from-o"), 1))
        await _eventually(lambda: ("node-o", position.seq) in heard)
    finally:
        await store.close()
        await other.close()


async def test_a_store_opened_while_the_database_is_down_fails_cleanly(
    own_cluster: PostgresCluster,
) -> None:
    dsn = own_cluster.dsn("postgres")
    own_cluster.stop()
    try:
        store = PostgresStore(dsn, connect_timeout=2)
        with pytest.raises(StorageUnavailable):
            await store.open()
        await store.close()
        with pytest.raises(StorageUnavailable):
            await store.commit(WriteBatch(expire_before=0))
    finally:
        own_cluster.start()
