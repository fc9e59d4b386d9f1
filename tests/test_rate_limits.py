"""Rate limits per device, user and tenant: HTTP 429 + Retry-After, socket error frames."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from server.ratelimit import (
    Buckets,
    EarlyRetries,
    Limited,
    Rate,
    RateLimiter,
    RateSettings,
    TenantSlots,
)
from server.sockets import CloseCode
from tests.helpers import GENEROUS, Api, Client, Replica, ServerProcess, SocketDevice, token
from tests.test_yjs_socket import path as yjs_path

MakeClient = Callable[..., Awaitable[Client]]


def item() -> dict[str, Any]:
    return {"record_id": str(uuid.uuid4()), "bu": "bu1", "update": Replica().set(jobdesc="x")}


@pytest.mark.parametrize(
    ("spec", "count", "period"),
    [("100/hour", 100, 3600), ("5/second", 5, 1), (" 7 / minute", 7, 60)],
)
def test_rates_parse(spec: str, count: int, period: float) -> None:
    assert Rate.parse(spec) == Rate(count, period)


@pytest.mark.parametrize("spec", ["0/second", "5/day", "five/second", "5", "-1/hour", "5/"])
def test_bad_rates_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="N/second"):
        Rate.parse(spec)


def test_a_bucket_bursts_then_refills() -> None:
    now = [1000.0]
    bucket = Buckets("device", Rate(3, 60), clock=lambda: now[0])
    for _ in range(3):
        assert bucket.wait_time(("d",)) == 0
        bucket.take(("d",))
    assert bucket.wait_time(("d",)) == pytest.approx(20)
    now[0] += 20
    assert bucket.wait_time(("d",)) == 0
    assert bucket.wait_time(("other",)) == 0


def test_the_tightest_limit_decides_and_a_refusal_takes_nothing() -> None:
    now = [0.0]
    limiter = RateLimiter(
        RateSettings(Rate(10, 60), Rate(3, 60), Rate(100, 60)), clock=lambda: now[0]
    )
    for device in ("a", "b", "c"):
        limiter.check("t", "u", device)
    with pytest.raises(Limited) as refused:
        limiter.check("t", "u", "d")
    assert refused.value.scope == "user" and refused.value.retry_after == 20
    limiter.check("t", "other-user", "d")  # the device's bucket was not charged by the refusal


def test_a_reserved_token_is_kept_for_the_check_that_claims_it() -> None:
    now = [0.0]
    limiter = RateLimiter(
        RateSettings(Rate(100, 60), Rate(100, 60), Rate(2, 60)), clock=lambda: now[0]
    )
    assert limiter.refusal("t", "u", "a") is None
    limiter.reserve("t", "u", "a")  # let through: its check comes in a moment
    assert limiter.refusal("t", "u", "b") is None
    limiter.reserve("t", "u", "b")
    over = limiter.refusal("t", "u", "c")  # both tokens are spoken for
    assert over is not None and over.scope == "tenant"
    limiter.check("t", "u", "a")
    limiter.check("t", "u", "b")
    with pytest.raises(Limited):
        limiter.check("t", "u", "c")


def test_a_reservation_nobody_claims_lapses() -> None:
    now = [0.0]
    limiter = RateLimiter(
        RateSettings(Rate(100, 60), Rate(100, 60), Rate(1, 60)), clock=lambda: now[0]
    )
    limiter.reserve("t", "u", "gone")  # its request never reached the handler
    assert limiter.refusal("t", "u", "next") is not None
    now[0] += 1
    assert limiter.refusal("t", "u", "next") is None
    limiter.check("t", "u", "next")


async def test_http_answers_429_with_retry_after(make_client: MakeClient) -> None:
    client = await make_client(rates=RateSettings(Rate(3, 60), Rate(100, 60), Rate(1000, 60)))
    dev = Api(client, token(), device="phone")
    for _ in range(3):
        await dev.push("activity", [item()])
    resp = await client.post(
        "/api/v1/sync/activity/sync", json={"items": []}, headers=dev.headers()
    )
    assert resp.status == 429
    retry_after = resp.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    body = await resp.json()
    assert body["error"]["code"] == "rate_limited" and body["error"]["details"]["scope"] == "device"
    pull = await client.get("/api/v1/sync/activity/changes", headers=dev.headers())
    assert pull.status == 429
    # another device of the same user still syncs
    await Api(client, token(), device="tablet").push("activity", [item()])


async def test_a_tenant_flood_does_not_limit_another_tenant(make_client: MakeClient) -> None:
    client = await make_client(rates=RateSettings(Rate(100, 60), Rate(100, 60), Rate(5, 60)))
    for i in range(5):
        await Api(client, token("noisy", user=f"u{i}"), device=f"d{i}").push("activity", [item()])
    resp = await client.post(
        "/api/v1/sync/activity/sync",
        json={"items": []},
        headers=Api(client, token("noisy", user="u9"), device="d9").headers(),
    )
    assert resp.status == 429 and (await resp.json())["error"]["details"]["scope"] == "tenant"
    await Api(client, token("quiet"), device="q").push("activity", [item()])


def test_only_a_refusal_asked_before_its_retry_after_is_held() -> None:
    now = [100.0]
    early = EarlyRetries(max_hold_s=5.0, max_held=2, clock=lambda: now[0])
    assert early.hold_time(("t", "u"), 3) == 0  # the first refusal: answered at once
    now[0] += 1
    assert early.hold_time(("t", "u"), 3) == pytest.approx(2)  # back 2 s too soon
    assert early.hold_time(("t", "other"), 3) == 0  # another user has a window of its own
    now[0] += 2
    assert early.hold_time(("t", "u"), 3) == 0  # its Retry-After was up: a new window
    now[0] += 0.5
    assert early.hold_time(("t", "u"), 3) == pytest.approx(2.5)


def test_a_hold_is_capped_in_length_and_in_number() -> None:
    now = [0.0]
    early = EarlyRetries(max_hold_s=1.0, max_held=1, clock=lambda: now[0])
    early.hold_time(("t", "u"), 3600)
    assert early.hold_time(("t", "u"), 3600) == 1.0
    early.held = 1  # one refusal is being held: the next is answered at once
    assert early.hold_time(("t", "u"), 3600) == 0
    assert EarlyRetries(0.0, 10).hold_time(("t", "u"), 5) == 0


async def test_a_user_has_a_bounded_number_of_refusals_held() -> None:
    early = EarlyRetries(max_hold_s=0.3, max_held=100, max_held_per_user=2)
    user, other = ("t", "u"), ("t", "other")
    early.hold_time(user, 60)
    early.hold_time(other, 60)
    held = [asyncio.create_task(early.wait_out(user, 60)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert early.hold_time(user, 60) == 0  # two of the user's are held: answered at once
    assert early.hold_time(other, 60) > 0  # another user's are still held
    assert await asyncio.gather(*held) == [True, True]
    assert early.held == 0 and early.hold_time(user, 60) > 0  # released: held again


def test_early_retry_windows_are_bounded() -> None:
    early = EarlyRetries(1.0, 10, capacity=3)
    for user in "abcd":
        early.hold_time(("t", user), 60)
    assert early.hold_time(("t", "a"), 60) == 0  # the oldest window was dropped
    assert early.hold_time(("t", "d"), 60) > 0


async def test_a_client_back_before_its_retry_after_gets_its_429_late(
    make_client: MakeClient,
) -> None:
    hold = 0.6
    rates = RateSettings(Rate(1, 60), Rate(100, 60), Rate(1000, 60), early_retry_hold_s=hold)
    client = await make_client(rates=rates)
    dev = Api(client, token(), device="phone")
    await dev.push("activity", [item()])
    loop = asyncio.get_running_loop()

    async def refused() -> tuple[float, aiohttp.ClientResponse]:
        started = loop.time()
        resp = await client.post(
            "/api/v1/sync/activity/sync", json={"items": []}, headers=dev.headers()
        )
        return loop.time() - started, resp

    first_s, first = await refused()
    assert first.status == 429 and first_s < hold / 2  # the first refusal is not held
    # back at once, ignoring Retry-After: held, while another tenant is served meanwhile
    again = asyncio.create_task(refused())
    await asyncio.sleep(0.05)
    quiet_started = loop.time()
    await Api(client, token("quiet"), device="q").push("activity", [item()])
    assert loop.time() - quiet_started < hold / 2
    held_s, held = await again
    assert held.status == 429 and held_s >= hold * 0.9
    assert held.headers["Retry-After"].isdigit() and int(held.headers["Retry-After"]) >= 1
    assert (await held.json())["error"]["code"] == "rate_limited"
    metrics = await (await client.get("/metrics")).text()
    assert "fieldsync_rate_limited_held_total 1.0" in metrics


async def test_socket_refusals_are_never_held(make_client: MakeClient) -> None:
    rates = RateSettings(Rate(1, 60), Rate(100, 60), Rate(1000, 60), early_retry_hold_s=5.0)
    client = await make_client(rates=rates)
    dev = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await dev.hello(token(), "phone", ["activity"])
    await dev.caught_up("activity")
    assert (await dev.push(1, "activity", [item()]))["t"] == "ack"
    for n in (2, 3):  # the second refusal comes within the first's Retry-After
        refused = await asyncio.wait_for(dev.push(n, "activity", [item()]), 2.0)
        assert refused["t"] == "error" and refused["code"] == "rate_limited"


async def test_socket_pushes_over_the_limit_get_an_error_frame_and_keep_the_socket(
    make_client: MakeClient,
) -> None:
    client = await make_client(rates=RateSettings(Rate(2, 60), Rate(100, 60), Rate(1000, 60)))
    dev = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await dev.hello(token(), "phone", ["activity"])
    await dev.caught_up("activity")
    assert (await dev.push(1, "activity", [item()]))["t"] == "ack"
    assert (await dev.push(2, "activity", [item()]))["t"] == "ack"
    refused = await dev.push(3, "activity", [item()])
    assert refused["t"] == "error" and refused["code"] == "rate_limited"
    assert isinstance(refused["retry_after"], int) and refused["retry_after"] >= 1
    await dev.barrier()


async def test_sockets_per_device_are_capped(make_client: MakeClient) -> None:
    client = await make_client(rates=RateSettings(sockets_per_device=2))
    first = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await first.hello(token(), "phone", [])
    second = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await second.hello(token(), "phone", [])
    third = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await third.send({"t": "hello", "token": token(), "device": "phone", "domains": []})
    code, errors = await third.closed_with()
    assert code == CloseCode.TOO_MANY and errors[0]["code"] == "too_many_sockets"
    await first.ws.close()
    for _ in range(50):  # the server notices the close asynchronously
        fourth = await client.ws_connect("/api/v1/ws")
        await fourth.send_bytes(
            msgpack.packb({"t": "hello", "token": token(), "device": "phone", "domains": []})
        )
        msg = await fourth.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.BINARY and msgpack.unpackb(msg.data)["t"] == "welcome":
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the freed socket slot was never reusable")


async def test_rotating_device_ids_meet_the_users_socket_cap(make_client: MakeClient) -> None:
    client = await make_client(
        rates=dataclasses.replace(GENEROUS, sockets_per_device=2, sockets_per_user=3)
    )
    held = []
    for n in range(3):
        device = SocketDevice(await client.ws_connect("/api/v1/ws"))
        await device.hello(token(), f"phone-{n}", [])
        held.append(device)
    extra = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await extra.send({"t": "hello", "token": token(), "device": "phone-new", "domains": []})
    code, errors = await extra.closed_with()
    assert code == CloseCode.TOO_MANY and errors[0]["code"] == "too_many_sockets"
    assert "per user" in errors[0]["message"]
    # a Yjs socket counts against the same cap: refused before the upgrade, with Retry-After
    refused = await client.get(yjs_path(str(uuid.uuid4())))
    assert refused.status == 429 and refused.headers["Retry-After"].isdigit()
    assert (await refused.json())["error"]["details"]["scope"] == "sockets_per_user"
    # another user of the tenant is not affected
    other = await client.ws_connect(yjs_path(str(uuid.uuid4()), token(user="u2")))
    await other.close()
    for device in held:
        await device.ws.close()


async def test_yjs_sockets_of_a_user_are_capped_and_freed_on_close(
    make_client: MakeClient,
) -> None:
    client = await make_client(rates=dataclasses.replace(GENEROUS, sockets_per_user=2))
    record = str(uuid.uuid4())
    first = await client.ws_connect(yjs_path(record))
    second = await client.ws_connect(yjs_path(record))
    assert (await client.get(yjs_path(record))).status == 429
    await first.close()
    for _ in range(50):  # the server notices the close asynchronously
        resp = await client.get(yjs_path(record))
        if resp.status != 429:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the closed socket's slot was never freed")
    await second.close()


async def test_one_record_takes_a_bounded_number_of_updates(make_client: MakeClient) -> None:
    fast = Rate(1000, 1)
    client = await make_client(rates=RateSettings(fast, fast, fast, record=Rate(3, 60)))
    dev = Api(client, token())
    rep = Replica()
    r = str(uuid.uuid4())
    first = rep.set(jobdesc="0")
    await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": first}])
    for i in range(2):
        await dev.push("activity", [{"record_id": r, "update": rep.set(remarks=str(i))}])
    # re-sending what the server has costs nothing
    again = await dev.push("activity", [{"record_id": r, "update": first}])
    assert again[0]["status"] == "unchanged"
    refused = await dev.push(
        "activity",
        [{"record_id": r, "update": rep.set(remarks="too many")}, item()],
    )
    assert refused[0]["status"] == "error" and refused[0]["error"]["code"] == "rate_limited"
    assert refused[1]["status"] == "created"


async def test_connections_waiting_for_hello_are_capped(make_client: MakeClient) -> None:
    client = await make_client(rates=RateSettings(preauth_sockets=2))
    waiting = [await client.ws_connect("/api/v1/ws") for _ in range(2)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/v1/ws")
    assert refused.value.status == 429
    for ws in waiting:  # saying hello frees the slot
        await ws.send_bytes(
            msgpack.packb({"t": "hello", "token": token(), "device": "d", "domains": []})
        )
        assert msgpack.unpackb((await ws.receive()).data)["t"] == "welcome"
    ok = await client.ws_connect("/api/v1/ws")
    await ok.close()


async def test_compression_is_not_offered(client: Client) -> None:
    ws = await client.ws_connect("/api/v1/ws", compress=15)
    assert ws.compress == 0
    await ws.close()


def test_the_server_sets_a_memory_ceiling(tmp_path: Any) -> None:
    proc = ServerProcess(tmp_path / "m.db", "--memory-limit", "1GiB")
    proc.start()
    try:
        asyncio.run(proc.ready())
        assert proc.proc is not None
        limits = Path(f"/proc/{proc.proc.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max address space"))
        assert line.split()[3] == str(1 << 30)
    finally:
        proc.stop()


async def test_a_tenant_merges_a_bounded_number_of_requests_at_once() -> None:
    slots = TenantSlots(in_flight=2, queue=1)
    inside, most = 0, 0

    async def request() -> None:
        nonlocal inside, most
        async with slots.slot("noisy"):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    async with slots.slot("quiet"):  # another tenant is never queued behind "noisy"
        results = await asyncio.gather(*(request() for _ in range(3)))
    assert most == 1 and results == [None] * 3  # sharing the node: one at a time
    holders = [asyncio.create_task(request()) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(Limited):
        async with slots.slot("noisy"):
            pass
    await asyncio.gather(*holders)


async def test_a_tenant_alone_merges_more_at_once_than_tenants_sharing_the_node() -> None:
    slots = TenantSlots(in_flight=6, queue=100, shared=2)
    inside: dict[str, int] = {"big": 0, "small": 0}
    most: dict[str, int] = {"big": 0, "small": 0}
    release = asyncio.Event()

    async def request(tenant: str) -> None:
        async with slots.slot(tenant):
            inside[tenant] += 1
            most[tenant] = max(most[tenant], inside[tenant])
            await release.wait()
            inside[tenant] -= 1

    big = [asyncio.create_task(request("big")) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert inside["big"] == 6  # alone: the full allowance
    small = [asyncio.create_task(request("small")) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert inside["small"] == 2  # not queued behind the big tenant's waiting requests
    release.set()
    await asyncio.gather(*big, *small)
    assert most == {"big": 6, "small": 2}


async def test_a_tenant_that_asked_lately_still_shares_the_node() -> None:
    """A quiet tenant has nothing in flight most of the time; a bursting one must not get
    its full allowance back in each of those gaps."""
    slots = TenantSlots(in_flight=6, queue=100, alone_after_s=0.2)
    inside, most = 0, 0
    release = asyncio.Event()

    async def request() -> None:
        nonlocal inside, most
        async with slots.slot("noisy"):
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    async with slots.slot("quiet"):
        pass  # done before the burst starts
    burst = [asyncio.create_task(request()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert inside == 1
    release.set()
    await asyncio.gather(*burst)
    assert most == 1

    await asyncio.sleep(0.25)  # the quiet tenant has not asked for longer than the window
    release.clear()
    burst = [asyncio.create_task(request()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert inside == 6
    release.set()
    await asyncio.gather(*burst)


async def test_a_cancelled_wait_gives_its_turn_away() -> None:
    slots = TenantSlots(in_flight=1, queue=10)
    gate = asyncio.Event()
    order: list[str] = []

    async def request(name: str) -> None:
        async with slots.slot("t"):
            order.append(name)
            await gate.wait()

    first = asyncio.create_task(request("first"))
    await asyncio.sleep(0)
    doomed = asyncio.create_task(request("doomed"))
    last = asyncio.create_task(request("last"))
    await asyncio.sleep(0)
    doomed.cancel()
    gate.set()
    await asyncio.gather(first, last)
    assert order == ["first", "last"] and doomed.cancelled()
    async with slots.slot("t"):  # nothing leaked: the slot is free again
        pass
