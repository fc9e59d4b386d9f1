"""The Store contract. Every backend in `STORE_BACKENDS` (conftest) must pass all of it."""

from __future__ import annotations

import asyncio
import time

import pytest

from storage import Store
from storage.base import RecordConflict, StorageUnavailable
from storage.types import (
    ClientClaim,
    Fold,
    IdempotencyWrite,
    NewEntry,
    NodeId,
    QuarantineItem,
    RecordKey,
    RecordWrite,
    WriteBatch,
)
from tests.conftest import StoreFactory

KEY = RecordKey("t1", "activity", "rec-1")


def _write(key: RecordKey, version: int, update: bytes = b"u", bu: str = "bu1") -> WriteBatch:
    return WriteBatch(
        entries=[NewEntry(key, bu, update, version, "device", "user-1", "dev-1")],
        records=[RecordWrite(key, bu, b"sv%d" % version, f'{{"v": {version}}}', version)],
    )


async def test_register_node_is_stable(store_factory: StoreFactory) -> None:
    store: Store = await store_factory(register=False)
    first = await store.register_node(None, 111)
    again = await store.register_node(None, 222)
    assert again == first and first.client_id == 111
    assert await store.server_client_ids() == frozenset({111})
    named = await store.register_node(NodeId("node-b"), 333)
    assert named.node_id == "node-b" and named.client_id == 333


async def test_commit_then_load_returns_row_and_tail(store: Store) -> None:
    p1 = await store.commit(_write(KEY, 1, b"a"))
    p2 = await store.commit(_write(KEY, 2, b"b"))
    assert p2[0].seq == p1[0].seq + 1
    loaded = await store.load_records([KEY, RecordKey("t1", "activity", "missing")])
    assert list(loaded) == [KEY]
    rec = loaded[KEY]
    assert rec.row.version == 2 and rec.row.materialized == '{"v": 2}'
    assert rec.row.state_vector == b"sv2" and rec.row.snapshot is None
    assert [e.update for e in rec.tail] == [b"a", b"b"]
    assert rec.row.created_at <= rec.row.updated_at


async def test_records_are_keyed_by_tenant_and_domain(store: Store) -> None:
    await store.commit(_write(KEY, 1))
    other_tenant = RecordKey("t2", KEY.domain, KEY.record_id)
    other_domain = RecordKey(KEY.tenant, "helpdesk", KEY.record_id)
    assert await store.get_record(other_tenant) is None
    assert await store.load_records([other_tenant, other_domain]) == {}
    entries, _ = await store.read_log("t2", "activity", {}, 100)
    assert entries == []


async def test_concurrent_commits_group_and_number_densely(store: Store) -> None:
    keys = [RecordKey("t1", "activity", f"r{i}") for i in range(300)]
    results = await asyncio.gather(*(store.commit(_write(k, 1)) for k in keys))
    seqs = sorted(p.seq for positions in results for p in positions)
    assert seqs == list(range(seqs[0], seqs[0] + 300))
    assert len(await store.load_records(keys)) == 300


async def test_read_log_pages_with_cursor_and_bu_filter(store: Store) -> None:
    for i in range(25):
        bu = "bu1" if i % 2 == 0 else "bu2"
        await store.commit(_write(RecordKey("t1", "activity", f"r{i}"), 1, bu=bu))
    cursor: dict[NodeId, int] = {}
    seen: list[str] = []
    while True:
        page, more = await store.read_log("t1", "activity", cursor, 5)
        seen.extend(e.key.record_id for e in page)
        for e in page:
            cursor[e.position.node_id] = e.position.seq
        if not more:
            break
    assert seen == [f"r{i}" for i in range(25)]
    only_bu2, more = await store.read_log("t1", "activity", {}, 100, frozenset({"bu2"}))
    assert not more and {e.bu for e in only_bu2} == {"bu2"} and len(only_bu2) == 12


async def test_whole_batch_commits_or_nothing(store: Store) -> None:
    await store.commit(_write(KEY, 1))
    bad = _write(RecordKey("t1", "activity", "rec-2"), 1)
    bad.entries.append(bad.entries[0])
    bad.records.append(RecordWrite(KEY, "bu1", b"x", "{}", 99))
    bad.idempotency = IdempotencyWrite("t1", "user-1", "k", "h", b"r", time.time() + 60)
    bad.claims.append(ClientClaim("t1", 7, "dev-1"))
    # a NOT NULL violation fails the transaction part-way through
    bad.records.append(RecordWrite(KEY, None, b"x", "{}", 100))  # type: ignore[arg-type]
    with pytest.raises(StorageUnavailable):
        await store.commit(bad)
    row = await store.get_record(KEY)
    assert row is not None and row.version == 1
    assert await store.get_record(RecordKey("t1", "activity", "rec-2")) is None
    assert await store.get_idempotency("t1", "user-1", "k", time.time()) is None
    assert await store.client_owners("t1", [7]) == {}
    # and the store still works, with no gap in the sequence
    positions = await store.commit(_write(KEY, 2))
    entries, _ = await store.read_log("t1", "activity", {}, 100)
    assert [e.position.seq for e in entries] == [entries[0].position.seq, positions[0].seq]
    assert positions[0].seq == entries[0].position.seq + 1


async def test_idempotency_keys_expire(store: Store) -> None:
    now = time.time()
    batch = _write(KEY, 1)
    batch.idempotency = IdempotencyWrite("t1", "u", "key-1", "hash", b"answer", now + 10)
    await store.commit(batch)
    row = await store.get_idempotency("t1", "u", "key-1", now)
    assert row is not None and row.request_hash == "hash" and row.response == b"answer"
    assert await store.get_idempotency("t1", "other-user", "key-1", now) is None
    assert await store.get_idempotency("t1", "u", "key-1", now + 11) is None
    await store.prune(now + 11)
    assert await store.get_idempotency("t1", "u", "key-1", now) is None


async def test_client_id_claims_keep_the_first_owner(store: Store) -> None:
    await store.commit(WriteBatch(claims=[ClientClaim("t1", 42, "dev-a")]))
    await store.commit(WriteBatch(claims=[ClientClaim("t1", 42, "dev-a")]))  # again: fine
    late = _write(KEY, 1)
    late.claims.append(ClientClaim("t1", 42, "dev-b"))  # another node's cache missed dev-a
    with pytest.raises(RecordConflict):
        await store.commit(late)
    assert await store.get_record(KEY) is None
    assert await store.client_owners("t1", [42, 43]) == {42: "dev-a"}
    assert await store.client_owners("t2", [42]) == {}


async def test_fold_moves_tail_into_snapshot(store: Store) -> None:
    positions = []
    for v in range(1, 6):
        positions += await store.commit(_write(KEY, v, b"u%d" % v))
    assert await store.records_to_compact(5, 10) == [KEY]
    await store.commit(WriteBatch(folds=[Fold(KEY, b"snap", tuple(positions[:4]))]))
    rec = (await store.load_records([KEY]))[KEY]
    assert rec.row.snapshot == b"snap" and [e.update for e in rec.tail] == [b"u5"]
    assert await store.records_to_compact(5, 10) == []
    # the change log itself still serves pulls
    entries, _ = await store.read_log("t1", "activity", {}, 100)
    assert len(entries) == 5
    assert len(await store.record_log(KEY)) == 5


async def test_quarantine_is_kept_out_of_the_log(store: Store) -> None:
    await store.commit(
        WriteBatch(quarantine=[QuarantineItem(KEY, "u", "dev", "panic", b"\xff\xff")])
    )
    assert await store.read_log("t1", "activity", {}, 10) == ([], False)
    assert await store.get_record(KEY) is None


async def test_acknowledged_writes_survive_reopen(store_factory: StoreFactory) -> None:
    store: Store = await store_factory()
    await store.commit(_write(KEY, 1, b"durable"))
    await store.close()
    reopened: Store = await store_factory()
    rec = (await reopened.load_records([KEY]))[KEY]
    assert [e.update for e in rec.tail] == [b"durable"]
    positions = await reopened.commit(_write(KEY, 2))
    assert positions[0].seq == rec.tail[0].position.seq + 1


async def test_closed_store_refuses_commits(store_factory: StoreFactory) -> None:
    store: Store = await store_factory()
    await store.close()
    with pytest.raises(StorageUnavailable):
        await store.commit(_write(KEY, 1))


async def test_record_writes_continue_the_stored_version(store: Store) -> None:
    await store.commit(_write(KEY, 1, b"a"))
    for stale in (_write(KEY, 1, b"again"), _write(KEY, 3, b"skips")):
        with pytest.raises(RecordConflict):
            await store.commit(stale)
    two_steps = _write(KEY, 2, b"b")
    two_steps.entries += _write(KEY, 3, b"c").entries
    two_steps.records += _write(KEY, 3, b"c").records
    await store.commit(two_steps)
    rec = (await store.load_records([KEY]))[KEY]
    assert rec.row.version == 3 and rec.row.materialized == '{"v": 3}'
    assert [e.update for e in rec.tail] == [b"a", b"b", b"c"]  # refused batches left nothing


async def test_a_conflict_in_a_batch_writes_none_of_it(store: Store) -> None:
    await store.commit(_write(KEY, 1))
    other = RecordKey("t1", "activity", "rec-2")
    batch = _write(other, 1, b"fine")
    batch.entries += _write(KEY, 1, b"stale").entries
    batch.records += _write(KEY, 1, b"stale").records
    batch.claims.append(ClientClaim("t1", 9, "dev-1"))
    with pytest.raises(RecordConflict):
        await store.commit(batch)
    assert await store.get_record(other) is None
    assert await store.client_owners("t1", [9]) == {}
    entries, _ = await store.read_log("t1", "activity", {}, 100)
    assert len(entries) == 1


async def test_a_fold_of_folded_entries_is_skipped(store: Store) -> None:
    positions = []
    for v in range(1, 4):
        positions += await store.commit(_write(KEY, v, b"u%d" % v))
    newer = Fold(KEY, b"snap-all", tuple(positions))
    older = Fold(KEY, b"snap-two", tuple(positions[:2]))  # read before the newer fold landed
    await store.commit(WriteBatch(folds=[newer]))
    await store.commit(WriteBatch(folds=[older]))
    rec = (await store.load_records([KEY]))[KEY]
    assert rec.row.snapshot == b"snap-all" and rec.tail == ()


async def test_two_nodes_share_a_database(store_factory: StoreFactory) -> None:
    a: Store = await store_factory(register=False)
    b: Store = await store_factory(register=False)
    node_a = await a.register_node(NodeId("node-a"), 501)
    node_b = await b.register_node(NodeId("node-b"), 502)
    assert await a.server_client_ids() == frozenset({501, 502})
    await a.commit(_write(KEY, 1, b"from-a"))
    with pytest.raises(RecordConflict):  # b merged on a state without a's write
        await b.commit(_write(KEY, 1, b"from-b"))
    pb = await b.commit(_write(KEY, 2, b"from-b"))
    pa = await a.commit(_write(RecordKey("t1", "activity", "rec-2"), 1))
    assert pb[0] == (node_b.node_id, 1) and pa[0] == (node_a.node_id, 2)
    assert await b.log_heads() == {node_a.node_id: 2, node_b.node_id: 1}
    from_a = await b.read_node_log(node_a.node_id, 0, 10)
    assert [e.update for e in from_a] == [b"from-a", b"u"]
    assert [e.position.seq for e in await b.read_node_log(node_a.node_id, 1, 10)] == [2]
    assert await b.read_node_log(node_a.node_id, 0, 1) == from_a[:1]
    entries, more = await a.read_log("t1", "activity", {node_a.node_id: 2}, 10)
    assert [e.update for e in entries] == [b"from-b"] and not more
    rec = (await a.load_records([KEY]))[KEY]
    assert rec.row.version == 2 and [e.update for e in rec.tail] == [b"from-a", b"from-b"]


async def test_record_versions(store: Store) -> None:
    other = RecordKey("t1", "activity", "rec-2")
    await store.commit(_write(KEY, 1))
    await store.commit(_write(KEY, 2))
    await store.commit(_write(other, 1))
    missing = RecordKey("t1", "activity", "nope")
    foreign = RecordKey("t2", "activity", KEY.record_id)
    assert await store.record_versions([KEY, other, missing, foreign, KEY]) == {KEY: 2, other: 1}


async def test_record_decisions_are_the_last_entries_with_decisions(store: Store) -> None:
    for v in range(1, 6):
        batch = _write(KEY, v, b"u%d" % v)
        if v % 2:
            decided = f'[{{"rule": "r{v}"}}]'
            batch.entries.append(NewEntry(KEY, "bu1", b"fix", v, "server", "u", None, decided))
        await store.commit(batch)
    entries = await store.record_decisions(KEY, 2)
    assert [e.decisions for e in entries] == ['[{"rule": "r3"}]', '[{"rule": "r5"}]']
    assert all(e.update == b"" and e.origin == "server" for e in entries)
    assert len(await store.record_decisions(KEY, 10)) == 3
    assert await store.record_decisions(RecordKey("t2", KEY.domain, KEY.record_id), 10) == []
