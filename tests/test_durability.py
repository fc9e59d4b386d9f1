"""Acknowledged writes survive kill -9; compaction keeps updates still waiting for their parents."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.compaction import compact_due, compact_reported
from server.config import Config
from server.services import SERVICES
from storage import RecordKey
from tests.helpers import GENEROUS, SECRET, Api, Replica, ServerProcess, b64, token


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "durable.db")
    yield proc
    proc.stop()


async def _writer(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    acked: dict[str, str],
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        batch = {str(uuid.uuid4()): Replica() for _ in range(20)}
        items = [
            {"record_id": r, "bu": "bu1", "update": b64(rep.set(jobdesc=f"job {r}"))}
            for r, rep in batch.items()
        ]
        try:
            async with session.post(
                f"{url}/api/v1/sync/activity/sync", json={"items": items}, headers=headers
            ) as resp:
                if resp.status != 200:
                    continue
                for result in (await resp.json())["results"]:
                    if result["status"] == "created":
                        acked[result["record_id"]] = f"job {result['record_id']}"
        except (TimeoutError, aiohttp.ClientError):
            return


async def test_every_acknowledged_record_survives_kill_9(server_process: ServerProcess) -> None:
    server_process.start()
    await server_process.ready()
    headers = {"Authorization": f"Bearer {token()}", "Device-Id": "dev-1"}
    acked: dict[str, str] = {}
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        writers = [
            asyncio.create_task(_writer(session, server_process.url, headers, acked, stop))
            for _ in range(8)
        ]
        deadline = time.monotonic() + 10
        while len(acked) < 400 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        server_process.kill9()  # mid-flight: requests are still being written
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
    assert len(acked) >= 400

    server_process.start()
    await server_process.ready()
    async with aiohttp.ClientSession() as session:
        found: dict[str, Any] = {}
        cursor = None
        for _ in range(1000):
            params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            async with session.get(
                f"{server_process.url}/api/v1/sync/activity/changes", params=params, headers=headers
            ) as resp:
                page = await resp.json()
            found.update({c["record_id"]: c for c in page["changes"]})
            cursor = page["cursor"]
            if not page["has_more"]:
                break
        missing = set(acked) - set(found)
        assert not missing, f"{len(missing)} acknowledged records lost"
        sample = sorted(acked)[:: max(1, len(acked) // 20)]
        for record_id in sample:
            async with session.get(
                f"{server_process.url}/api/v1/records/activity/{record_id}", headers=headers
            ) as resp:
                assert (await resp.json())["fields"] == {"jobdesc": acked[record_id]}


async def test_compaction_keeps_pending_updates_across_restart(tmp_path: Path) -> None:
    config = Config(db=str(tmp_path / "compact.db"), jwt_secret=SECRET, rates=GENEROUS)
    rep = Replica()
    parent, child, grandchild = rep.set(jobdesc="1"), rep.set(remarks="2"), rep.set(priority="LOW")
    other = Replica()
    r = str(uuid.uuid4())

    async with TestClient(TestServer(create_app(config))) as client:
        dev = Api(client, token())
        # the device's last two updates arrive, its first is lost on the way
        assert (await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": grandchild}]))[
            0
        ]["status"] == "pending"
        assert (await dev.push("activity", [{"record_id": r, "update": child}]))[0][
            "status"
        ] == "pending"
        assert (
            await dev.push("activity", [{"record_id": r, "update": other.set(assignee="bob")}])
        )[0]["status"] == "merged"
        store = client.app[SERVICES].store
        assert await compact_due(store, min_tail=1) == 1
        key = RecordKey("t1", "activity", r)
        folded = (await store.load_records([key]))[key]
        assert folded.tail == () and folded.row.snapshot
        # yrs shows a pending struct's value at once, behind a gap in that writer's clock
        before = await (
            await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())
        ).json()
        assert before["fields"] == {"assignee": "bob", "remarks": "2", "priority": "LOW"}

    async with TestClient(TestServer(create_app(config))) as client:
        dev = Api(client, token())
        still = await dev.push("activity", [{"record_id": r, "update": child}])
        assert still[0]["status"] == "pending"
        done = await dev.push("activity", [{"record_id": r, "update": parent}])
        assert done[0]["status"] == "merged"
        after = await (
            await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())
        ).json()
        assert after["fields"] == {
            "assignee": "bob",
            "jobdesc": "1",
            "remarks": "2",
            "priority": "LOW",
        }
        # a fresh device that pulls everything rebuilds the same record
        changes, _ = await dev.pull_all("activity")
        fresh = Replica()
        for change in changes:
            fresh.apply(change["update"])
        assert fresh.state() == after["fields"]


@contextlib.asynccontextmanager
async def _log_inserts_fail_for(db: str, record_id: str) -> AsyncIterator[None]:
    """A real database failure: a trigger aborts any transaction that logs `record_id`."""
    if not db.startswith("postgresql://"):
        with sqlite3.connect(db) as conn:
            conn.execute(
                f"CREATE TRIGGER boom BEFORE INSERT ON log WHEN NEW.record_id = '{record_id}'"
                " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        yield
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TRIGGER boom")
        return
    pg = await asyncpg.connect(db)
    try:
        await pg.execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN IF NEW.record_id = '{record_id}' THEN RAISE EXCEPTION 'disk on fire';"
            " END IF; RETURN NEW; END $$;"
            " CREATE TRIGGER boom BEFORE INSERT ON log FOR EACH ROW EXECUTE FUNCTION boom()"
        )
        yield
        await pg.execute("DROP TRIGGER boom ON log")
    finally:
        await pg.close()


async def test_a_failed_commit_answers_503_and_changes_nothing(api: Any, config: Config) -> None:
    """A real database failure (a trigger aborts the transaction) during a push."""
    dev = api()
    kept, doomed = str(uuid.uuid4()), str(uuid.uuid4())
    rep = Replica()
    await dev.push(
        "activity", [{"record_id": kept, "bu": "bu1", "update": rep.set(jobdesc="before")}]
    )
    lost = rep.set(remarks="never acknowledged")
    async with _log_inserts_fail_for(config.db, doomed):
        resp = await dev.client.post(
            "/api/v1/sync/activity/sync",
            headers=dev.headers(),
            json={
                "items": [
                    {"record_id": kept, "update": b64(lost)},
                    {"record_id": doomed, "bu": "bu1", "update": b64(Replica().set(jobdesc="x"))},
                ]
            },
        )
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "storage_unavailable"
    # neither item was kept, in storage or in memory
    record = await (
        await dev.client.get(f"/api/v1/records/activity/{kept}", headers=dev.headers())
    ).json()
    assert record["fields"] == {"jobdesc": "before"} and record["version"] == 1
    assert (
        await dev.client.get(f"/api/v1/records/activity/{doomed}", headers=dev.headers())
    ).status == 404
    catch_up = await dev.push(
        "activity", [{"record_id": kept, "state_vector": Replica().doc.get_state()}]
    )
    fresh = Replica()
    fresh.apply(catch_up[0]["update"])
    assert fresh.state() == {"jobdesc": "before"}
    # the retry succeeds
    retry = await dev.push("activity", [{"record_id": kept, "update": lost}])
    assert retry[0]["status"] == "merged" and retry[0]["version"] == 2


async def test_records_whose_tail_grew_are_compacted_and_stay_intact(
    make_client: Any,
) -> None:
    client = await make_client(compaction_min_tail=4)
    dev = Api(client, token())
    r = str(uuid.uuid4())
    rep = Replica()
    await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": rep.set(jobdesc="v0")}])
    for i in range(5):
        await dev.push("activity", [{"record_id": r, "update": rep.set(remarks=f"r{i}")}])
    pipeline = client.server.app[SERVICES].pipeline
    assert RecordKey("t1", "activity", r) in pipeline.compaction_due
    assert await compact_reported(pipeline) == 1
    key = RecordKey("t1", "activity", r)
    stored = (await pipeline.store.load_records([key]))[key]
    assert stored.tail == () and stored.row.snapshot
    assert pipeline.compaction_due == set()
    await dev.push("activity", [{"record_id": r, "update": rep.set(priority="LOW")}])
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())).json()
    assert record["fields"] == {"jobdesc": "v0", "remarks": "r4", "priority": "LOW"}
    changes, _ = await dev.pull_all("activity")
    fresh = Replica()
    for change in changes:
        fresh.apply(change["update"])
    assert fresh.state() == record["fields"]
