"""What stands in front of aiohttp's protocol on every connection `fieldsync serve` accepts.

`web.run_app` builds its listening servers itself; the only place to wrap the protocol
of each accepted connection is the event loop's `create_server`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from .front import ProtocolFactory
from .handshake import HandshakeSettings, install_guard
from .quick_refusals import QuickRefusals

Front = Callable[[ProtocolFactory], ProtocolFactory]


class FrontedEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose servers put `fronts` before every connection's protocol; the
    last one is the outermost, the first to see the connection's bytes."""

    def __init__(self, fronts: Sequence[Front]) -> None:
        super().__init__()
        self.fronts = tuple(fronts)

    async def create_server(
        self, protocol_factory: ProtocolFactory, *args: Any, **kwargs: Any
    ) -> asyncio.Server:
        for front in self.fronts:
            protocol_factory = front(protocol_factory)
        return await super().create_server(protocol_factory, *args, **kwargs)


def serving_loop(
    app: web.Application, handshake: HandshakeSettings, quick_refusals: bool
) -> FrontedEventLoop | None:
    """The loop to run `app` on, or None if nothing stands in front of aiohttp."""
    fronts: list[Front] = []
    if quick_refusals:
        fronts.append(QuickRefusals(app).protocol_factory)
    if handshake.head_timeout_s > 0 or handshake.max_pending > 0:
        fronts.append(install_guard(app, handshake).protocol_factory)  # outermost
    return FrontedEventLoop(fronts) if fronts else None
