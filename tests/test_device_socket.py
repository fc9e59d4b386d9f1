"""The multiplexed device socket with real WebSocket clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from server.config import SocketSettings
from server.services import SERVICES
from server.sockets import CloseCode
from tests.helpers import Api, Client, Replica, SocketDevice, token

WS = "/api/v1/ws"


def rid() -> str:
    return str(uuid.uuid4())


def new_item(**fields: Any) -> dict[str, Any]:
    return {"record_id": rid(), "bu": "bu1", "update": Replica().set(**fields)}


async def connect(
    client: Client,
    tok: str | None = None,
    device: str = "dev-1",
    domains: list[str] | None = None,
    cursors: dict[str, Any] | None = None,
) -> SocketDevice:
    dev = SocketDevice(await client.ws_connect(WS))
    await dev.hello(
        tok or token(), device, domains if domains is not None else ["activity"], cursors
    )
    return dev


async def test_catch_up_of_1200_records_in_pages_then_resume_over_http(client: Client) -> None:
    api = Api(client, token(), device="writer")
    ids = set()
    for _ in range(2):
        items = [new_item(jobdesc="x") for _ in range(600)]
        ids |= {i["record_id"] for i in items}
        await api.push("activity", items)
    dev = await connect(client)
    pages = []
    while True:
        frame = await dev.recv()
        assert frame["t"] == "changes"
        pages.append(frame)
        if not frame["has_more"]:
            break
    assert len(pages) >= 3
    assert {c["record_id"] for c in dev.changes} == ids and len(dev.changes) == 1200
    # the socket's cursor is an HTTP cursor: nothing missing, nothing twice
    newer = new_item(jobdesc="later")
    await api.push("activity", [newer])
    page = await api.changes("activity", dev.cursors["activity"])
    assert [c["record_id"] for c in page["changes"]] == [newer["record_id"]]


async def test_an_http_cursor_resumes_on_the_socket(client: Client) -> None:
    api = Api(client, token(), device="writer")
    await api.push("activity", [new_item(jobdesc="old")])
    _, cursor = await api.pull_all("activity")
    newer = new_item(jobdesc="new")
    await api.push("activity", [newer])
    dev = await connect(client, cursors={"activity": cursor})
    changes = await dev.caught_up("activity")
    assert [c["record_id"] for c in changes] == [newer["record_id"]]


async def test_push_ack_and_live_fan_out_without_echo(client: Client) -> None:
    a = await connect(client, device="dev-a")
    b = await connect(client, device="dev-b")
    await a.caught_up("activity")
    await b.caught_up("activity")
    item = new_item(jobdesc="from a")
    ack = await a.push(1, "activity", [item])
    assert ack["t"] == "ack" and ack["results"][0]["status"] == "created"
    assert set(ack["results"][0]) >= {
        "record_id",
        "status",
        "version",
        "update",
        "decisions",
        "error",
    }
    frame = await b.recv()
    assert frame["t"] == "changes" and frame["has_more"] is False
    assert [c["record_id"] for c in frame["changes"]] == [item["record_id"]]
    fresh = Replica()
    fresh.apply(frame["changes"][0]["update"])
    assert fresh.state() == {"jobdesc": "from a"}
    await a.barrier()
    assert all(c["record_id"] != item["record_id"] for c in a.changes), "own push echoed"


async def test_compensations_reach_the_device_that_caused_them(client: Client) -> None:
    a = await connect(client, device="dev-a")
    await a.caught_up("activity")
    rep = Replica()
    r = rid()
    await a.push(1, "activity", [{"record_id": r, "bu": "bu1", "update": rep.set(gracetime=10)}])
    ack = await a.push(2, "activity", [{"record_id": r, "update": rep.set(gracetime="ten")}])
    assert ack["results"][0]["decisions"][0]["field"] == "gracetime"
    frame = await a.recv()
    assert frame["t"] == "changes" and [c["record_id"] for c in frame["changes"]] == [r]
    rep.apply(frame["changes"][0]["update"])
    assert rep.state()["gracetime"] == 10


async def test_live_delivery_respects_tenant_and_bu(client: Client) -> None:
    writer = await connect(client, token("t1", ["bu1"]), device="w")
    other_tenant = await connect(client, token("t2", ["bu1"]), device="x")
    other_bu = await connect(client, token("t1", ["bu2"], user="u2"), device="y")
    every_bu = await connect(client, token("t1", ["*"], user="u3"), device="z")
    for dev in (writer, other_tenant, other_bu, every_bu):
        await dev.caught_up("activity")
    item = new_item(jobdesc="bu1 only")
    await writer.push(1, "activity", [item])
    frame = await every_bu.recv()
    assert [c["record_id"] for c in frame["changes"]] == [item["record_id"]]
    for dev in (other_tenant, other_bu):
        await dev.barrier()
        assert dev.changes == []


async def test_a_slow_reader_falls_back_to_the_log_and_misses_nothing(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(sockets=SocketSettings(buffer_entries=5, catch_up_page=7))
    slow = await connect(client, device="slow")
    await slow.caught_up("activity")
    [feed] = client.app[SERVICES].hub._feeds[("t1", "activity")]
    transport = slow.ws._writer.transport  # the device stops reading: a phone on a bad network
    transport.pause_reading()
    api = Api(client, token(), device="writer")
    ids = []
    for _ in range(40):  # ~8 MB the slow device does not read: socket buffers fill up
        item = new_item(jobdesc="x" * 200_000)
        ids.append(item["record_id"])
        await api.push("activity", [item])
        assert len(feed.buffer) <= 5
    assert feed.overflows > 0
    transport.resume_reading()
    while {c["record_id"] for c in slow.changes} != set(ids):
        await slow.recv()
    assert len(slow.changes) == 40


async def test_garbage_frames_close_with_4400(client: Client) -> None:
    for bad in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"no": "type"})):
        dev = SocketDevice(await client.ws_connect(WS))
        await dev.ws.send_bytes(bad)
        code, errors = await dev.closed_with()
        assert code == CloseCode.PROTOCOL_ERROR and errors[0]["code"] == "protocol_error"
    dev = SocketDevice(await client.ws_connect(WS))
    await dev.ws.send_str('{"t": "hello"}')
    assert (await dev.closed_with())[0] == CloseCode.PROTOCOL_ERROR
    after_hello = await connect(client)
    await after_hello.ws.send_bytes(b"\x92\x01")
    assert (await after_hello.closed_with())[0] == CloseCode.PROTOCOL_ERROR


async def test_hello_must_come_first_and_in_time(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(sockets=SocketSettings(hello_timeout_s=0.3))
    dev = SocketDevice(await client.ws_connect(WS))
    await dev.send({"t": "ping"})
    assert (await dev.closed_with())[0] == CloseCode.PROTOCOL_ERROR
    silent = SocketDevice(await client.ws_connect(WS))
    code, errors = await silent.closed_with()
    assert code == CloseCode.HELLO_TIMEOUT and errors[0]["code"] == "hello_timeout"


async def test_bad_tokens_and_expiry_close_with_4401(client: Client) -> None:
    dev = SocketDevice(await client.ws_connect(WS))
    await dev.send({"t": "hello", "token": "forged", "device": "d", "domains": []})
    code, errors = await dev.closed_with()
    assert code == CloseCode.UNAUTHORIZED and errors[0]["code"] == "unauthorized"
    expiring = await connect(client, token(ttl_s=1))
    code, errors = await expiring.closed_with(timeout=10)
    assert code == CloseCode.UNAUTHORIZED and errors[-1]["code"] == "token_expired"


async def test_push_errors_are_frames_and_keep_the_socket(client: Client) -> None:
    dev = await connect(client)
    await dev.caught_up("activity")
    unknown = await dev.push(1, "payroll", [new_item(a=1)])
    assert unknown["t"] == "error" and unknown["code"] == "not_found"
    too_many = await dev.push(2, "activity", [new_item(a=1) for _ in range(1001)])
    assert too_many["t"] == "error" and too_many["code"] == "too_many_items"
    bad_bytes = await dev.push(
        3, "activity", [{"record_id": rid(), "bu": "bu1", "update": b"\xff\xff\xff\x7a"}]
    )
    assert (
        bad_bytes["t"] == "ack" and bad_bytes["results"][0]["error"]["code"] == "malformed_update"
    )
    await dev.send({"t": "shrug"})
    assert (await dev.recv())["code"] == "unknown_frame"
    await dev.barrier()


async def test_oversized_frames_close_with_1009(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(sockets=SocketSettings(max_frame_bytes=1024))
    dev = await connect(client)
    await dev.send(
        {
            "t": "push",
            "id": 1,
            "domain": "activity",
            "items": [{"record_id": "r", "bu": "bu1", "update": b"\x00" * 4096}],
        }
    )
    code, _ = await dev.closed_with()
    assert code == CloseCode.MESSAGE_TOO_BIG


async def test_shutdown_closes_sockets_with_going_away(client: Client) -> None:
    dev = await connect(client)
    await dev.caught_up("activity")
    closing = asyncio.create_task(dev.closed_with())
    await client.app.shutdown()
    code, _ = await closing
    assert code == CloseCode.GOING_AWAY


async def test_browser_origins_must_be_allowed(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(
        sockets=SocketSettings(allowed_origins=frozenset({"https://app.example"}))
    )
    for url in (WS, "/api/v1/yjs/activity/r1?token=x&bu=bu1"):
        resp = await client.get(
            url,
            headers={
                "Origin": "https://evil.example",
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "forbidden"
    ok = await client.ws_connect(WS, headers={"Origin": "https://app.example"})
    await ok.close()
    native = await client.ws_connect(WS)  # native apps send no Origin
    await native.close()
