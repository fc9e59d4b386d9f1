"""Two `fieldsync serve` processes on one PostgreSQL database, as a load balancer sees them."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt_models.yupdate import inspect_state_vector
from tests.helpers import Replica, ServerProcess, b64, token
from tests.pg_cluster import PostgresCluster
from tests.test_convergence import scenario, step

HEADERS = {"Authorization": f"Bearer {token()}"}


def _start_nodes(cluster: PostgresCluster, count: int = 2) -> list[ServerProcess]:
    dsn = cluster.create_database(f"nodes_{uuid.uuid4().hex[:10]}")
    nodes = [ServerProcess(dsn, "--node-id", f"node-{i + 1}") for i in range(count)]  # type: ignore[arg-type]
    for node in nodes:
        node.start()
    for node in nodes:
        asyncio.run(node.ready())
    return nodes


@pytest.fixture
def nodes(postgres_cluster: PostgresCluster) -> Iterator[list[ServerProcess]]:
    started = _start_nodes(postgres_cluster)
    yield started
    for node in started:
        node.stop()


@pytest.fixture(scope="module")
def shared_nodes(postgres_cluster: PostgresCluster) -> Iterator[list[ServerProcess]]:
    started = _start_nodes(postgres_cluster)
    yield started
    for node in started:
        node.stop()


async def _push(
    http: aiohttp.ClientSession, url: str, device: str, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async with http.post(
        f"{url}/api/v1/sync/activity/sync",
        json={"items": items},
        headers={**HEADERS, "Device-Id": device},
    ) as resp:
        assert resp.status == 200, await resp.text()
        results: list[dict[str, Any]] = (await resp.json())["results"]
        return results


async def _pull_all(
    http: aiohttp.ClientSession, url: str, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    changes: list[dict[str, Any]] = []
    for _ in range(1000):
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        async with http.get(
            f"{url}/api/v1/sync/activity/changes",
            params=params,
            headers={**HEADERS, "Device-Id": "reader"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        changes += page["changes"]
        cursor = page["cursor"]
        if not page["has_more"]:
            break
    assert cursor is not None
    return changes, cursor


async def test_a_device_on_node_1_sees_node_2s_changes_live(
    shared_nodes: list[ServerProcess],
) -> None:
    one, two = shared_nodes
    rid = str(uuid.uuid4())
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{one.url.replace('http', 'ws')}/api/v1/ws")
        await ws.send_bytes(
            msgpack.packb(
                {"t": "hello", "token": token(), "device": "watcher", "domains": ["activity"]}
            )
        )
        update = Replica().set(jobdesc="made on node 2")
        sent_at = 0.0
        seen_at = None
        deadline = time.monotonic() + 15
        while seen_at is None and time.monotonic() < deadline:
            msg = await ws.receive(timeout=10)
            frame = msgpack.unpackb(msg.data)
            if frame["t"] == "changes" and not frame["has_more"] and not sent_at:
                sent_at = time.monotonic()
                await _push(
                    http, two.url, "maker", [{"record_id": rid, "bu": "bu1", "update": b64(update)}]
                )
            elif frame["t"] == "changes" and any(c["record_id"] == rid for c in frame["changes"]):
                seen_at = time.monotonic()
        await ws.close()
    assert seen_at is not None, "node 1 never delivered node 2's change"
    assert seen_at - sent_at < 1.0  # NOTIFY, not the poll


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n_devices=st.integers(2, 4),
    steps=st.lists(step, min_size=1, max_size=20),
    data=st.data(),
)
def test_offline_edits_pushed_to_both_nodes_converge_and_rules_hold(
    shared_nodes: list[ServerProcess],
    n_devices: int,
    steps: list[tuple[str, int, str]],
    data: st.DataObject,
) -> None:
    asyncio.run(scenario([n.url for n in shared_nodes], n_devices, steps, data))


async def test_concurrent_pushes_of_one_record_to_both_nodes_keep_every_edit(
    shared_nodes: list[ServerProcess],
) -> None:
    rid = str(uuid.uuid4())
    creator = Replica()
    create = creator.set(jobdesc="contended", jobstatus="ASSIGNED")
    phones = []
    for _ in range(12):
        phone = Replica()
        phone.apply(create)
        phones.append(phone)
    async with aiohttp.ClientSession() as http:
        await _push(
            http,
            shared_nodes[0].url,
            "creator",
            [{"record_id": rid, "bu": "bu1", "update": b64(create)}],
        )
        statuses = ["INPROGRESS", "COMPLETED", "ASSIGNED"]
        pushes = [
            _push(
                http,
                shared_nodes[i % 2].url,
                f"phone-{i}",
                [
                    {
                        "record_id": rid,
                        "update": b64(p.set(remarks=f"p{i}", jobstatus=statuses[i % 3])),
                    }
                ],
            )
            for i, p in enumerate(phones)
        ]
        results = await asyncio.gather(*pushes)
        assert all(r[0]["status"] == "merged" for r in results), [
            (r[0]["status"], r[0].get("error")) for r in results
        ]
        changes, _ = await _pull_all(http, shared_nodes[1].url)
        async with http.get(
            f"{shared_nodes[0].url}/api/v1/records/activity/{rid}",
            headers={**HEADERS, "Device-Id": "auditor"},
        ) as resp:
            record = await resp.json()
    merged = Replica()
    for change in changes:
        if change["record_id"] == rid:
            merged.apply(base64.b64decode(change["update"]))
    state = merged.state()
    assert state["jobstatus"] == record["fields"]["jobstatus"]
    # once any phone completed the task, nothing moved it back
    assert record["fields"]["jobstatus"] == "COMPLETED"
    assert record["version"] == 1 + len(phones)
    have = inspect_state_vector(merged.doc.get_state())
    assert all(p.doc.client_id in have for p in phones)


async def test_kill_9_of_one_node_loses_nothing_and_its_devices_resume_on_the_other(
    nodes: list[ServerProcess],
) -> None:
    one, two = nodes
    acked: dict[str, str] = {}
    stop = asyncio.Event()

    async def writer(http: aiohttp.ClientSession, device: str) -> None:
        while not stop.is_set():
            batch = {str(uuid.uuid4()): Replica() for _ in range(10)}
            items = [
                {"record_id": r, "bu": "bu1", "update": b64(rep.set(jobdesc=f"job {r}"))}
                for r, rep in batch.items()
            ]
            try:
                results = await _push(http, one.url, device, items)
            except (AssertionError, aiohttp.ClientError, TimeoutError):
                return
            for result in results:
                if result["status"] == "created":
                    acked[result["record_id"]] = f"job {result['record_id']}"

    async with aiohttp.ClientSession() as http:
        _, cursor = await _pull_all(http, one.url)  # a device's cursor from node 1
        writers = [asyncio.create_task(writer(http, f"dev-{i}")) for i in range(6)]
        deadline = time.monotonic() + 15
        while len(acked) < 300 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        one.kill9()
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
        assert len(acked) >= 300
        # the device resumes on node 2 with the cursor node 1 gave it
        changes, _ = await _pull_all(http, two.url, cursor)
    got = [c["record_id"] for c in changes]
    assert len(got) == len(set(got)), "a change was delivered twice"
    missing = set(acked) - set(got)
    assert not missing, f"{len(missing)} acknowledged records lost"
