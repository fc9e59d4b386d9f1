"""Hostile and broken input: a clear JSON error, the right status, nothing changed, no crash."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import resource
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import msgpack
import pytest

from server.config import Limits
from tests.helpers import SECRET, Api, Client, Replica, b64, token

MakeClient = Callable[..., Awaitable[Client]]
CORPUS = Path(__file__).parent / "corpus" / "hostile"
PANIC = base64.b64decode("AQOp/6QBAAQBAXQBQAAAAAAAAAB2AQEBdndrAA==")


def rid() -> str:
    return str(uuid.uuid4())


def assert_error_shape(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)


def hostile_updates() -> list[tuple[str, bytes]]:
    files = sorted(p for p in CORPUS.glob("*") if p.suffix not in (".md", ".sv"))
    assert files, "the hostile corpus is missing"
    return [(p.name, p.read_bytes()) for p in files]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_hostile_updates_are_item_errors_and_do_not_brick_the_record(
    api: Any, client: Any
) -> None:
    dev = api()
    r = rid()
    rep = Replica()
    await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": rep.set(jobdesc="intact")}])
    start_rss = rss_mb()
    for name, data in hostile_updates() + [
        ("panic", PANIC),
        ("alloc-bomb", bytes.fromhex("ffffff7a")),
    ]:
        results = await dev.push("activity", [{"record_id": r, "update": data}])
        assert results[0]["status"] == "error", name
        assert results[0]["error"]["code"] in {"malformed_update", "update_rejected"}, name
    assert rss_mb() - start_rss < 200, "memory grew on hostile input"
    # the record still works and kept what was acknowledged
    ok = await dev.push("activity", [{"record_id": r, "update": rep.set(remarks="after")}])
    assert ok[0]["status"] == "merged" and ok[0]["version"] == 2
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())).json()
    assert record["fields"] == {"jobdesc": "intact", "remarks": "after"}


async def test_state_vector_bomb_is_refused(api: Any) -> None:
    dev = api()
    r = rid()
    await dev.push(
        "activity", [{"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc="x")}]
    )
    started = time.perf_counter()
    results = await dev.push(
        "activity", [{"record_id": r, "state_vector": bytes.fromhex("ffffffff01")}]
    )
    assert results[0]["error"]["code"] == "malformed_state_vector"
    assert time.perf_counter() - started < 1


async def test_good_items_beside_a_bad_one_still_merge(api: Any) -> None:
    dev = api()
    good = rid()
    results = await dev.push(
        "activity",
        [
            {"record_id": rid(), "bu": "bu1", "update": PANIC},
            {"record_id": good, "bu": "bu1", "update": Replica().set(jobdesc="fine")},
        ],
    )
    assert [r["status"] for r in results] == ["error", "created"]


async def test_a_panicking_update_that_passes_the_gate_is_contained(api: Any, client: Any) -> None:
    """Even if yrs panics on bytes the pre-check accepts, the doc is reloaded from storage."""
    from server.services import SERVICES

    svc = client.server.app[SERVICES]
    dev = api()
    r = rid()
    rep = Replica()
    await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": rep.set(jobdesc="kept")}])
    real_check = svc.pipeline.gate.check_update
    svc.pipeline.gate.check_update = lambda data: real_check(rep.set(remarks="shape only"))
    try:
        results = await dev.push("activity", [{"record_id": r, "update": PANIC}])
    finally:
        svc.pipeline.gate.check_update = real_check
    assert results[0]["error"]["code"] == "update_rejected"
    quarantined = await svc.store.quarantined("t1")
    assert any(u == PANIC for _, _, _, u in quarantined)
    ok = await dev.push("activity", [{"record_id": r, "update": rep.outbox[-1]}])
    assert ok[0]["status"] == "merged"
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())).json()
    assert record["fields"] == {"jobdesc": "kept", "remarks": "shape only"}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "malformed_body"),
        (b'{"items": [], "items": []}', "application/json", 400, "malformed_body"),
        (b'{"items": NaN}', "application/json", 400, "malformed_body"),
        (b"[1, 2]", "application/json", 400, "malformed_body"),
        (b"\xc1\xc1", "application/msgpack", 400, "malformed_body"),
        (b"\x82\xa5items\x90\xa5items\x90", "application/msgpack", 400, "malformed_body"),
        (b"items=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (
            b'{"items": [{"bu": "bu1", "update": "AAA="}]}',
            "application/json",
            400,
            "malformed_body",
        ),
        (
            b'{"items": [{"record_id": "r", "update": "not base64!"}]}',
            "application/json",
            400,
            "malformed_body",
        ),
        (b'{"items": [{"record_id": "r"}]}', "application/json", 400, "malformed_body"),
        (
            b'{"items": [{"record_id": "../../etc", "update": "AAA="}]}',
            "application/json",
            400,
            "malformed_body",
        ),
        (
            b'{"items": [{"record_id": "r", "update": 5}]}',
            "application/json",
            400,
            "malformed_body",
        ),
    ],
)
async def test_malformed_bodies_get_the_json_error_shape(
    api: Any, body: bytes, content_type: str, status: int, code: str
) -> None:
    dev = api()
    resp = await dev.client.post(
        "/api/v1/sync/activity/sync",
        data=body,
        headers=dev.headers(**{"Content-Type": content_type}),
    )
    assert resp.status == status
    assert_error_shape(await resp.json(), code)
    assert (await dev.pull_all("activity"))[0] == []


async def test_1001_items_are_refused(api: Any) -> None:
    dev = api()
    items = [{"record_id": f"r{i}", "bu": "bu1", "update": "AAA="} for i in range(1001)]
    resp = await dev.client.post(
        "/api/v1/sync/activity/sync", json={"items": items}, headers=dev.headers()
    )
    assert resp.status == 413
    assert_error_shape(await resp.json(), "too_many_items")


async def test_oversized_body_is_refused(api: Any, client: Any) -> None:
    from server.services import SERVICES

    limit = client.server.app[SERVICES].config.limits.max_body_bytes
    dev = api()
    big = json.dumps({"items": [{"record_id": "r", "bu": "bu1", "update": b64(os.urandom(limit))}]})
    resp = await dev.client.post(
        "/api/v1/sync/activity/sync",
        data=big,
        headers=dev.headers(**{"Content-Type": "application/json"}),
    )
    assert resp.status == 413
    assert_error_shape(await resp.json(), "payload_too_large")


async def test_oversized_update_is_an_item_error(api: Any) -> None:
    dev = api()
    results = await dev.push(
        "activity", [{"record_id": rid(), "bu": "bu1", "update": os.urandom(2 << 20)}]
    )
    assert results[0]["error"]["code"] == "malformed_update"


def _forge(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def _claims(**over: Any) -> dict[str, Any]:
    base = {"sub": "u1", "tenant": "t1", "bus": ["bu1"], "roles": [], "exp": int(time.time()) + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "bad_token",
    [
        pytest.param(lambda: token(ttl_s=-120), id="expired"),
        pytest.param(
            lambda: _forge(_claims(), key="another-secret-another-secret-xx"), id="forged"
        ),
        pytest.param(lambda: _forge(_claims(exp=None)), id="no-exp"),
        pytest.param(lambda: _forge(_claims(tenant=None)), id="no-tenant"),
        pytest.param(lambda: _forge(_claims(bus="bu1")), id="bus-not-a-list"),
        pytest.param(lambda: _forge(_claims(), alg="HS512"), id="unpinned-alg"),
        pytest.param(
            lambda: jwt.encode(_claims(), None, algorithm="none"),  # type: ignore[arg-type]
            id="alg-none",
        ),
        pytest.param(lambda: token()[:-4] + "AAAA", id="tampered"),
        pytest.param(lambda: "not-a-jwt", id="garbage"),
    ],
)
async def test_bad_tokens_are_401(client: Any, bad_token: Any) -> None:
    api = Api(client, bad_token())
    for method, path in [
        ("POST", "/api/v1/sync/activity/sync"),
        ("GET", "/api/v1/sync/activity/changes"),
        ("GET", "/api/v1/records/activity/x"),
    ]:
        resp = await client.request(method, path, json={"items": []}, headers=api.headers())
        assert resp.status == 401, (method, path)
        assert_error_shape(await resp.json(), "unauthorized")


async def test_missing_auth_and_device_id(client: Any) -> None:
    resp = await client.post("/api/v1/sync/activity/sync", json={"items": []})
    assert resp.status == 401
    assert_error_shape(await resp.json(), "unauthorized")
    resp = await client.post(
        "/api/v1/sync/activity/sync",
        json={"items": []},
        headers={"Authorization": f"Bearer {token()}"},
    )
    assert resp.status == 400
    assert_error_shape(await resp.json(), "bad_request")


async def test_unknown_domain_route_and_cursor(api: Any) -> None:
    dev = api()
    resp = await dev.client.post(
        "/api/v1/sync/payroll/sync", json={"items": []}, headers=dev.headers()
    )
    assert resp.status == 404
    assert_error_shape(await resp.json(), "not_found")
    resp = await dev.client.get("/api/v1/nowhere", headers=dev.headers())
    assert resp.status == 404
    assert_error_shape(await resp.json(), "not_found")
    for cursor in ["garbage", b64(msgpack.packb({"v": 1, "s": b"x", "c": {}})), "A" * 5000]:
        data = await dev.changes("activity", cursor, status=400)
        assert_error_shape(data, "invalid_cursor")
    data = await dev.changes("activity", limit=0, status=400)
    assert_error_shape(data, "bad_request")


async def test_a_cursor_from_another_tenant_or_domain_is_refused(api: Any) -> None:
    t1, t2 = api("t1"), api("t2")
    _, cursor = await t1.pull_all("activity")
    assert_error_shape(await t2.changes("activity", cursor, status=400), "invalid_cursor")
    assert_error_shape(await t1.changes("helpdesk", cursor, status=400), "invalid_cursor")


async def _raw_post(client: Client, head: bytes, body: bytes, wait_s: float) -> bytes:
    """Send a request head and part of a body over a raw socket; what comes back."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), wait_s)
    finally:
        writer.close()


async def test_a_stalled_request_body_is_answered_408_and_saves_nothing(
    make_client: MakeClient,
) -> None:
    client = await make_client(limits=dataclasses.replace(Limits(), body_idle_timeout_s=0.3))
    dev = Api(client, token())
    head = (
        "POST /api/v1/sync/activity/sync HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {dev.token}\r\nDevice-Id: dev-1\r\n"
        "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = await _raw_post(client, head, b'{"items": [', wait_s=5)
    assert time.monotonic() - started < 3
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408"), answer
    assert_error_shape(json.loads(body), "request_timeout")
    assert (await dev.pull_all("activity"))[0] == []


async def test_a_chunked_body_over_the_limit_is_refused(make_client: MakeClient) -> None:
    client = await make_client(limits=dataclasses.replace(Limits(), max_body_bytes=1000))
    dev = Api(client, token())

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 100

    resp = await client.post(
        "/api/v1/sync/activity/sync",
        data=chunks(),
        headers=dev.headers(**{"Content-Type": "application/json"}),
    )
    assert resp.status == 413
    assert_error_shape(await resp.json(), "payload_too_large")
