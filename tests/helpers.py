"""Test helpers: simulated devices holding real Yjs docs, and a client for the sync API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import web
from aiohttp.test_utils import TestClient
from pycrdt import Doc, Map

from server.auth import mint_token
from server.ratelimit import Rate, RateSettings

ROOT = Path(__file__).resolve().parent.parent
_FAST = Rate(100_000, 1)
GENEROUS = RateSettings(_FAST, _FAST, _FAST, sockets_per_device=1000, record=_FAST)
GENEROUS_FLAGS = [
    *("--rate-device", "100000/second", "--rate-user", "100000/second"),
    *("--rate-tenant", "100000/second", "--rate-record", "100000/second"),
]
SECRET = "test-secret-" + "0123456789abcdef" * 4
_client_ids = itertools.count(10_000)

Client = TestClient[web.Request, web.Application]
"""The test client of one server app (the `client` fixture, `make_client(...)`)."""


def token(
    tenant: str = "t1",
    bus: Iterable[str] = ("bu1",),
    user: str = "u1",
    roles: Iterable[str] = (),
    ttl_s: int = 3600,
) -> str:
    return mint_token(
        SECRET, tenant=tenant, user=user, bus=list(bus), roles=list(roles), ttl_s=ttl_s
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Replica:
    """One device's copy of one record."""

    def __init__(self, client_id: int | None = None) -> None:
        self.doc: Doc[Any] = Doc(
            client_id=client_id if client_id is not None else next(_client_ids)
        )
        self.outbox: list[bytes] = []
        self.doc.observe(lambda e: self.outbox.append(e.update))

    @property
    def fields(self) -> Map[Any]:
        fields: Map[Any] = self.doc.get("fields", type=Map)
        return fields

    def set(self, **values: Any) -> bytes:
        """Edit fields in one transaction; returns that transaction's update."""
        with self.doc.transaction():
            for k, v in values.items():
                self.fields[k] = v
        return self.outbox[-1]

    def apply(self, update: bytes | None) -> None:
        if update:
            self.doc.apply_update(update)

    def state(self) -> dict[str, Any]:
        # items(), not `for k in map`: pycrdt annotates Map.__iter__ as returning an Iterable
        return dict(self.fields.items())


class Api:
    """The sync API as one device sees it."""

    def __init__(self, client: Client, tok: str, device: str = "dev-1") -> None:
        self.client = client
        self.token = tok
        self.device = device

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Device-Id": self.device, **extra}

    async def push(
        self, domain: str, items: list[dict[str, Any]], status: int = 200, **headers: str
    ) -> Any:
        body = {"items": [_json_item(i) for i in items]}
        resp = await self.client.post(
            f"/api/v1/sync/{domain}/sync", json=body, headers=self.headers(**headers)
        )
        data = await resp.json()
        assert resp.status == status, data
        return _decode_results(data) if status == 200 else data

    async def push_msgpack(
        self, domain: str, items: list[dict[str, Any]], status: int = 200
    ) -> Any:
        resp = await self.client.post(
            f"/api/v1/sync/{domain}/sync",
            data=msgpack.packb({"items": items}),
            headers=self.headers(
                **{"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
            ),
        )
        body = await resp.read()
        assert resp.status == status, body
        return msgpack.unpackb(body) if status == 200 else body

    async def changes(
        self, domain: str, cursor: str | None = None, limit: int | None = None, status: int = 200
    ) -> Any:
        params = {k: str(v) for k, v in (("cursor", cursor), ("limit", limit)) if v is not None}
        resp = await self.client.get(
            f"/api/v1/sync/{domain}/changes", params=params, headers=self.headers()
        )
        data = await resp.json()
        assert resp.status == status, data
        if status == 200:
            for change in data["changes"]:
                change["update"] = base64.b64decode(change["update"])
        return data

    async def pull_all(
        self, domain: str, cursor: str | None = None, limit: int = 500
    ) -> tuple[list[dict[str, Any]], str]:
        out: list[dict[str, Any]] = []
        while True:
            page = await self.changes(domain, cursor, limit)
            out.extend(page["changes"])
            cursor = page["cursor"]
            if not page["has_more"]:
                return out, cursor


def _json_item(item: dict[str, Any]) -> dict[str, Any]:
    return {k: b64(v) if isinstance(v, bytes) else v for k, v in item.items()}


def _decode_results(data: dict[str, Any]) -> list[dict[str, Any]]:
    for r in data["results"]:
        for name in ("update", "state_vector"):
            if r.get(name):
                r[name] = base64.b64decode(r[name])
    results: list[dict[str, Any]] = data["results"]
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`fieldsync serve` as a child process that only this test starts and ends."""

    def __init__(self, db: Path, *extra_args: str) -> None:
        self.db, self.port = db, free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "FIELDSYNC_JWT_SECRET": SECRET, "FIELDSYNC_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "serve",
                "--db",
                str(self.db),
                "--port",
                str(self.port),
                *GENEROUS_FLAGS,
                *self.extra_args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("the server did not start")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[ServerProcess]:
        """Started and ready for the block, stopped after it."""
        self.start()
        try:
            await self.ready()
            yield self
        finally:
            self.stop()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class SocketDevice:
    """A device on the multiplexed socket, speaking msgpack frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.changes: list[dict[str, Any]] = []
        self.cursors: dict[str, str] = {}

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_bytes(msgpack.packb(frame))

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
        frame: dict[str, Any] = msgpack.unpackb(msg.data)
        if frame["t"] == "changes":
            self.changes.extend(frame["changes"])
            self.cursors[frame["domain"]] = frame["cursor"]
        return frame

    async def hello(
        self,
        tok: str,
        device: str,
        domains: list[str],
        cursors: dict[str, str | None] | None = None,
    ) -> dict[str, Any]:
        await self.send(
            {
                "t": "hello",
                "token": tok,
                "device": device,
                "domains": domains,
                **({"cursors": cursors} if cursors is not None else {}),
            }
        )
        welcome = await self.recv()
        assert welcome["t"] == "welcome", welcome
        return welcome

    async def caught_up(self, domain: str) -> list[dict[str, Any]]:
        """Read catch-up pages of one domain until has_more is false."""
        while True:
            frame = await self.recv()
            if frame["t"] == "changes" and frame["domain"] == domain and not frame["has_more"]:
                return self.changes

    async def push(self, push_id: int, domain: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        await self.send({"t": "push", "id": push_id, "domain": domain, "items": items})
        while True:
            frame = await self.recv()
            if frame["t"] in ("ack", "error") and frame.get("id") == push_id:
                return frame

    async def barrier(self) -> None:
        """Everything the server sent before our ping has arrived once the pong does."""
        await self.send({"t": "ping"})
        while (await self.recv())["t"] != "pong":
            pass

    async def closed_with(self, timeout: float = 5) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; returns the close code and any error frames."""
        errors = []
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.BINARY:
                frame = msgpack.unpackb(msg.data)
                if frame["t"] == "error":
                    errors.append(frame)
                continue
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
            ):
                return self.ws.close_code, errors
            raise AssertionError(f"unexpected {msg.type}")
