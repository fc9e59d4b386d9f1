"""429s answered in front of aiohttp (server/quick_refusals.py).

Against real `fieldsync serve` processes on 127.0.0.1, one with quick refusals and one
without: every byte sequence, clean or hostile, must get the same answers from both, and
the clean ones must have been answered in front of aiohttp.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from server.quick_refusals import MAX_HEAD, parse_head
from tests.helpers import ServerProcess, SocketDevice, token

LIMITS = ("--rate-device", "1/minute")
PULL = b"GET /api/v1/sync/activity/changes HTTP/1.1\r\nHost: h\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"


def auth(tok: str, device: str) -> bytes:
    return f"Authorization: Bearer {tok}\r\nDevice-Id: {device}\r\n".encode()


def pull(tok: str, device: str, extra: bytes = b"") -> bytes:
    return PULL + auth(tok, device) + extra + b"\r\n"


def push(tok: str, device: str, body: bytes, extra: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n".encode()
    head = b"POST /api/v1/sync/activity/sync HTTP/1.1\r\nHost: h\r\n" + auth(tok, device)
    return head + b"Content-Type: application/json\r\n" + extra + length + b"\r\n" + body


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


async def read_answers(
    reader: asyncio.StreamReader, idle_s: float = 1.5, count: int = 1000
) -> list[Answer]:
    """`count` answers, or fewer if the server closes the connection or stays silent
    `idle_s` first."""
    answers: list[Answer] = []
    while len(answers) < count:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return answers
        lines = head.decode("latin-1").split("\r\n")
        fields = [tuple(f.strip() for f in line.split(":", 1)) for line in lines[1:] if line]
        length = next((int(v) for k, v in fields if k.lower() == "content-length"), 0)
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        answers.append(Answer(int(lines[0].split()[1]), tuple(sorted(fields)), body))  # type: ignore[arg-type]
    return answers


def comparable(answer: Answer) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
    """What must match between the two servers: not the date, not a 200's body (cursors
    name the node), and not the seconds to wait (they tick)."""
    headers = tuple((k, re.sub(r"\d+", "N", v)) for k, v in answer.headers if k != "Date")
    body = b"" if answer.status == 200 else re.sub(rb"\d+", b"N", answer.body)
    return answer.status, headers, body


async def metric(server: ServerProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """A server answering refusals quickly, and one answering them in the handler."""
    root = tmp_path_factory.mktemp("quick")
    procs = [
        ServerProcess(root / "on.db", *LIMITS, "--rate-hold", "0"),
        ServerProcess(root / "off.db", *LIMITS, "--rate-hold", "0", "--quick-refusals", "off"),
    ]
    for proc in procs:
        proc.start()

    async def ready() -> None:
        await asyncio.gather(*(proc.ready() for proc in procs))

    try:
        asyncio.run(ready())
        yield procs
    finally:
        for proc in procs:
            proc.stop()


async def exchange(
    server: ServerProcess, device: str, chunks: Sequence[bytes], tok: str, idle_s: float = 1.5
) -> list[Answer]:
    """On one connection: a pull that takes the device's only token (and has the server
    remember the token), then `chunks`, written one by one; every answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(pull(tok, device))
        assert [a.status for a in await read_answers(reader, count=1)] == [200]
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.005)
        return await read_answers(reader, idle_s) if idle_s else []
    finally:
        writer.close()


def cases(tok: str, dev: str) -> dict[str, list[bytes]]:
    """Byte sequences sent after the warm-up pull, `dev` over its limit; `clean-*` ones
    are answered in front of aiohttp. No chunk follows one the server answers by closing
    the connection: the server's kernel would reset it, and the answer could be lost."""
    smuggled = push(tok, dev, HEALTHZ)
    lf_only = pull(tok, dev).replace(b"\r\n", b"\n")
    fresh = token(user="someone-else")  # valid, but never seen: not remembered
    return {
        "clean-pull": [pull(tok, dev)],
        "clean-push-whose-body-looks-like-a-request": [smuggled, HEALTHZ],
        "clean-pull-with-a-query": [
            pull(tok, dev).replace(b"/changes ", b"/changes?limit=5&cursor= ")
        ],
        "clean-one-byte-at-a-time": [bytes([b]) for b in pull(tok, dev)],
        "clean-head-then-body": [smuggled[:-20], smuggled[-20:], HEALTHZ],
        "pipelined": [pull(tok, dev) + smuggled + pull(tok, dev + "-b") + pull(tok, dev)],
        "transfer-encoding-and-length": [
            push(tok, dev, b"0\r\n\r\n" + HEALTHZ, b"Transfer-Encoding: chunked\r\n")
        ],
        "declared-oversized-body": [
            push(tok, dev, b"{}").replace(b"Content-Length: 2", b"Content-Length: 40000000")
        ],
        "chunked": [
            pull(tok, dev, b"Transfer-Encoding: chunked\r\n").replace(b"GET", b"POST")
            + b"5\r\nhello\r\n0\r\n\r\n"
            + HEALTHZ
        ],
        "two-lengths": [push(tok, dev, HEALTHZ, b"Content-Length: 0\r\n")],
        "signed-length": [
            push(tok, dev, HEALTHZ).replace(b"Content-Length: ", b"Content-Length: +")
        ],
        "space-before-colon": [
            push(tok, dev, HEALTHZ).replace(b"Content-Length:", b"Content-Length :")
        ],
        "folded-field": [pull(tok, dev, b"X-A: a\r\n b\r\n")],
        "bare-lf-head": [lf_only],
        "lf-inside-a-field": [pull(tok, dev, b"X-A: a\nContent-Length: 3\r\n") + b"abc"],
        "nul-in-a-field": [pull(tok, dev, b"X-A: a\x00b\r\n")],
        "obs-text-in-a-field": [pull(tok, dev, b"X-A: caf\xc3\xa9 \xff\r\n")],
        "odd-query": [pull(tok, dev).replace(b"/changes ", b'/changes?a="{|}\\^`<> ')],
        "many-fields": [pull(tok, dev, b"X-A: a\r\n" * 40)],
        "http-1.0": [pull(tok, dev).replace(b"HTTP/1.1", b"HTTP/1.0")],
        "absolute-form": [pull(tok, dev).replace(b"GET /", b"GET http://h/")],
        "expect-continue": [push(tok, dev, b"{}", b"Expect: 100-continue\r\n")],
        "upgrade": [pull(tok, dev, b"Connection: Upgrade\r\nUpgrade: websocket\r\n")],
        "connection-close": [pull(tok, dev, b"Connection: close\r\n")],
        "head-method": [pull(tok, dev).replace(b"GET", b"HEAD"), HEALTHZ],
        "post-to-pull": [pull(tok, dev).replace(b"GET", b"POST")],
        "percent-encoded-domain": [pull(tok, dev).replace(b"activity", b"activit%79")],
        "token-not-remembered": [pull(fresh, dev)],
        "forged-token": [pull(tok[:-4] + "AAAA", dev)],
        "lowercase-bearer": [pull(tok, dev).replace(b"Bearer", b"bearer")],
        "two-device-ids": [pull(tok, dev, f"Device-Id: {dev}-b\r\n".encode())],
        "two-tokens": [pull(tok, dev, f"Authorization: Bearer {tok}\r\n".encode())],
        "bad-device-id": [pull(tok, dev).replace(dev.encode(), b"a/b")],
        "long-head": [pull(tok, dev, b"X-A: " + b"a" * MAX_HEAD + b"\r\n")],
        "huge-field": [pull(tok, dev, b"X-A: " + b"a" * 9000 + b"\r\n")],
        "leading-crlf": [b"\r\n" + pull(tok, dev)],
    }


async def test_every_input_gets_the_answers_the_handler_gives(
    servers: list[ServerProcess],
) -> None:
    tok = token(user="quick")
    quick, slow = servers
    before = await metric(quick, "fieldsync_rate_limited_quick_total")
    named = cases(tok, "dev")  # only the names; each case has a device of its own
    results = {}
    for server in servers:
        runs = [
            exchange(server, f"dev-{i}", cases(tok, f"dev-{i}")[name], tok)
            for i, name in enumerate(named)
        ]
        results[server.port] = await asyncio.gather(*runs)
    for name, on, off in zip(named, results[quick.port], results[slow.port], strict=True):
        assert [comparable(a) for a in on] == [comparable(a) for a in off], name
        assert on, name
    clean = [name for name in named if name.startswith("clean-")]
    answered = await metric(quick, "fieldsync_rate_limited_quick_total") - before
    assert answered >= len(clean), "quick refusals are not in use: an aiohttp upgrade?"
    assert await metric(slow, "fieldsync_rate_limited_quick_total") == 0


async def test_a_quick_429_is_the_handlers_429(servers: list[ServerProcess]) -> None:
    tok = token(user="same")
    on, off = [await exchange(s, "same-dev", [pull(tok, "same-dev")], tok) for s in servers]
    assert len(on) == len(off) == 1
    assert on[0].status == 429 and on[0].body == off[0].body
    assert {k for k, _ in on[0].headers} == {k for k, _ in off[0].headers}
    assert dict(on[0].headers)["Retry-After"] == dict(off[0].headers)["Retry-After"]
    assert dict(on[0].headers)["Content-Type"] == "application/json"
    assert b'"code": "rate_limited"' in on[0].body and b'"scope": "device"' in on[0].body


async def test_the_connection_goes_on_after_a_quick_429(servers: list[ServerProcess]) -> None:
    tok = token(user="goes-on")
    quick = servers[0]
    before = await metric(quick, "fieldsync_rate_limited_quick_total")
    answers = await exchange(
        quick, "on-dev", [pull(tok, "on-dev"), pull(tok, "on-dev"), pull(tok, "on-dev-b")], tok
    )
    assert [a.status for a in answers] == [429, 429, 200]
    assert await metric(quick, "fieldsync_rate_limited_quick_total") - before == 2


async def test_a_device_socket_upgrades_through_the_front(servers: list[ServerProcess]) -> None:
    url = f"{servers[0].url}/api/v1/ws"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        dev = SocketDevice(ws)
        await dev.hello(token(user="socket"), "socket-dev", ["activity"])
        assert (await dev.recv())["t"] == "changes"


@pytest.fixture
async def holding(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with ServerProcess(tmp_path / "hold.db", *LIMITS, "--rate-hold", "1").serving() as proc:
        yield proc


async def test_a_client_back_too_soon_gets_its_quick_429_late(holding: ServerProcess) -> None:
    tok = token(user="held")
    reader, writer = await asyncio.open_connection("127.0.0.1", holding.port)
    try:
        writer.write(pull(tok, "held-dev"))
        assert [a.status for a in await read_answers(reader, count=1)] == [200]
        writer.write(pull(tok, "held-dev"))
        assert [a.status for a in await read_answers(reader, count=1)] == [429]  # at once
        started = time.monotonic()
        writer.write(pull(tok, "held-dev") + pull(tok, "held-dev-b"))
        other = await exchange(holding, "other-dev", [], tok, idle_s=0)  # not kept waiting
        assert time.monotonic() - started < 0.8 and other == []
        answers = await read_answers(reader, idle_s=2, count=2)
        assert time.monotonic() - started >= 0.9
        assert [a.status for a in answers] == [429, 200]  # in order, the held one first
    finally:
        writer.close()
    assert await metric(holding, "fieldsync_rate_limited_held_total") == 1
    assert await metric(holding, "fieldsync_rate_limited_quick_total") == 2


async def test_a_connection_closed_while_its_429_is_held_frees_the_hold(
    holding: ServerProcess,
) -> None:
    tok = token(user="gone")

    async def warmed(device: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", holding.port)
        writer.write(pull(tok, device))
        assert [a.status for a in await read_answers(reader, count=1)] == [200]
        return reader, writer

    reader, writer = await warmed("gone-dev")
    try:
        writer.write(pull(tok, "gone-dev"))  # refused at once: the user's window opens
        assert [a.status for a in await read_answers(reader, count=1)] == [429]
        # more held at once than the cap of one user's, all let go when they close
        gone = await asyncio.gather(*(warmed(f"gone-{i}") for i in range(6)))
        for _, other in gone:
            other.write(pull(tok, "gone-dev"))
        await asyncio.sleep(0.2)
        for _, other in gone:
            other.close()
        await asyncio.sleep(0.2)
        started = time.monotonic()
        writer.write(pull(tok, "gone-dev"))
        assert [a.status for a in await read_answers(reader, idle_s=2, count=1)] == [429]
        assert time.monotonic() - started >= 0.3  # held: the cap was not used up
    finally:
        writer.close()
    assert await metric(holding, "fieldsync_rate_limited_held_total") == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /x?y=1 HTTP/1.1\r\nContent-Length: 12\r\nX-A:  spaced  \r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n",
    ],
)
def test_a_clear_head_is_read(raw: bytes) -> None:
    head = parse_head(raw)
    assert head is not None
    assert head.length == (12 if b"12" in raw else 0)
    if b"X-A" in raw:
        assert head.only(b"x-a") == "spaced"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1234567890123456\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\nB: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\rB: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: \x00\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
    ],
)
def test_a_head_with_unclear_framing_is_not_read(raw: bytes) -> None:
    assert parse_head(raw) is None
