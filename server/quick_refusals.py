"""429s answered in front of aiohttp, for clients already over their rate limit.

A flooding client's refused sync request costs the server about as much CPU through
aiohttp as a small push: a request object, a handler task, a response object, three
turns of the event loop; and while it is in flight the young garbage collections walk
it. That CPU is taken from every tenant. So, for each connection, `RefusingProtocol`
stands in front of aiohttp's protocol and reads the framing of every request head
itself; a push or a pull whose token was verified before (`TokenVerifier.remembered`)
and whose device, user or tenant has no token left in its bucket is answered the very
429 the handler would give (same body, headers and counters; held like it, see
`EarlyRetries`) without aiohttp seeing the request. Every other request goes to aiohttp
byte for byte: the handler then checks the limit itself (`RateLimiter.refusal` takes no
token here).

Request smuggling: a request is answered here only if its framing is beyond doubt, so
that this reader and aiohttp's parser cannot disagree on where it ends. That is an
HTTP/1.1 head of plain `name: value` lines ended by CRLF, without Transfer-Encoding,
Upgrade or Expect, with at most one Content-Length of digits. The first head outside
that subset hands the connection to aiohttp for good, with every byte not yet passed on.
A 429 is written only while aiohttp is idle on the connection (it waits for its next
request, having answered all before; if it is not yet, the request waits a few turns of
the loop for it, then goes to aiohttp), so answers keep the order of their requests.
Reading that takes three attributes of aiohttp's `RequestHandler` that are not public
(`_waiter`, `_messages`, and `_next_keepalive_close_time`, which a 429 pushes on like
any answer); `aiohttp_supported` checks them, and without them nothing is answered here.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from . import sync_api
from .auth import is_valid_id, token_of
from .errors import ApiError, error_body
from .front import FrontProtocol, ProtocolFactory, fronted
from .handshake import mark_head_complete
from .ratelimit import Limited
from .services import SERVICES, Services

log = logging.getLogger(__name__)

# Longer heads, and heads of more fields, are aiohttp's (whose own limits are higher).
MAX_HEAD = 4096
MAX_FIELDS = 32
WAIT_TURNS = 3  # of the loop, for aiohttp to finish the connection's earlier requests
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A head of plain lines only: no obs-fold, no bare CR or LF, no NUL, no space before ':'.
_HEAD = re.compile(
    rb"(%s) (/[!-~]*) HTTP/1\.1(?:\r\n%s:[\t\x20-\x7e\x80-\xff]*)*" % (_TOKEN, _TOKEN)
)
_DIGITS = re.compile(rb"[0-9]{1,15}")
# Fields that change how the request's bytes or the connection go on: aiohttp's to read.
_UNCLEAR = frozenset({b"transfer-encoding", b"upgrade", b"expect"})


def _route(method: bytes, path: str) -> tuple[bytes, re.Pattern[str]]:
    """A route's request targets, in plain characters only (else: aiohttp's to read)."""
    domain = re.escape(path).replace(r"\{domain\}", "[A-Za-z0-9_.-]+")
    return method, re.compile(domain + r"(\?[A-Za-z0-9_.~%&=+/-]*)?")


# The routes whose handlers call `Services.limit_request` before anything else.
_LIMITED = (_route(b"POST", sync_api.PUSH_PATH), _route(b"GET", sync_api.PULL_PATH))


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class Head:
    """A request head whose framing is beyond doubt."""

    method: bytes
    target: bytes
    fields: dict[bytes, list[bytes]]  # lower-cased name -> values, in order
    connection: bytes  # the Connection field's options, lower-cased
    length: int  # body bytes that follow

    def only(self, name: bytes) -> str | None:
        """The field's value if it is given exactly once in ASCII, else None."""
        values = self.fields.get(name)
        if values is None or len(values) != 1 or not values[0].isascii():
            return None
        return values[0].decode("ascii")


def parse_head(raw: bytes) -> Head | None:
    """`raw` (a head, its closing CRLF CRLF included) if its framing is clear, else None."""
    block = raw[:-4]
    head = _HEAD.fullmatch(block) if len(raw) <= MAX_HEAD else None
    lines = block.split(b"\r\n")
    if head is None or len(lines) > MAX_FIELDS + 1:
        return None
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
    connection = b",".join(fields.get(b"connection", ())).lower()
    if not _UNCLEAR.isdisjoint(fields) or b"upgrade" in connection:
        return None
    lengths = fields.get(b"content-length", [b"0"])
    if len(lengths) != 1 or _DIGITS.fullmatch(lengths[0]) is None:
        return None
    return Head(head.group(1), head.group(2), fields, connection, int(lengths[0]))


@dataclass(slots=True)
class Refusal:
    """A request over the limit `over`, of (tenant, user) `key`."""

    svc: Services
    over: Limited
    key: tuple[str, str]


class QuickRefusals:
    """What the protocols of one server share: the app, whose services decide."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._warned = False

    def protocol_factory(self, factory: ProtocolFactory) -> ProtocolFactory:
        return fronted(factory, self._front)

    def _front(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        if aiohttp_supported(inner):
            return RefusingProtocol(self, inner)
        if not self._warned:
            self._warned = True
            log.warning("quick refusals are off: %s lacks what they read", type(inner))
        return inner

    def refusal(self, head: Head) -> Refusal | None:
        """Why the handler would answer `head` 429, or None if it is the handler's (no
        token is taken, nothing is counted; a sync request let through has its tokens set
        aside for the handler's check)."""
        svc = self.app.get(SERVICES)
        target = head.target.decode("ascii")
        if svc is None or not any(
            head.method == method and targets.fullmatch(target) for method, targets in _LIMITED
        ):
            return None
        if b"close" in head.connection:
            return None  # aiohttp answers it and closes the connection
        if head.length > svc.config.limits.max_body_bytes:
            return None  # aiohttp reads a little of it, then closes the connection
        token = token_of(head.only(b"authorization") or "")
        principal = svc.verifier.remembered(token) if token else None
        device = head.only(b"device-id")
        if principal is None or device is None or not is_valid_id(device):
            return None
        over = svc.limiter.refusal(principal.tenant, principal.user, device)
        if over is None:
            svc.limiter.reserve(principal.tenant, principal.user, device)
            return None
        return Refusal(svc, over, (principal.tenant, principal.user))


def aiohttp_supported(inner: Any) -> bool:
    """Whether aiohttp's protocol has the attributes `_aiohttp_idle` and `_kept_alive` use."""
    return all(
        hasattr(inner, name) for name in ("_waiter", "_messages", "_next_keepalive_close_time")
    )


def _aiohttp_idle(inner: Any) -> bool:
    """aiohttp waits for this connection's next request, every earlier one answered."""
    waiter = inner._waiter
    return waiter is not None and not waiter.done() and not inner._messages


def _kept_alive(inner: Any) -> None:
    """An answer written here moves aiohttp's keep-alive deadline on, as its own do."""
    timeout = getattr(inner, "_keepalive_timeout", 0)
    if timeout:
        inner._next_keepalive_close_time = asyncio.get_running_loop().time() + timeout


class RefusingProtocol(FrontProtocol):
    """In front of aiohttp's protocol on one connection (see the module's docstring)."""

    __slots__ = (
        "_refusals",
        "_buffer",
        "_forward",
        "_discard",
        "_held",
        "_held_for",
        "_waiting",
        "_turns_waited",
        "_writing_paused",
        "_reading_paused",
        "_through",
    )

    def __init__(self, refusals: QuickRefusals, inner: asyncio.Protocol) -> None:
        super().__init__(inner)
        self._refusals = refusals
        self._buffer = bytearray()  # not yet passed on nor dropped; starts at a head
        self._forward = 0  # body bytes of a passed-on request still to pass on
        self._discard = 0  # body bytes of a refused request still to drop
        self._held: asyncio.TimerHandle | None = None  # the answer of a held 429
        self._held_for: Refusal | None = None
        self._waiting: asyncio.Handle | None = None  # the next look at aiohttp
        self._turns_waited = 0
        self._writing_paused = False
        self._reading_paused = False
        self._through = False  # the connection is aiohttp's alone

    def data_received(self, data: bytes) -> None:
        if self._through:
            self._inner.data_received(data)
            return
        self._buffer += data
        if self._held is not None and len(self._buffer) > MAX_HEAD and self._transport:
            self._reading_paused = True  # the client pipelines behind its held 429
            self._transport.pause_reading()
        self._pump()

    def _pump(self) -> None:
        buffer = self._buffer
        while buffer and self._held is None and self._waiting is None and not self._through:
            if self._forward or self._discard:
                self._pass_body()
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                # a bare LF may end a head for aiohttp's parser, but never for this reader
                if len(buffer) > MAX_HEAD or buffer.count(b"\n") != buffer.count(b"\r\n"):
                    self._hand_over()
                return
            head = parse_head(bytes(buffer[: end + 4]))
            if head is None:
                self._hand_over()
                return
            refusal = self._refusal(head)
            if refusal is not None and not _aiohttp_idle(self._inner):
                if self._turns_waited < WAIT_TURNS:
                    self._wait_a_turn()
                    return
                refusal = None  # aiohttp is still busy: the request is its to answer
            self._turns_waited = 0
            if refusal is not None:
                self._refuse(refusal, head, end + 4)
            else:
                self._forward = end + 4 + head.length
                self._pass_body()

    def _pass_body(self) -> None:
        """Pass on (or drop) what the buffer holds of the current request."""
        buffer = self._buffer
        if self._forward:
            n = min(self._forward, len(buffer))
            self._forward -= n
            chunk = bytes(buffer[:n])
            del buffer[:n]
            self._inner.data_received(chunk)
        else:
            n = min(self._discard, len(buffer))
            self._discard -= n
            del buffer[:n]

    def _refusal(self, head: Head) -> Refusal | None:
        """Why `head` is to be answered 429 here, or None if it is aiohttp's."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._writing_paused:
            return None
        return self._refusals.refusal(head)

    def _wait_a_turn(self) -> None:
        """Look again in a turn of the loop: aiohttp has not answered every earlier request
        of the connection yet, and a client that waits for each answer sends its next one
        about as aiohttp, having written the answer, goes back to waiting."""
        self._turns_waited += 1
        self._waiting = asyncio.get_running_loop().call_soon(self._waited)

    def _waited(self) -> None:
        self._waiting = None
        self._pump()

    def _refuse(self, refusal: Refusal, head: Head, head_size: int) -> None:
        """Answer the request of `head` 429 (or hold the answer), and drop its body."""
        assert self._transport is not None
        del self._buffer[:head_size]
        self._discard = head.length
        mark_head_complete(self._transport)
        early = refusal.svc.limiter.early_retries
        hold = early.hold_time(refusal.key, refusal.over.retry_after)
        if hold > 0:
            early.start_hold(refusal.key)
            loop = asyncio.get_running_loop()
            self._held = loop.call_later(hold, self._answer_held, refusal)
            self._held_for = refusal
        else:
            self._answer(refusal)

    def _answer(self, refusal: Refusal) -> None:
        error = refusal.svc.refused(refusal.over)
        metrics = refusal.svc.metrics
        metrics.http_errors.labels(error.code).inc()
        metrics.rate_limited_quick.inc()
        assert self._transport is not None
        self._transport.write(raw_response(error))
        _kept_alive(self._inner)

    def _answer_held(self, refusal: Refusal) -> None:
        self._release_hold()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        refusal.svc.metrics.rate_limited_held.inc()
        self._answer(refusal)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._pump()

    def _release_hold(self) -> None:
        held, refusal = self._held, self._held_for
        self._held = self._held_for = None
        if held is not None and refusal is not None:
            held.cancel()
            refusal.svc.limiter.early_retries.end_hold(refusal.key)

    def _hand_over(self) -> None:
        """From now on every byte goes to aiohttp, starting with those buffered."""
        self._through = True
        rest, self._buffer = bytes(self._buffer), bytearray()
        self.step_aside()
        if rest:
            self._inner.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_hold()
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        super().resume_writing()


_date_second = -1
_date = ""


def _http_date() -> str:
    global _date_second, _date
    now = int(time.time())
    if now != _date_second:
        _date_second, _date = now, email.utils.formatdate(now, usegmt=True)
    return _date


def raw_response(error: ApiError) -> bytes:
    """`error` as the bytes of the HTTP/1.1 answer aiohttp would write for it (keep-alive)."""
    body = error_body(error.code, error.message, error.details)
    fields = {
        **error.headers,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Date": _http_date(),
        "Server": SERVER_SOFTWARE,
    }
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return (head + "\r\n").encode("latin-1") + body
