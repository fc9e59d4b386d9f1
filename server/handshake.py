"""Slow handshakes and pre-request connections, capped.

aiohttp has no deadline for a request head: a client that opens a TCP connection and
dribbles header bytes (slowloris) holds a connection, a file descriptor and a parser for
as long as it likes. This guard sits in front of aiohttp's protocol, on the listening
server itself (`serving.FrontedEventLoop.create_server`), for each connection until its first
request head is complete:

- **head timeout**: a connection that has not delivered a complete first request head
  within `head_timeout_s` is answered 408 and closed;
- **cap**: at most `max_pending` connections may be waiting for their first request head.
  A new connection beyond it is served, and the *oldest* waiting connection is closed
  instead: refusing new connections would let an attacker who opens `max_pending`
  connections per head timeout lock every new client out, while closing the oldest makes
  it outrun every client's round trip.

A request head is complete when aiohttp has parsed it and the request enters the app
(`middleware`, which must be the app's first). From then on the connection is handed to
aiohttp alone (`transport.set_protocol`), and its later requests are aiohttp's business:
it closes a keep-alive connection that stays idle, or dribbles its next head, for
`keepalive_timeout` (75 s). Request bodies are not covered (`client_max_size` bounds them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from .front import FrontProtocol, ProtocolFactory, fronted

log = logging.getLogger(__name__)

TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class HandshakeSettings:
    head_timeout_s: float = 10.0  # 0: no deadline
    max_pending: int = 1000  # 0: no cap


class HandshakeGuard:
    """The connections of one process still waiting for their first request head."""

    def __init__(self, settings: HandshakeSettings = HandshakeSettings()) -> None:
        self.settings = settings
        self.pending: OrderedDict[GuardedProtocol, None] = OrderedDict()  # oldest first
        self.timed_out = 0
        self.evicted = 0
        self._warned_at = 0.0

    def protocol_factory(self, factory: ProtocolFactory) -> ProtocolFactory:
        return fronted(factory, lambda inner: GuardedProtocol(self, inner))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection's head complete as its request enters the app."""
        mark_head_complete(request.transport)
        return await handler(request)

    def _admit(self, conn: GuardedProtocol) -> None:
        cap = self.settings.max_pending
        while cap > 0 and len(self.pending) >= cap:
            oldest, _ = self.pending.popitem(last=False)
            self.evicted += 1
            self._warn()
            oldest.close(answer=None)
        self.pending[conn] = None

    def _release(self, conn: GuardedProtocol) -> None:
        self.pending.pop(conn, None)

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "%d connections are waiting for their first request head (the cap);"
                " closed so far: %d oldest waiting, %d past the %g s head timeout",
                len(self.pending),
                self.evicted,
                self.timed_out,
                self.settings.head_timeout_s,
            )


class GuardedProtocol(FrontProtocol):
    """Forwards to aiohttp's protocol until the first request head is complete."""

    __slots__ = ("_guard", "_timer", "_waiting", "_connected")

    def __init__(self, guard: HandshakeGuard, inner: asyncio.Protocol) -> None:
        super().__init__(inner)
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False
        self._connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._waiting = True
        self._guard._admit(self)
        timeout = self._guard.settings.head_timeout_s
        if timeout > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout, self._expired)
        self._connected = True
        super().connection_made(transport)

    def head_complete(self) -> None:
        """From now on aiohttp's protocol receives the connection's events directly."""
        if self._waiting:
            self._stop_waiting()
            self.step_aside()

    def close(self, answer: bytes | None) -> None:
        self._stop_waiting()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if answer:
            transport.write(answer)
            transport.close()  # flushes the answer, then closes
        else:
            transport.abort()

    def _expired(self) -> None:
        self._timer = None
        if self._waiting:
            self._guard.timed_out += 1
            self.close(TIMEOUT_ANSWER)

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self._guard._release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self._connected:
            self._connected = False
            super().connection_lost(exc)
        self._transport = None


def mark_head_complete(transport: asyncio.BaseTransport | None) -> None:
    """A request head arrived on `transport`: its guard, if any, lets it go."""
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, GuardedProtocol):
        protocol.head_complete()


def install_guard(app: web.Application, settings: HandshakeSettings) -> HandshakeGuard:
    """Install the guard's middleware (first) on `app`; the guard's `protocol_factory`
    must then wrap the app's listening servers (`serving.FrontedEventLoop`)."""
    guard = HandshakeGuard(settings)
    app.middlewares.insert(0, guard.middleware)
    return guard
