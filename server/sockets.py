"""What both WebSocket endpoints share: close codes, the Origin allowlist, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from enum import IntEnum

from aiohttp import WSCloseCode, web

from .errors import ApiError, ErrorCode


class CloseCode(IntEnum):
    """Close codes of the device socket and the Yjs socket (4400-4499 are ours)."""

    GOING_AWAY = WSCloseCode.GOING_AWAY  # 1001: the server is shutting down
    MESSAGE_TOO_BIG = WSCloseCode.MESSAGE_TOO_BIG  # 1009: a frame over the size cap
    PROTOCOL_ERROR = 4400  # a frame that is not what the protocol allows
    UNAUTHORIZED = 4401  # a missing, invalid or expired token
    FORBIDDEN = 4403  # a record or bu outside the token's scope
    HELLO_TIMEOUT = 4408  # no hello within the allowed time
    TOO_MANY = 4429  # too many sockets or frames


def check_origin(request: web.Request, allowed: frozenset[str]) -> None:
    """Browsers send Origin; native apps usually do not. A browser origin must be allowed."""
    origin = request.headers.get("Origin")
    if origin is None or origin in allowed:
        return
    if not allowed and _same_host(origin, request.host):
        return
    raise ApiError(ErrorCode.FORBIDDEN, f"origin {origin!r} is not allowed")


def _same_host(origin: str, host: str) -> bool:
    return origin.split("://", 1)[-1].rstrip("/") == host


class OpenSockets:
    """Every open socket, so shutdown can close them with a code instead of dropping them."""

    def __init__(self) -> None:
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.unauthenticated = 0  # device sockets that have not said hello yet

    def add(self, ws: web.WebSocketResponse) -> None:
        self._sockets.add(ws)

    def discard(self, ws: web.WebSocketResponse) -> None:
        self._sockets.discard(ws)

    def __len__(self) -> int:
        return len(self._sockets)

    async def close_all(self, message: str = "server shutting down") -> None:
        sockets = list(self._sockets)
        with contextlib.suppress(Exception):
            await asyncio.gather(
                *(ws.close(code=CloseCode.GOING_AWAY, message=message.encode()) for ws in sockets),
                return_exceptions=True,
            )
