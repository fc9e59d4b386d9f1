"""Slow handshakes and pre-request connections are capped (server/handshake.py).

Against a real `fieldsync serve` on 127.0.0.1: the guard sits on the listening server that
`web.run_app` creates, which the in-process test server does not use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
REQUEST = HEAD + b"\r\n"


@pytest.fixture
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with ServerProcess(tmp_path / "guard.db", *request.param).serving() as proc:
        yield proc


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(server: ServerProcess) -> Stream:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def answer(stream: Stream) -> bytes:
    """One response to a GET /healthz (its head and its Content-Length body)."""
    reader, _ = stream
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def closed_within(stream: Stream, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` (reading what it sends)."""
    reader, _ = stream
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1024):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def close(*streams: Stream) -> None:
    for _, writer in streams:
        writer.close()


@pytest.mark.parametrize("server", [("--head-timeout", "2")], indirect=True)
async def test_a_slow_head_is_answered_408_and_closed(server: ServerProcess) -> None:
    reader, writer = stream = await connect(server)
    started = time.monotonic()
    received = b""
    try:
        for byte in HEAD + b"X-Padding: " + b"a" * 20:  # one header byte per second
            writer.write(bytes([byte]))
            try:
                received += await asyncio.wait_for(reader.read(1024), 1.0)
            except TimeoutError:
                continue
            break
    except ConnectionError:
        pass
    elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert 1.5 < elapsed < 4.0
    assert await closed_within(stream, 2)
    close(stream)


@pytest.mark.parametrize("server", [("--head-timeout", "2")], indirect=True)
async def test_a_connection_that_sent_its_head_is_left_alone(server: ServerProcess) -> None:
    stream = await connect(server)
    stream[1].write(REQUEST)
    assert (await answer(stream)).startswith(b"HTTP/1.1 200 ")
    await asyncio.sleep(3)  # past the head timeout, idle on keep-alive
    stream[1].write(REQUEST)
    assert (await answer(stream)).startswith(b"HTTP/1.1 200 ")
    close(stream)


@pytest.mark.parametrize(
    "server", [("--max-pending-connections", "5", "--head-timeout", "30")], indirect=True
)
async def test_connections_past_the_cap_close_the_oldest_waiting(server: ServerProcess) -> None:
    served = await connect(server)  # a client that already sent a request is not counted
    served[1].write(REQUEST)
    assert (await answer(served)).startswith(b"HTTP/1.1 200 ")

    idle = [await connect(server) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert not any(await asyncio.gather(*(closed_within(s, 0.2) for s in idle)))

    more = [await connect(server) for _ in range(3)]  # past the cap: the 3 oldest go
    closed = await asyncio.gather(*(closed_within(s, 1.0) for s in idle + more))
    assert closed == [True] * 3 + [False] * 5

    fresh = await connect(server)  # a new client is still served (one more old one goes)
    fresh[1].write(REQUEST)
    assert (await answer(fresh)).startswith(b"HTTP/1.1 200 ")
    assert await closed_within(idle[3], 1.0)
    served[1].write(REQUEST)  # and the client that was served before
    assert (await answer(served)).startswith(b"HTTP/1.1 200 ")
    close(served, fresh, *idle, *more)
