"""Long work runs in time slices: a large push (in its tenant's turn, so merges of one
record still commit in the order they were made) and a large pull page let other tenants'
requests through."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from server.auth import Principal
from server.changes import merge_page
from server.keyed_locks import KeyedLocks
from server.merge_types import Actor, PushItem
from server.pipeline import Pipeline
from server.services import SERVICES
from server.slices import SliceBudgets
from storage import RecordKey
from storage.chunked import ROWS_PER_TURN, converted
from storage.types import LogEntry, NodeId, Position, Seq
from tests.helpers import Api, Client, Replica


def _pipeline(client: Client) -> Pipeline:
    assert client.app is not None
    pipeline = client.app[SERVICES].pipeline
    pipeline.slices = SliceBudgets(0.0, 0.0)  # hand the loop back after every item
    return pipeline


async def _merging(pipeline: Pipeline, records: int) -> None:
    """Until a request holds its tenant's turn with `records` loaded: it is merging."""
    for _ in range(5000):
        if len(pipeline.turns) and len(pipeline.live) >= records:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("no merge started")


async def _version(pipeline: Pipeline, key: RecordKey) -> int:
    recs = await pipeline.live.pin_many([key])
    try:
        return recs[key].version
    finally:
        pipeline.live.unpin(recs.values())


def _creates(n: int, bu: str = "bu1") -> list[dict[str, Any]]:
    return [
        {"record_id": str(uuid.uuid4()), "bu": bu, "update": Replica().set(jobdesc=f"job {i}")}
        for i in range(n)
    ]


async def test_a_large_push_lets_another_tenants_push_through(
    client: Client, api: Callable[..., Api]
) -> None:
    pipeline = _pipeline(client)
    big, small = api("t1"), api("t2")
    replica = Replica()
    record = {"record_id": str(uuid.uuid4()), "bu": "bu1"}
    await small.push("activity", [{**record, "update": replica.set(jobdesc="a")}])
    finished: list[str] = []

    async def push(who: Api, name: str, items: list[dict[str, Any]]) -> None:
        results = await who.push("activity", items)
        assert {r["status"] for r in results} <= {"created", "merged"}
        finished.append(name)

    large = asyncio.create_task(push(big, "large", _creates(1000)))
    await _merging(pipeline, 1001)
    task = asyncio.create_task(
        push(small, "small", [{**record, "update": replica.set(jobdesc="b")}])
    )
    key = RecordKey("t2", "activity", record["record_id"])
    while await _version(pipeline, key) < 2:
        await asyncio.sleep(0.001)
    assert not large.done() and len(pipeline.turns) > 0  # the large one still merges
    await asyncio.gather(task, large)
    assert sorted(finished) == ["large", "small"]


def _actor(tenant: str, device: str) -> Actor:
    return Actor(Principal("u1", tenant, None, frozenset(), time.time() + 3600), device)


def _items(replicas: dict[str, Replica], value: str) -> list[PushItem]:
    return [PushItem(r, "bu1", rep.set(jobdesc=value), None) for r, rep in replicas.items()]


async def test_tenants_take_turns_however_many_requests_one_has_in_flight(
    client: Client,
) -> None:
    """Eight pushes of one tenant are merging when another tenant pushes: its merge gets one
    slice for every slice of the eight together, not one in nine."""
    pipeline = _pipeline(client)
    quiet = {str(uuid.uuid4()): Replica() for _ in range(150)}
    await pipeline.push(_actor("t2", "q"), "activity", _items(quiet, "loaded"))  # now cached
    merged: list[str] = []
    merge_in_turn = pipeline._merge_in_turn

    async def spy(tenant: str, *args: Any) -> Any:
        merge = await merge_in_turn(tenant, *args)
        merged.append(tenant)
        return merge

    pipeline._merge_in_turn = spy  # type: ignore[method-assign,assignment]
    busy = [
        asyncio.create_task(
            pipeline.push(
                _actor("t1", f"d{n}"),
                "activity",
                _items({str(uuid.uuid4()): Replica() for _ in range(150)}, "new"),
            )
        )
        for n in range(8)
    ]
    await _merging(pipeline, 9 * 150)
    merged.clear()  # count the merges that end while t2 pushes
    await pipeline.push(_actor("t2", "q"), "activity", _items(quiet, "edited"))
    await asyncio.gather(*busy)
    assert merged.index("t2") < 3, merged


async def test_sliced_merges_of_the_same_records_commit_in_order(
    client: Client, api: Callable[..., Api]
) -> None:
    """Pushes that touch the same records in opposite orders: no deadlock, no merge lost
    to a version conflict (one node: nothing else writes), every edit kept."""
    pipeline = _pipeline(client)
    records = [str(uuid.uuid4()) for _ in range(12)]
    replicas = {r: Replica() for r in records}
    await api().push(
        "activity",
        [{"record_id": r, "bu": "bu1", "update": replicas[r].set(jobdesc="new")} for r in records],
    )

    async def device(n: int) -> None:
        order = records if n % 2 else records[::-1]
        writers = {r: Replica() for r in order}
        items = [
            {"record_id": r, "bu": "bu1", "update": writers[r].set(**{f"remarks{n}": f"d{n}"})}
            for r in order
        ]
        results = await api(device=f"dev-{n}").push("activity", items)
        assert {r["status"] for r in results} == {"merged"}

    await asyncio.gather(*(device(n) for n in range(6)))
    assert pipeline.merge_retries == 0
    keys = [RecordKey("t1", "activity", r) for r in records]
    stored = await pipeline.store.load_records(keys)
    assert {k: s.row.version for k, s in stored.items()} == dict.fromkeys(keys, 7)
    for key in keys:
        log = await pipeline.store.record_log(key)
        assert [e.version for e in log if e.origin == "device"] == list(range(1, 8))


async def test_a_record_discarded_during_a_pause_is_merged_again(
    client: Client, api: Callable[..., Api]
) -> None:
    pipeline = _pipeline(client)
    items = _creates(300)
    last = RecordKey("t1", "activity", items[-1]["record_id"])
    task = asyncio.create_task(api().push("activity", items))
    await _merging(pipeline, 300)
    recs = await pipeline.live.pin_many([last])
    pipeline.live.poison(recs[last])  # as a failed commit of another request would
    pipeline.live.unpin(recs.values())
    results = await task
    assert {r["status"] for r in results} == {"created"}
    assert pipeline.merge_retries == 1
    stored = await pipeline.store.load_records(
        [RecordKey("t1", "activity", i["record_id"]) for i in items]
    )
    assert {k.record_id for k, s in stored.items() if s.row.version == 1} == {
        i["record_id"] for i in items
    }


async def test_a_tenants_requests_take_turns_and_turns_are_dropped_when_free() -> None:
    turns: KeyedLocks[str] = KeyedLocks()
    inside: list[str] = []
    most = 0

    async def request(tenant: str) -> None:
        nonlocal most
        async with turns.exclusive(tenant):
            inside.append(tenant)
            most = max(most, inside.count("t1"))
            await asyncio.sleep(0.005)
            inside.remove(tenant)

    await asyncio.wait_for(asyncio.gather(*(request(t) for t in ["t1"] * 4 + ["t2"])), 5)
    assert most == 1
    assert len(turns) == 0


async def test_a_cancelled_wait_for_a_turn_leaves_nothing_behind() -> None:
    turns: KeyedLocks[str] = KeyedLocks()
    await turns.acquire("t1")
    waiter = asyncio.create_task(turns.acquire("t1"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    turns.release("t1")
    assert len(turns) == 0


async def _ticks_during(work: Any) -> tuple[Any, int]:
    """Run `work` beside a task that counts how often the loop let it run."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    try:
        result = await work
    finally:
        done = True
        await task
    return result, ticks - start


async def test_a_large_pull_page_is_merged_in_slices() -> None:
    entries: list[LogEntry] = []
    for n in range(1000):
        replica, key = Replica(), RecordKey("t1", "activity", str(uuid.uuid4()))
        for v in range(1, 4):  # three updates a record: merged into one change
            update = replica.set(jobdesc=f"job {n}", priority=v)
            position = Position(NodeId("n1"), Seq(len(entries) + 1))
            entries.append(LogEntry(position, key, "bu1", update, v, "device", "u1", "d", "", 0))
    page, ticks = await _ticks_during(merge_page(entries))
    assert len(page) == 1000 and {c["version"] for c in page} == {3}
    assert ticks > 0  # the loop ran something else meanwhile


async def test_rows_are_converted_handing_the_loop_back_between_chunks() -> None:
    rows = list(range(ROWS_PER_TURN * 3 + 1))
    out, ticks = await _ticks_during(converted(rows, str))
    assert out == [str(r) for r in rows]
    assert ticks >= 3
