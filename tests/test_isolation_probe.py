"""Broken-object-level-authorization probe: 3 tenants x 2 bus, every route and frame type.

Each (tenant, bu) holds a record whose fields carry a marker. A principal scoped to one
tenant's bu1 probes with its own, another tenant's, another bu's, unknown and malformed
ids. No answer may carry a foreign marker, and "not yours" must look exactly like
"does not exist".
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import msgpack
import pytest

from server.yprotocol import STEP1, STEP2, SYNC, Reader, message
from tests.helpers import Api, Client, Replica, SocketDevice, b64, token

TENANTS, BUS = ("ta", "tb", "tc"), ("bu1", "bu2")


def marker(tenant: str, bu: str) -> str:
    return f"SECRET-{tenant}-{bu}"


@pytest.fixture
async def world(client: Client) -> dict[tuple[str, str], str]:
    """One record per (tenant, bu), all with the same record ids across tenants."""
    ids = {bu: str(uuid.uuid4()) for bu in BUS}
    for tenant in TENANTS:
        writer = Api(client, token(tenant, ["*"], user="admin"), device=f"seed-{tenant}")
        for bu in BUS:
            update = Replica().set(jobdesc=marker(tenant, bu))
            await writer.push("activity", [{"record_id": ids[bu], "bu": bu, "update": update}])
    return {(t, bu): ids[bu] for t in TENANTS for bu in BUS}


def foreign_markers(tenant: str) -> list[bytes]:
    own = marker(tenant, "bu1")
    return [marker(t, b).encode() for t in TENANTS for b in BUS if marker(t, b) != own]


def assert_clean(raw: bytes, tenant: str) -> None:
    for foreign in foreign_markers(tenant):
        assert foreign not in raw, foreign


async def test_http_probe(client: Client, world: dict[tuple[str, str], str]) -> None:
    for tenant in TENANTS:
        api = Api(client, token(tenant, ["bu1"], user="probe"), device="probe")
        own, other_bu = world[(tenant, "bu1")], world[(tenant, "bu2")]
        probes = [own, other_bu, str(uuid.uuid4())]
        items = [{"record_id": r, "state_vector": b64(b"\x00")} for r in probes]
        resp = await client.post(
            "/api/v1/sync/activity/sync", json={"items": items}, headers=api.headers()
        )
        raw = await resp.read()
        assert_clean(raw, tenant)
        results = (await resp.json())["results"]
        assert results[0]["status"] == "unchanged" and results[0]["update"]
        assert (
            results[1]["error"]
            == results[2]["error"]
            == {"code": "not_found", "message": "no such record"}
        )
        assert results[1]["version"] == results[2]["version"] == 0
        # writing another bu's record: not found, and nothing changes there
        write = await api.push("activity", [{"record_id": other_bu, "update": Replica().set(x=1)}])
        assert write[0]["error"]["code"] == "not_found"
        # pull: only the own bu of the own tenant
        resp = await client.get("/api/v1/sync/activity/changes", headers=api.headers())
        assert_clean(await resp.read(), tenant)
        # the back-office read: the same 404 for another bu, an unknown id and a malformed one
        bodies = set()
        for record_id in (other_bu, str(uuid.uuid4()), "..%2F..%2Fetc", "x" * 300):
            resp = await client.get(f"/api/v1/records/activity/{record_id}", headers=api.headers())
            assert resp.status in (404, 400)
            raw = await resp.read()
            assert_clean(raw, tenant)
            if resp.status == 404:
                bodies.add(raw)
        assert len(bodies) == 1


async def test_device_socket_probe(client: Client, world: dict[tuple[str, str], str]) -> None:
    for tenant in TENANTS:
        ws = await client.ws_connect("/api/v1/ws")
        dev = SocketDevice(ws)
        seen: list[bytes] = []
        await dev.hello(token(tenant, ["bu1"], user="probe"), "probe", ["activity", "helpdesk"])
        other_bu = world[(tenant, "bu2")]
        await dev.send(
            {
                "t": "push",
                "id": 1,
                "domain": "activity",
                "items": [
                    {"record_id": other_bu, "state_vector": b"\x00"},
                    {"record_id": str(uuid.uuid4()), "state_vector": b"\x00"},
                    {"record_id": other_bu, "update": Replica().set(x=1)},
                ],
            }
        )
        await dev.send({"t": "push", "id": 2, "domain": "payroll", "items": []})
        await dev.send(
            {"t": "push", "id": 3, "domain": "activity", "items": [{"record_id": "../x"}]}
        )
        await dev.send({"t": "ping"})
        async with asyncio.timeout(5):
            while True:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.BINARY
                seen.append(msg.data)
                frame = msgpack.unpackb(msg.data)
                if frame["t"] == "ack":
                    codes = [r["error"]["code"] for r in frame["results"]]
                    assert codes == ["not_found"] * 3
                if frame["t"] == "pong":
                    break
        assert_clean(b"".join(seen), tenant)
        await ws.close()


async def test_yjs_socket_probe(client: Client, world: dict[tuple[str, str], str]) -> None:
    for tenant in TENANTS:
        tok = token(tenant, ["bu1"], user="probe")
        other_bu = world[(tenant, "bu2")]
        statuses = []
        for record_id, bu in ((other_bu, "bu1"), (other_bu, "bu2"), (str(uuid.uuid4()), "bu2")):
            try:
                await client.ws_connect(f"/api/v1/yjs/activity/{record_id}?token={tok}&bu={bu}")
                raise AssertionError("connected out of scope")
            except aiohttp.WSServerHandshakeError as exc:
                statuses.append(exc.status)
        assert statuses == [404, 404, 404]
        # the own record syncs, and carries only the own marker
        ws = await client.ws_connect(
            f"/api/v1/yjs/activity/{world[(tenant, 'bu1')]}?token={tok}&bu=bu1"
        )
        await ws.send_bytes(message(SYNC, STEP1, b"\x00"))
        raw: list[bytes] = []
        async with asyncio.timeout(5):
            while True:
                data = (await ws.receive()).data
                raw.append(data)
                reader = Reader(data)
                if (reader.var_uint(), reader.var_uint()) == (SYNC, STEP2):
                    break
        blob = b"".join(raw)
        assert marker(tenant, "bu1").encode() in blob
        assert_clean(blob, tenant)
        await ws.close()


async def test_cursors_do_not_cross_tenants(client: Client, world: Any) -> None:
    a = Api(client, token("ta", ["*"]), device="a")
    _, cursor = await a.pull_all("activity")
    b = Api(client, token("tb", ["*"]), device="b")
    resp = await client.get(
        "/api/v1/sync/activity/changes", params={"cursor": cursor}, headers=b.headers()
    )
    assert resp.status == 400
    assert_clean(await resp.read(), "tb")
