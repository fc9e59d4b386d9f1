"""The y-websocket endpoint, driven by a Python peer that speaks y-protocols over a real socket."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp

from server.sockets import CloseCode
from server.yprotocol import AWARENESS, STEP1, STEP2, SYNC, UPDATE, Reader, message
from tests.helpers import Api, Client, Replica, token


class YPeer:
    """A minimal y-websocket client around a pycrdt doc."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.replica = Replica()
        self.awareness: list[bytes] = []

    async def recv(self, timeout: float = 5) -> tuple[int, int | None, bytes]:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
        reader = Reader(msg.data)
        kind = reader.var_uint()
        if kind == SYNC:
            step, payload = reader.var_uint(), reader.var_bytes()
            if step in (STEP2, UPDATE):
                self.replica.apply(payload)
            return kind, step, payload
        payload = reader.var_bytes()
        if kind == AWARENESS:
            self.awareness.append(payload)
        return kind, None, payload

    async def sync(self) -> None:
        """The handshake: the server's step 1 (answered), then our step 1 (answered)."""
        kind, step, server_sv = await self.recv()
        assert (kind, step) == (SYNC, STEP1)
        await self.ws.send_bytes(message(SYNC, STEP2, self.replica.doc.get_update(server_sv)))
        await self.ws.send_bytes(message(SYNC, STEP1, self.replica.doc.get_state()))
        while (await self.recv())[:2] != (SYNC, STEP2):
            pass

    async def update(self, **fields: Any) -> bytes:
        update = self.replica.set(**fields)
        await self.ws.send_bytes(message(SYNC, UPDATE, update))
        return update

    async def until(self, predicate: Any, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.recv()


def path(record_id: str, tok: str | None = None, bu: str = "bu1", domain: str = "activity") -> str:
    return f"/api/v1/yjs/{domain}/{record_id}?token={tok or token()}&bu={bu}"


async def open_peer(client: Client, record_id: str, **kw: Any) -> YPeer:
    peer = YPeer(await client.ws_connect(path(record_id, **kw)))
    await peer.sync()
    return peer


async def test_two_peers_sync_a_record_and_the_server_keeps_it(client: Client) -> None:
    r = str(uuid.uuid4())
    a = await open_peer(client, r)
    b = await open_peer(client, r)
    echoed = await a.update(jobdesc="typed in the browser")
    await b.until(lambda: b.replica.state().get("jobdesc") == "typed in the browser")
    api = Api(client, token())
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=api.headers())).json()
    assert record["fields"] == {"jobdesc": "typed in the browser"} and echoed


async def test_the_sender_receives_its_own_update_as_acknowledgement(client: Client) -> None:
    r = str(uuid.uuid4())
    a = await open_peer(client, r)
    sent = await a.update(remarks="ack me")
    async with asyncio.timeout(5):
        while True:
            kind, step, payload = await a.recv()
            if (kind, step) == (SYNC, UPDATE) and payload == sent:
                break


async def test_a_late_peer_gets_the_state_and_http_pushes_reach_peers(client: Client) -> None:
    r = str(uuid.uuid4())
    api = Api(client, token(), device="phone")
    await api.push(
        "activity",
        [{"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc="from the phone")}],
    )
    peer = await open_peer(client, r)
    assert peer.replica.state() == {"jobdesc": "from the phone"}
    rep = Replica()
    rep.apply(peer.replica.doc.get_update())
    await api.push("activity", [{"record_id": r, "update": rep.set(priority="HIGH")}])
    await peer.until(lambda: peer.replica.state().get("priority") == "HIGH")


async def test_constraints_repair_live_on_every_peer(client: Client) -> None:
    r = str(uuid.uuid4())
    a = await open_peer(client, r)
    b = await open_peer(client, r)
    await a.update(gracetime=5)
    await b.until(lambda: b.replica.state().get("gracetime") == 5)
    await a.update(gracetime="five")  # a type error: the server writes 5 back
    for peer in (a, b):
        await peer.until(lambda p=peer: p.replica.state().get("gracetime") == 5)


async def test_awareness_is_relayed_to_other_peers_and_cleared_on_leave(client: Client) -> None:
    r = str(uuid.uuid4())
    a = await open_peer(client, r)
    b = await open_peer(client, r)
    state = json.dumps({"user": {"name": "alice"}}).encode()
    await a.ws.send_bytes(message(AWARENESS, message(1, 4242, 1, state)))
    await b.until(lambda: any(state in p for p in b.awareness))
    await a.ws.close()
    await b.until(lambda: any(b"null" in p for p in b.awareness))


async def test_scope_and_bad_frames(client: Client) -> None:
    r = str(uuid.uuid4())
    api = Api(client, token())
    await api.push(
        "activity", [{"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc="x")}]
    )
    for url, status in [
        (path(r, tok="forged"), 401),
        (path(r, tok=token("t1", ["bu2"])), 404),  # another bu: same answer
        (path(str(uuid.uuid4()), bu="bu9"), 404),  # a new record in a bu outside the token
        (path(r, domain="payroll"), 404),
    ]:
        try:
            await client.ws_connect(url)
            raise AssertionError(f"{url} connected")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == status, url
    # another tenant with the same id opens its own, empty record
    stranger = await open_peer(client, r, tok=token("t2"))
    assert stranger.replica.state() == {}
    peer = await open_peer(client, r)
    await peer.ws.send_bytes(b"\x00\x02\xff\xff\xff\xff")  # a length past the end
    await peer.ws.receive()
    assert peer.ws.close_code == CloseCode.PROTOCOL_ERROR
    peer = await open_peer(client, r)
    await peer.ws.send_bytes(message(SYNC, UPDATE, bytes.fromhex("ffffff7a")))
    while not peer.ws.closed:
        await peer.ws.receive()
    assert peer.ws.close_code == CloseCode.PROTOCOL_ERROR
