"""`GET /api/v1/yjs/{domain}/{record_id}?token=…&bu=…`: the y-websocket protocol for one record.

A stock `y-websocket` WebsocketProvider syncs a record through here unmodified. Frames
are y-protocols messages (varUint framing): sync step 1/2 and update (type 0), awareness
(type 1, relayed to every peer of the record, the sender included, as the reference
server does), query-awareness (type 3). Updates go through the same pipeline as every
other write, constraints included; every committed change of the record — the peer's own
update too, which the newest providers use as their acknowledgement, and any
compensation — is sent to every peer of the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from storage import RecordKey, StorageUnavailable
from storage.types import LogEntry

from .auth import Principal, is_valid_id
from .awareness import Room, parse_awareness
from .errors import ApiError, ErrorCode
from .hub import BufferLimits, Feed
from .merge_types import Actor, PushItem
from .ratelimit import Limited
from .services import Services, services
from .sockets import CloseCode, check_origin
from .sync_api import domain_of
from .yprotocol import (
    AUTH,
    AWARENESS,
    QUERY_AWARENESS,
    STEP1,
    STEP2,
    SYNC,
    UPDATE,
    BadMessage,
    Reader,
    message,
)

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# -- the endpoint ---------------------------------------------------------------


@routes.get("/api/v1/yjs/{domain}/{record_id}")
async def yjs_socket(request: web.Request) -> web.WebSocketResponse:
    svc = services(request)
    check_origin(request, svc.config.sockets.allowed_origins)
    principal = svc.verifier.verify(request.query.get("token", ""))
    domain, record_id = domain_of(request), request.match_info["record_id"]
    bu = request.query.get("bu")
    if not is_valid_id(record_id) or (bu is not None and not is_valid_id(bu)):
        raise ApiError(ErrorCode.BAD_REQUEST, "record_id and bu must be 1-128 character ids")
    device = request.query.get("device") or f"web-{principal.user}"
    if not is_valid_id(device):
        raise ApiError(ErrorCode.BAD_REQUEST, "device must be a 1-128 character id")
    actor = Actor(principal, device)
    svc.limit(principal, device)  # opening (or reopening) a record's socket is a sync
    key = RecordKey(principal.tenant, domain, record_id)
    bu = await svc.pipeline.writable_bu(actor, key, bu)
    if svc.limiter.open_socket(principal.tenant, principal.user, None) is not None:
        cap = svc.config.rates.sockets_per_user
        raise svc.refused(
            Limited("sockets_per_user", f"at most {cap} open sockets per user", SOCKET_RETRY_S)
        )
    try:
        settings = svc.config.sockets
        ws = web.WebSocketResponse(
            heartbeat=settings.heartbeat_s, max_msg_size=settings.max_frame_bytes, compress=False
        )
        await ws.prepare(request)
        svc.sockets.add(ws)
        try:
            await YjsPeer(svc, ws, actor, key, bu).run()
        finally:
            svc.sockets.discard(ws)
    finally:
        svc.limiter.close_socket(principal.tenant, principal.user, None)
    return ws


SOCKET_RETRY_S = 10  # a socket slot frees when one of the user's sockets closes


class YjsPeer:
    def __init__(
        self, svc: Services, ws: web.WebSocketResponse, actor: Actor, key: RecordKey, bu: str
    ) -> None:
        self.svc, self.ws, self.actor, self.key, self.bu = svc, ws, actor, key, bu
        self.wakeup = asyncio.Event()
        limits = BufferLimits(svc.config.sockets.buffer_entries, svc.config.sockets.buffer_bytes)
        self.feed = Feed(key.tenant, key.domain, None, None, limits, self.wakeup, key.record_id)
        self.feed.behind = False
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        self.awareness_clients: set[int] = set()
        self.room: Room | None = None

    async def run(self) -> None:
        principal: Principal = self.actor.principal
        self.svc.hub.subscribe(self.feed)
        self.room = self.svc.yjs_rooms.join(self.key, self)
        sender: asyncio.Task[None] | None = None
        try:
            await self._greet()  # sync step 1 goes first; what commits meanwhile is buffered
            sender = asyncio.create_task(self._deliver(), name="fieldsync-yjs-deliver")
            async with asyncio.timeout(max(0.0, principal.expires_at - time.time())):
                await self._receive()
        except TimeoutError:
            await self.ws.close(code=CloseCode.UNAUTHORIZED, message=b"token_expired")
        except BadMessage as exc:
            await self.ws.close(code=CloseCode.PROTOCOL_ERROR, message=str(exc).encode()[:120])
        except _Refused as exc:
            await self.ws.close(code=exc.close_code, message=exc.reason.encode()[:120])
        finally:
            self.svc.hub.unsubscribe(self.feed)
            self.svc.yjs_rooms.leave(self.key, self)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    async def _greet(self) -> None:
        sv = await self.svc.live.state_vector(self.key)
        await self.ws.send_bytes(message(SYNC, STEP1, sv))
        assert self.room is not None
        if (awareness := self.room.encoded()) is not None:
            await self.ws.send_bytes(awareness)

    async def _receive(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.BINARY:
                raise BadMessage("y-websocket frames are binary")
            await self._handle(Reader(msg.data))

    async def _handle(self, reader: Reader) -> None:
        kind = reader.var_uint()
        if kind == SYNC:
            step, payload = reader.var_uint(), reader.var_bytes()
            reader.done()
            if step == STEP1:
                await self._answer_step1(payload)
            elif step in (STEP2, UPDATE):
                await self._apply(payload)
            else:
                raise BadMessage(f"unknown sync step {step}")
        elif kind == AWARENESS:
            payload = reader.var_bytes()
            reader.done()
            self._relay_awareness(payload)
        elif kind == QUERY_AWARENESS:
            assert self.room is not None
            if (awareness := self.room.encoded()) is not None:
                await self.ws.send_bytes(awareness)
        elif kind != AUTH:
            raise BadMessage(f"unknown message type {kind}")

    async def _answer_step1(self, state_vector: bytes) -> None:
        item = PushItem(self.key.record_id, self.bu, None, state_vector)
        [result] = await self._push(item, tolerate_missing=True)
        await self.ws.send_bytes(message(SYNC, STEP2, result.update or b"\x00\x00"))

    async def _apply(self, update: bytes) -> None:
        await self._push(PushItem(self.key.record_id, self.bu, update, None))

    async def _push(self, item: PushItem, tolerate_missing: bool = False) -> list[Any]:
        try:
            self.svc.limit(self.actor.principal, self.actor.device)
        except ApiError as exc:  # the provider reconnects with backoff and re-sends its state
            raise _Refused(CloseCode.TOO_MANY, exc.message) from None
        try:
            results = await self.svc.pipeline.push(self.actor, self.key.domain, [item])
        except StorageUnavailable:
            raise _Refused(CloseCode.GOING_AWAY, "storage unavailable; reconnect") from None
        error = results[0].error
        if error is not None and not (tolerate_missing and error.code == ErrorCode.NOT_FOUND):
            raise _Refused(_close_code(error.code), f"{error.code}: {error.message}")
        return results

    def _relay_awareness(self, payload: bytes) -> None:
        assert self.room is not None
        for client, clock, state in parse_awareness(payload):
            self.awareness_clients.add(client)
            self.room.awareness[client] = (clock, state)
        frame = message(AWARENESS, payload)
        for peer in self.room.peers:  # the sender too: y-websocket's 30 s liveness needs it
            peer.send_soon(frame)

    def send_soon(self, frame: bytes) -> None:
        """Queue an awareness frame; a peer too slow to take it loses it (awareness is lossy)."""
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(frame)
        self.wakeup.set()

    async def _deliver(self) -> None:
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                await self._flush()
        except (ConnectionError, RuntimeError) as exc:
            log.debug("yjs delivery stopped: %s", exc)

    async def _flush(self) -> None:
        while not self.outbox.empty():
            await self.ws.send_bytes(self.outbox.get_nowait())
        if self.feed.behind:  # fell behind: send the whole record instead of the missed updates
            self.feed.buffer.clear()
            self.feed.behind = False
            full = await self.svc.live.full_state(self.key)
            await self.ws.send_bytes(message(SYNC, UPDATE, full))
            return
        entries: list[LogEntry] = self.feed.take()
        for entry in entries:
            await self.ws.send_bytes(message(SYNC, UPDATE, entry.update))


class _Refused(Exception):
    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code, self.reason = close_code, reason


def _close_code(code: str) -> int:
    if code in (ErrorCode.NOT_FOUND, ErrorCode.BU_MISMATCH, ErrorCode.CLIENT_ID_OWNED):
        return CloseCode.FORBIDDEN
    if code == ErrorCode.RECORD_UNAVAILABLE:
        return CloseCode.GOING_AWAY
    return CloseCode.PROTOCOL_ERROR
