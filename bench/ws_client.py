"""A minimal WebSocket client for load generation: one asyncio Protocol per socket.

Why not aiohttp's client: a benchmark of the device socket needs thousands of sockets and
hundreds of thousands of frames per second on the clients' side of a 2-core machine. This
client reads whole TCP chunks and splits them into frames in one loop (no task, future or
message object per frame), hands each binary payload to a callback with the time the chunk
arrived, answers the server's heartbeat pings, and masks what it sends (RFC 6455 5.3).
Its state per socket is a few hundred bytes plus the kernel's buffers.

It speaks exactly what fieldsync's device socket needs: no extensions (the server sends
uncompressed frames), binary frames in, binary frames out.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# on_frame(socket, payload, arrival monotonic ns)
FrameHandler = Callable[["WsSocket", bytes, int], None]


class HandshakeError(Exception):
    pass


def _mask(payload: bytes) -> bytes:
    """The masking key followed by the masked payload."""
    key = os.urandom(4)
    n = len(payload)
    if not n:
        return key
    stream = (key * (n // 4 + 1))[:n]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return key + masked.to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (masked)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _mask(payload)


class WsSocket(asyncio.Protocol):
    """One client WebSocket. `on_frame` gets every binary message; `tag` is the owner's."""

    def __init__(self, host: str, port: int, path: str, on_frame: FrameHandler) -> None:
        self.host, self.port, self.path = host, port, path
        self.on_frame = on_frame
        self.tag: object = None
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None  # the code of a close frame the server sent
        self.bytes_in = 0
        self.pings = 0
        self._key = base64.b64encode(os.urandom(16))
        self._buf = bytearray()
        self._handshaking = True
        self._fragments: list[bytes] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.path.encode(), self.host.encode(), self.port, self._key)
        )

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        if self._handshaking and not self._handshake(buf):
            return
        self._frames(buf, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- client side ---------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, payload: bytes) -> None:
        if self.is_open:
            assert self.transport is not None
            self.transport.write(encode_frame(OP_BINARY, payload))

    def close(self, code: int = 1000) -> None:
        """Send a close frame and drop the connection (no wait for the server's close)."""
        if self.is_open:
            assert self.transport is not None
            self.transport.write(encode_frame(OP_CLOSE, code.to_bytes(2, "big")))
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- parsing -------------------------------------------------------------------

    def _handshake(self, buf: bytearray) -> bool:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self._fail(HandshakeError("an endless handshake answer"))
            return False
        head = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        status = head.split("\r\n", 1)[0]
        accept = base64.b64encode(hashlib.sha1(self._key + GUID).digest()).decode()
        if " 101 " not in status + " " or accept not in head:
            self._fail(HandshakeError(f"{status}: {bytes(buf[:300])!r}"))
            return False
        self._handshaking = False
        self.opened.set_result(None)
        return True

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _frames(self, buf: bytearray, now: int) -> None:
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:  # servers never mask
                self._fail(HandshakeError("a masked frame from the server"))
                return
            end = pos + head + length
            if end > size:
                break
            payload = bytes(buf[pos + head : end])
            pos = end
            self._frame(b0 & 0x0F, bool(b0 & 0x80), payload, now)
        del buf[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytes, now: int) -> None:
        if opcode in (OP_BINARY, OP_TEXT):
            if fin:
                self.on_frame(self, payload, now)
            else:
                self._fragments = [payload]
        elif opcode == OP_CONT and self._fragments is not None:
            self._fragments.append(payload)
            if fin:
                whole, self._fragments = b"".join(self._fragments), None
                self.on_frame(self, whole, now)
        elif opcode == OP_PING:
            self.pings += 1
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close(1000)


async def open_socket(
    host: str, port: int, path: str, on_frame: FrameHandler, timeout_s: float = 30.0
) -> WsSocket:
    """Connect and finish the opening handshake; raises on failure."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, sock = await loop.create_connection(
            lambda: WsSocket(host, port, path, on_frame), host, port
        )
        await sock.opened
    return sock
