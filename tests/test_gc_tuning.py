"""Cached records stay cheap for the garbage collector, and the GC policy keeps memory bounded.

The policy (server/gctune.py) freezes long-lived objects, so a frozen object that becomes an
unreachable reference cycle is only reclaimed by a deep collection: these tests check that an
evicted record never needs the collector (no cycles), that loading and evicting many records
under the policy leaves tracked objects and RSS flat, and that the deep collection reclaims
frozen cycles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Array, Doc, Map

from crdt_models import record as records
from crdt_models.registry import get_model
from server.app import create_app
from server.config import Config, Limits
from server.gctune import GcSettings, GcTuning, rss_bytes
from server.live import LiveRecords
from server.services import SERVICES
from storage import RecordKey
from storage.sqlite import SQLiteStore
from tests.helpers import GENEROUS, SECRET, Api, Replica, b64, token

# A cached record is pycrdt's Doc (10 tracked objects of its own), its observer, the
# LiveRecord and its state: 21 today. It was 38, plus 24 never freed, before.
MAX_TRACKED_PER_RECORD = 24


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "gc.db")
    await store.open()
    await store.register_node(None, 1001)
    yield store
    await store.close()


@pytest.fixture
async def policy() -> AsyncIterator[GcTuning]:
    settings = GcSettings(
        growth=1.2,
        min_deep_objects=20_000,
        min_deep_rss=1 << 50,
        check_every_s=0,
        count_every_s=0,
    )
    tuning = GcTuning(settings)
    tuning.install(asyncio.get_running_loop())
    try:
        yield tuning
    finally:
        tuning.uninstall()


def tracked() -> int:
    """Every object the collector knows of, frozen ones included."""
    return len(gc.get_objects()) + gc.get_freeze_count()


async def touch(live: LiveRecords, keys: list[RecordKey]) -> None:
    """What a merge leaves in a cached record: an edit, its captured delta, the new state."""
    recs = await live.pin_many(keys)
    try:
        for rec in recs.values():
            records.root_map(rec.doc, records.FIELDS_ROOT).update(
                {"jobdesc": f"task {rec.key.record_id}", "priority": "HIGH", "gracetime": 15}
            )
            assert rec.take_captured()
            rec.state = records.read_state(rec.doc, get_model(rec.key.domain))
    finally:
        live.unpin(recs.values())


def new_keys(n: int) -> list[RecordKey]:
    return [RecordKey("t1", "activity", str(uuid.uuid4())) for _ in range(n)]


async def test_a_cached_record_costs_few_tracked_objects(store: SQLiteStore) -> None:
    live = LiveRecords(store, 1001, capacity=10_000)
    await touch(live, new_keys(50))  # warm: imports, caches
    gc.collect()
    before = len(gc.get_objects())
    n = 1000
    for _ in range(0, n, 100):
        await touch(live, new_keys(100))
    gc.collect()
    per_record = (len(gc.get_objects()) - before) / n
    assert len(live) == n + 50
    assert per_record <= MAX_TRACKED_PER_RECORD


def test_record_state_holds_only_untracked_containers() -> None:
    doc: Doc[Any] = Doc()
    doc.get(records.FIELDS_ROOT, type=Map).update({"ticketdesc": "printer", "level": 1})
    doc.get(records.META_ROOT, type=Map).update({"lock.level": "bo1"})
    history = doc.get(records.HISTORY_ROOT, type=Array)
    history.append(Map({"when": "2024-05-01T12:00:00Z", "field": "level", "from": 0, "to": 1}))
    state = records.read_state(doc, get_model("helpdesk"))
    assert not gc.is_tracked(state.fields)
    assert not gc.is_tracked(state.meta)
    assert not any(gc.is_tracked(entry) for entry in state.history)  # the tuple is one object
    assert state.history == (
        {"when": "2024-05-01T12:00:00Z", "field": "level", "from": 0, "to": 1},
    )


async def test_evicted_records_are_freed_without_the_collector(store: SQLiteStore) -> None:
    """No reference cycle in a cached record: eviction frees it by reference counting alone,
    which is what makes freezing cached records safe (a frozen cycle is never collected)."""
    live = LiveRecords(store, 1001, capacity=50)
    await touch(live, new_keys(200))
    gc.collect()
    gc.disable()
    try:
        counts = []
        for _ in range(8):
            for _ in range(5):
                await touch(live, new_keys(50))
            counts.append(len(gc.get_objects()))
    finally:
        gc.enable()
    assert len(live) == 50
    # 2000 records went through a 50-record cache: a leak of one object each would show
    assert max(counts) - min(counts) < 200, counts


async def test_memory_is_bounded_under_the_policy(
    aiohttp_client: Any, tmp_path: Path, policy: GcTuning
) -> None:
    """Records pushed, evicted and reloaded through the real pipeline, under the GC policy."""
    config = Config(
        db=str(tmp_path / "server.db"),
        jwt_secret=SECRET,
        rates=GENEROUS,
        cache_size=20,
        limits=Limits(max_items=10),
    )
    client = await aiohttp_client(create_app(config))
    api = Api(client, token())
    # one replica per record, as devices keep them: the server learns each client id once
    replicas = {str(uuid.uuid4()): Replica() for _ in range(300)}
    ids = list(replicas)

    async def push_round(round_no: int) -> None:
        for start in range(0, len(ids), 10):
            items: list[dict[str, Any]] = [
                {
                    "record_id": record_id,
                    "bu": "bu1",
                    "update": replicas[record_id].set(jobdesc=f"round {round_no}"),
                }
                for record_id in ids[start : start + 10]
            ]
            # client.session, not client.post: the test client keeps every response it made
            async with client.session.post(
                client.make_url("/api/v1/sync/activity/sync"),
                json={"items": [{**i, "update": b64(i["update"])} for i in items]},
                headers=api.headers(),
            ) as resp:
                assert resp.status == 200, await resp.text()
                results = (await resp.json())["results"]
            assert all(r["status"] in ("created", "merged") for r in results), results

    samples = []
    for round_no in range(12):
        await push_round(round_no)  # 300 records through a 20-record cache: evict and reload
        gc.collect()  # and the policy freezes what survived it
        samples.append((tracked(), rss_bytes()))
    assert len(client.app[SERVICES].live) <= 20
    assert policy.freezes >= 12
    settled_objects, settled_rss = samples[3]
    final_objects, final_rss = samples[-1]
    # 2700 more record loads after the sample: one leaked object each would show
    assert final_objects - settled_objects < 2_000, samples
    assert final_rss - settled_rss < 8 << 20, samples


async def test_a_deep_collection_reclaims_frozen_cycles(policy: GcTuning) -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Any = None

    def cycles(n: int) -> list[Node]:
        out = []
        for _ in range(n):
            a, b = Node(), Node()
            a.other, b.other = b, a
            out.append(a)
        return out

    gap = policy.deep_limit() - gc.get_freeze_count()  # objects frozen until a deep one
    assert gap > 10_000
    dead = cycles(gap // 8)  # 2 objects a pair: a quarter of the gap
    gc.collect()  # a full collection: the policy freezes them, alive
    frozen = gc.get_freeze_count()
    assert frozen >= policy.deep_frozen + gap // 4 and policy.deep_collections == 0
    del dead  # frozen garbage: only a deep collection reclaims it
    assert gc.get_freeze_count() >= frozen - 1  # the list itself went
    alive = cycles((policy.deep_limit() - frozen) // 2 + 1_000)
    gc.collect()  # past the limit with this full collection: a deep one is due
    for _ in range(10):  # the deep collection runs on the loop
        await asyncio.sleep(0)
        if policy.deep_collections:
            break
    assert policy.deep_collections == 1
    reclaimed = frozen + 2 * len(alive) - gc.get_freeze_count()
    assert reclaimed >= gap // 4  # the dead cycles are gone
    assert all(node.other.other is node for node in alive)


async def test_young_collections_are_short_while_installed() -> None:
    """A generation-1 collection after every 3 generation-0 ones, not 10: shorter pauses."""
    before = gc.get_threshold()
    tuning = GcTuning(GcSettings(young_per_middle=3))
    tuning.install(asyncio.get_running_loop())
    try:
        assert gc.get_threshold() == (before[0], 3, before[2])
    finally:
        tuning.uninstall()
    assert gc.get_threshold() == before


async def test_a_deep_collection_is_due_when_rss_doubled(policy: GcTuning) -> None:
    assert not policy.deep_due()
    policy.deep_rss = rss_bytes() // 3  # as if the process had tripled since the last one
    assert rss_bytes() > 0 and not policy.deep_due()  # below min_deep_rss
    policy.settings = GcSettings(growth=1.2, min_deep_objects=20_000, min_deep_rss=0)
    assert policy.deep_due()


async def test_frozen_objects_are_counted_only_every_count_interval(policy: GcTuning) -> None:
    """Counting frozen objects walks them all while the loop waits: not at every check."""
    policy.settings = dataclasses.replace(policy.settings, count_every_s=3600)
    policy.deep_frozen = 0  # as if the frozen generation had grown past any limit
    policy.settings = dataclasses.replace(policy.settings, min_deep_objects=1)
    gc.collect()  # counts once: the first check
    for _ in range(10):
        await asyncio.sleep(0)
    assert policy.deep_collections == 1
    policy.deep_frozen = 0
    gc.collect()  # checks RSS only: within the hour, no count
    for _ in range(10):
        await asyncio.sleep(0)
    assert policy.deep_collections == 1
    assert policy.deep_due()  # a count would have found it due
