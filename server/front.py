"""A protocol standing in front of another on one connection (see `serving`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def fronted(
    factory: ProtocolFactory, front: Callable[[asyncio.Protocol], asyncio.BaseProtocol]
) -> ProtocolFactory:
    """`factory`, whose stream protocols get `front(protocol)` before them (a buffered or
    datagram protocol is not an HTTP server of ours: it stays as it is)."""

    def make() -> asyncio.BaseProtocol:
        inner = factory()
        return front(inner) if isinstance(inner, asyncio.Protocol) else inner

    return make


class FrontProtocol(asyncio.Protocol):
    """Passes every event of its connection on to `inner`; subclasses step in where they
    need to, and `step_aside` hands the connection to `inner` for good."""

    __slots__ = ("_inner", "_transport")

    def __init__(self, inner: asyncio.Protocol) -> None:
        self._inner = inner
        self._transport: asyncio.Transport | None = None

    def step_aside(self) -> None:
        """From now on `inner` receives the connection's events directly."""
        transport = self._transport
        if transport is None or transport.is_closing() or transport.get_protocol() is not self:
            return
        transport.set_protocol(self._inner)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
