"""The multiplexed device socket `GET /api/v1/ws`: msgpack frames, one socket for every record.

hello -> welcome -> catch-up `changes` pages from the hello cursors -> live `changes`;
`push` -> `ack` through the same pipeline as HTTP; `ping` -> `pong`. Catch-up and live
delivery are one mechanism (server.hub.Feed): a device that reads slowly falls back to
paging the log from its cursor, so nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

from crdt_models.registry import UnknownDomain, get_model
from storage import StorageUnavailable

from .auth import Principal, is_valid_id
from .changes import merge_page
from .codec import decode_msgpack
from .cursor import decode_cursor, encode_cursor
from .errors import ApiError, ErrorCode
from .hub import BufferLimits, Feed
from .merge_types import Actor
from .services import Services, services
from .sockets import CloseCode, check_origin
from .sync_api import parse_items

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
PROTOCOL = 1


class Fatal(Exception):
    """Ends the session: an error frame, then a close with `close_code`."""

    def __init__(self, close_code: CloseCode, code: str, message: str) -> None:
        super().__init__(message)
        self.close_code, self.code, self.message = close_code, code, message


@routes.get("/api/v1/ws")
async def device_socket(request: web.Request) -> web.WebSocketResponse:
    svc = services(request)
    settings = svc.config.sockets
    check_origin(request, settings.allowed_origins)
    if svc.sockets.unauthenticated >= svc.config.rates.preauth_sockets:
        raise ApiError(
            ErrorCode.RATE_LIMITED,
            "too many connections waiting to say hello; retry",
            headers={"Retry-After": "1"},
        )
    ws = web.WebSocketResponse(
        heartbeat=settings.heartbeat_s, max_msg_size=settings.max_frame_bytes, compress=False
    )
    await ws.prepare(request)
    svc.sockets.add(ws)
    try:
        await DeviceSession(svc, ws).run()
    finally:
        svc.sockets.discard(ws)
    return ws


class DeviceSession:
    def __init__(self, svc: Services, ws: web.WebSocketResponse) -> None:
        self.svc, self.ws = svc, ws
        self.settings = svc.config.sockets
        self.wakeup = asyncio.Event()
        self.feeds: list[Feed] = []
        self.pushes: set[asyncio.Task[None]] = set()
        self.push_slots = asyncio.Semaphore(self.settings.max_pending_pushes)
        self.actor: Actor | None = None

    async def run(self) -> None:
        sender: asyncio.Task[None] | None = None
        try:
            principal = await self._hello()
            await self._send({"t": "welcome", "protocol": PROTOCOL, "node": self.svc.node.node_id})
            sender = asyncio.create_task(self._deliver(), name="fieldsync-ws-deliver")
            try:
                async with asyncio.timeout(max(0.0, principal.expires_at - time.time())):
                    await self._receive()
            except TimeoutError:
                raise Fatal(
                    CloseCode.UNAUTHORIZED, "token_expired", "the token expired; reconnect"
                ) from None
        except Fatal as exc:
            await self._close(exc)
        finally:
            if self.actor is not None:
                principal = self.actor.principal
                self.svc.limiter.close_socket(principal.tenant, principal.user, self.actor.device)
            for feed in self.feeds:
                self.svc.hub.unsubscribe(feed)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            if self.pushes:
                await asyncio.wait(self.pushes, timeout=30)

    # -- hello ---------------------------------------------------------------

    async def _hello(self) -> Principal:
        self.svc.sockets.unauthenticated += 1
        try:
            msg = await self.ws.receive(timeout=self.settings.hello_timeout_s)
        except TimeoutError:
            raise Fatal(CloseCode.HELLO_TIMEOUT, "hello_timeout", "send hello first") from None
        finally:
            self.svc.sockets.unauthenticated -= 1
        frame = self._decode(msg)
        if frame.get("t") != "hello":
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", "the first frame must be hello")
        token, device = frame.get("token"), frame.get("device")
        if not isinstance(token, str) or not is_valid_id(device):
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", "hello needs token and device")
        try:
            principal = self.svc.verifier.verify(token)
        except ApiError as exc:
            raise Fatal(CloseCode.UNAUTHORIZED, "unauthorized", exc.message) from None
        over = self.svc.limiter.open_socket(principal.tenant, principal.user, str(device))
        if over is not None:
            rates = self.svc.config.rates
            cap = rates.sockets_per_device if over == "device" else rates.sockets_per_user
            raise Fatal(CloseCode.TOO_MANY, "too_many_sockets", f"at most {cap} sockets per {over}")
        self.actor = Actor(principal, str(device))
        self._subscribe(principal, str(device), frame.get("domains", []), frame.get("cursors"))
        return principal

    def _subscribe(self, principal: Principal, device: str, domains: Any, cursors: Any) -> None:
        if not isinstance(domains, list) or len(domains) > 64:
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", "domains must be a list")
        if cursors is not None and not isinstance(cursors, dict):
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", "cursors must be a map")
        limits = BufferLimits(self.settings.buffer_entries, self.settings.buffer_bytes)
        for domain in dict.fromkeys(domains):
            try:
                _known_domain(domain)
                clock = decode_cursor(principal.tenant, domain, (cursors or {}).get(domain))
            except ApiError as exc:
                raise Fatal(CloseCode.PROTOCOL_ERROR, str(exc.code), exc.message) from None
            feed = Feed(principal.tenant, domain, principal.bus, device, limits, self.wakeup)
            feed.clock = dict(clock)
            self.feeds.append(feed)
            self.svc.hub.subscribe(feed)
        self.wakeup.set()

    # -- client frames --------------------------------------------------------

    async def _receive(self) -> None:
        async for msg in self.ws:
            frame = self._decode(msg)
            kind = frame.get("t")
            if kind == "push":
                await self.push_slots.acquire()  # backpressure: stop reading when full
                task = asyncio.create_task(self._push(frame))
                self.pushes.add(task)
                task.add_done_callback(self._push_done)
            elif kind == "ping":
                await self._send({"t": "pong"})
            elif kind == "hello":
                raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", "hello was already sent")
            else:
                await self._send(_error("unknown_frame", f"unknown frame type {kind!r}"))

    def _push_done(self, task: asyncio.Task[None]) -> None:
        self.pushes.discard(task)
        self.push_slots.release()

    async def _push(self, frame: dict[str, Any]) -> None:
        push_id = frame.get("id")
        if type(push_id) is not int:
            await self._send(_error("protocol_error", "push needs an integer id"))
            return
        assert self.actor is not None
        try:
            self.svc.limit(self.actor.principal, self.actor.device)
            domain = _known_domain(frame.get("domain"))
            items = parse_items(frame, True, self.svc.config.limits.max_items)
            async with self.svc.tenant_slot(self.actor.principal):
                results = await self.svc.pipeline.push(self.actor, domain, items)
        except ApiError as exc:
            error = _error(str(exc.code), exc.message, push_id)
            if "retry_after" in exc.details:
                error["retry_after"] = exc.details["retry_after"]
            await self._send(error)
            return
        except StorageUnavailable:
            await self._send(_error("storage_unavailable", "nothing was saved; retry", push_id))
            return
        await self._send({"t": "ack", "id": push_id, "results": [r.to_wire() for r in results]})

    def _decode(self, msg: Any) -> dict[str, Any]:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise Fatal(CloseCode.PROTOCOL_ERROR, "closed", "the socket closed")
        if msg.type == WSMsgType.ERROR:
            raise Fatal(CloseCode.MESSAGE_TOO_BIG, "frame_too_large", str(self.ws.exception()))
        if msg.type != WSMsgType.BINARY:
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", "frames are binary msgpack")
        try:
            frame = decode_msgpack(msg.data)
        except ApiError as exc:
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", exc.message) from None
        if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
            raise Fatal(CloseCode.PROTOCOL_ERROR, "protocol_error", 'every frame is a map with "t"')
        return frame

    # -- server frames --------------------------------------------------------

    async def _deliver(self) -> None:
        """Send every feed's committed changes past its cursor: pages first, then live."""
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                for feed in self.feeds:
                    await self._flush_or_retry(feed)
        except (ConnectionError, RuntimeError) as exc:  # the socket went away mid-send
            log.debug("delivery stopped: %s", exc)

    async def _flush_or_retry(self, feed: Feed) -> None:
        try:
            await self._flush(feed)
        except StorageUnavailable as exc:
            log.warning("catch-up read failed, retrying: %s", exc)
            feed.fall_behind()
            await asyncio.sleep(1)
            self.wakeup.set()

    async def _flush(self, feed: Feed) -> None:
        while feed.behind:
            feed.behind = False  # buffer what commits from now on; page what came before
            more = True
            while more:
                entries, more = await self.svc.store.read_log(
                    feed.tenant, feed.domain, feed.clock, self.settings.catch_up_page, feed.bus
                )
                feed.advance(entries)
                await self._send_changes(feed, entries, more, always=True)
        entries = feed.take()
        if entries:
            await self._send_changes(feed, entries, False, always=False)

    async def _send_changes(self, feed: Feed, entries: list[Any], more: bool, always: bool) -> None:
        shown = [e for e in entries if not feed.is_echo(e)]
        if not shown and not always:
            return
        # Devices of one scope at one position get the very same frame: build it once.
        key = (
            feed.tenant,
            feed.domain,
            tuple(e.position for e in shown),
            tuple(sorted(feed.clock.items())),
            more,
        )
        frame = self.svc.hub.frames.get(key)
        if frame is None:
            cursor = encode_cursor(feed.tenant, feed.domain, feed.clock)  # before any await
            frame = msgpack.packb(
                {
                    "t": "changes",
                    "domain": feed.domain,
                    "changes": await merge_page(shown),
                    "cursor": cursor,
                    "has_more": more,
                }
            )
            self.svc.hub.frames.put(key, frame)
        if not self.ws.closed:
            await self.ws.send_bytes(frame)

    async def _send(self, frame: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_bytes(msgpack.packb(frame))

    async def _close(self, exc: Fatal) -> None:
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(_error(exc.code, exc.message))
        await self.ws.close(code=exc.close_code, message=exc.code.encode())


def _known_domain(domain: object) -> str:
    try:
        if isinstance(domain, str):
            get_model(domain)
            return domain
    except UnknownDomain:
        pass
    raise ApiError(ErrorCode.NOT_FOUND, f"unknown domain {domain!r}")


def _error(code: str, message: str, push_id: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "error", "code": code, "message": message}
    if push_id is not None:
        frame["id"] = push_id
    return frame
