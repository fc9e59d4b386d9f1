"""Several nodes on one database, in one test process: each node is a whole app.

The nodes share nothing but the database. Run on every backend; PostgreSQL nodes
also hear each other's commits at once (LISTEN/NOTIFY), SQLite nodes by polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from crdt_models.yupdate import inspect_state_vector
from server.app import create_app
from server.config import Config
from server.ratelimit import Rate
from server.services import SERVICES
from tests.helpers import Api, Client, Replica, SocketDevice, token
from tests.test_yjs_socket import open_peer

Node = Callable[[str], Awaitable[Client]]
TOKEN = token("t1", ("bu1",), "u1")


@pytest.fixture
def node(aiohttp_client: AiohttpClient, config: Config) -> Node:
    async def start(node_id: str) -> Client:
        changed = dataclasses.replace(config, node_id=node_id, peer_poll_s=0.2)
        return await aiohttp_client(create_app(changed))

    return start


async def _record(api: Api, client: Client, record_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/v1/records/activity/{record_id}", headers=api.headers())
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_stale_merge_on_one_node_reloads_and_keeps_the_rules(node: Node) -> None:
    a, b = await node("node-a"), await node("node-b")
    on_a, on_b = Api(a, TOKEN, "dev-a"), Api(b, TOKEN, "dev-b")
    rid = str(uuid.uuid4())
    phone_a, phone_b = Replica(), Replica()
    create = phone_a.set(jobdesc="pump check", jobstatus="ASSIGNED")
    await on_a.push("activity", [{"record_id": rid, "bu": "bu1", "update": create}])
    phone_b.apply(create)
    await on_b.push("activity", [{"record_id": rid, "state_vector": b"\x00"}])  # b caches it
    # both phones edit offline; node a takes the completion first
    done = phone_a.set(jobstatus="COMPLETED")
    back = phone_b.set(jobstatus="INPROGRESS", remarks="from b")
    await on_a.push("activity", [{"record_id": rid, "update": done}])
    [result] = await on_b.push("activity", [{"record_id": rid, "update": back}])
    assert result["status"] == "merged"
    # node b judged b's edit against the completed task, not its stale copy
    assert [d["rule"] for d in result["decisions"]] == ["activity.jobstatus_forward"]
    for client in (a, b):
        body = await _record(on_a, client, rid)
        assert body["fields"]["jobstatus"] == "COMPLETED", body
        assert body["fields"]["remarks"] == "from b"
        assert body["version"] == 3  # create, completion, b's edit (+ its repair)


async def test_concurrent_pushes_of_one_record_on_two_nodes_lose_nothing(node: Node) -> None:
    a, b = await node("node-a"), await node("node-b")
    on_a, on_b = Api(a, TOKEN, "dev-a"), Api(b, TOKEN, "dev-b")
    rid = str(uuid.uuid4())
    phones = [Replica() for _ in range(8)]
    create = phones[0].set(jobdesc="many hands", jobstatus="ASSIGNED")
    await Api(a, TOKEN, "dev-0").push(
        "activity", [{"record_id": rid, "bu": "bu1", "update": create}]
    )
    edits = []
    for i, phone in enumerate(phones):
        phone.apply(create)
        edits.append(phone.set(remarks=f"r{i}"))
    apis = [Api(a if i % 2 == 0 else b, TOKEN, f"dev-{i}") for i in range(len(phones))]
    results = await asyncio.gather(
        *(api.push("activity", [{"record_id": rid, "update": u}]) for api, u in zip(apis, edits))
    )
    assert all(r[0]["status"] == "merged" for r in results), [r[0].get("error") for r in results]
    bodies = [await _record(on_a, c, rid) for c in (a, b)]
    assert bodies[0] == bodies[1]
    assert bodies[0]["version"] == 1 + len(phones)
    # every phone's edit is in the merged doc: each phone sees all of them after a pull
    changes, _ = await on_b.pull_all("activity")
    merged = Replica()
    for change in changes:
        merged.apply(change["update"])
    clients = {p.doc.client_id for p in phones}
    assert clients <= set(_state_clients(merged))


async def test_a_merge_redone_after_losing_a_race_counts_once_against_the_record_rate(
    aiohttp_client: AiohttpClient, config: Config
) -> None:
    """Each node lets the record take exactly the updates it is sent: a merge that lost the
    version race to the other node and was merged again must not use a second token."""
    pushes = 16
    rates = dataclasses.replace(config.rates, record=Rate(pushes // 2 + 1, 3600))
    a, b = [
        await aiohttp_client(
            create_app(dataclasses.replace(config, node_id=n, peer_poll_s=0.2, rates=rates))
        )
        for n in ("node-a", "node-b")
    ]
    rid = str(uuid.uuid4())
    phones = [Replica() for _ in range(pushes)]
    create = phones[0].set(jobdesc="many hands", jobstatus="ASSIGNED")
    await Api(a, TOKEN, "dev-0").push(
        "activity", [{"record_id": rid, "bu": "bu1", "update": create}]
    )
    for phone in phones:
        phone.apply(create)
    apis = [Api(a if i % 2 == 0 else b, TOKEN, f"dev-{i}") for i in range(pushes)]
    results = await asyncio.gather(
        *(
            api.push("activity", [{"record_id": rid, "update": p.set(remarks=f"r{i}")}])
            for i, (api, p) in enumerate(zip(apis, phones))
        )
    )
    assert all(r[0]["status"] == "merged" for r in results), [r[0].get("error") for r in results]
    redone = sum(c.app[SERVICES].pipeline.merge_retries for c in (a, b))
    assert (await _record(Api(a, TOKEN, "auditor"), a, rid))["version"] == 1 + pushes, redone


def _state_clients(replica: Replica) -> dict[int, int]:
    return inspect_state_vector(replica.doc.get_state())


async def test_a_device_on_one_node_sees_the_other_nodes_changes_live(node: Node) -> None:
    a, b = await node("node-a"), await node("node-b")
    ws = await a.ws_connect("/api/v1/ws")
    device = SocketDevice(ws)
    await device.hello(TOKEN, "dev-live", ["activity"])
    await device.caught_up("activity")
    rid = str(uuid.uuid4())
    started = time.monotonic()
    update = Replica().set(jobdesc="made on b", jobstatus="ASSIGNED")
    await Api(b, TOKEN, "dev-b").push(
        "activity", [{"record_id": rid, "bu": "bu1", "update": update}]
    )
    while not any(c["record_id"] == rid for c in device.changes):
        await device.recv(timeout=10)
    assert time.monotonic() - started < 10
    await ws.close()
    metrics = await (await a.get("/metrics")).text()
    assert "fieldsync_peer_entries 1.0" in metrics


async def test_a_cursor_from_one_node_resumes_on_the_other(node: Node) -> None:
    a, b = await node("node-a"), await node("node-b")
    on_a, on_b = Api(a, TOKEN, "dev-a"), Api(b, TOKEN, "dev-b")
    first = [str(uuid.uuid4()) for _ in range(6)]
    for i, rid in enumerate(first):
        api = on_a if i % 2 else on_b
        await api.push(
            "activity", [{"record_id": rid, "bu": "bu1", "update": Replica().set(jobdesc=rid)}]
        )
    seen, cursor = await on_b.pull_all("activity", limit=4)
    assert {c["record_id"] for c in seen} == set(first)
    later = [str(uuid.uuid4()) for _ in range(6)]
    for i, rid in enumerate(later):
        api = on_a if i % 2 else on_b
        await api.push(
            "activity", [{"record_id": rid, "bu": "bu1", "update": Replica().set(jobdesc=rid)}]
        )
    resumed, _ = await on_a.pull_all("activity", cursor, limit=4)
    assert sorted(c["record_id"] for c in resumed) == sorted(later)  # no gap, no duplicate


async def test_a_yjs_client_on_one_node_gets_writes_just_acknowledged_by_the_other(
    node: Node, config: Config
) -> None:
    if not config.db.startswith("postgresql"):
        pytest.skip("SQLite nodes hear of a new node only by polling (not a supported setup)")
    a, b = await node("node-a"), await node("node-b")
    rid = str(uuid.uuid4())
    phone = Replica()
    create = phone.set(jobdesc="before", jobstatus="ASSIGNED")
    await Api(a, TOKEN, "dev-a").push(
        "activity", [{"record_id": rid, "bu": "bu1", "update": create}]
    )
    peer = await open_peer(a, rid)  # node a now holds the record in memory
    assert peer.replica.state()["jobdesc"] == "before"
    await peer.ws.close()
    edit = phone.set(jobdesc="after")
    await Api(b, TOKEN, "dev-a").push("activity", [{"record_id": rid, "update": edit}])
    again = await open_peer(a, rid)  # at once: no waiting for node a to hear of it
    assert again.replica.state()["jobdesc"] == "after"
    await again.ws.close()


async def test_a_node_on_a_shared_database_keeps_its_registered_id(
    aiohttp_client: Any, config: Config, tmp_path: Path
) -> None:
    if not config.db.startswith("postgresql"):
        pytest.skip("a SQLite database keeps its one node itself")
    kept = tmp_path / "node.id"
    unnamed = dataclasses.replace(config, node_id=None, node_file=str(kept))
    first = await aiohttp_client(create_app(unnamed))
    node_id = (await (await first.get("/healthz")).json())["node"]
    assert kept.read_text().strip() == node_id
    await first.close()
    again = await aiohttp_client(create_app(unnamed))
    assert (await (await again.get("/healthz")).json())["node"] == node_id
    other = await aiohttp_client(create_app(dataclasses.replace(unnamed, node_file=None)))
    assert (await (await other.get("/healthz")).json())["node"] != node_id
