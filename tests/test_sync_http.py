"""Batch push and delta pull over a real aiohttp server and a real SQLite file."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypedDict

from pycrdt import Doc, Map

from crdt_models.yupdate import inspect_state_vector
from storage import RecordKey
from tests.helpers import Api, Replica

Make = Callable[..., Api]


def rid() -> str:
    return str(uuid.uuid4())


IdempotencyHeader = TypedDict("IdempotencyHeader", {"Idempotency-Key": str})


def idempotency(key: str) -> IdempotencyHeader:
    """The header as a TypedDict: a plain dict under ** could, to mypy, be push's `status`."""
    return {"Idempotency-Key": key}


def server_view(changes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Apply pulled changes to empty docs, as a fresh device would."""
    docs: dict[str, Doc[Any]] = {}
    for change in changes:
        docs.setdefault(change["record_id"], Doc()).apply_update(change["update"])
    return {r: {k: v for k, v in d.get("fields", type=Map).items()} for r, d in docs.items()}


async def test_batch_create_then_versions_rise(api: Make) -> None:
    dev = api()
    replicas = {rid(): Replica() for _ in range(20)}
    items = [
        {"record_id": r, "bu": "bu1", "update": rep.set(jobdesc=f"task {r}")}
        for r, rep in replicas.items()
    ]
    results = await dev.push("activity", items)
    assert [r["status"] for r in results] == ["created"] * 20
    assert all(r["version"] == 1 and r["error"] is None for r in results)
    first = next(iter(replicas))
    again = await dev.push(
        "activity", [{"record_id": first, "update": replicas[first].set(remarks="x")}]
    )
    assert again[0]["status"] == "merged" and again[0]["version"] == 2
    dup = await dev.push("activity", [{"record_id": first, "update": replicas[first].outbox[0]}])
    assert dup[0]["status"] == "unchanged" and dup[0]["version"] == 2


async def test_offline_devices_editing_different_fields_are_both_kept(
    api: Make, client: Any
) -> None:
    a, b = api(device="dev-a"), api(device="dev-b")
    r = rid()
    base = Replica()
    await a.push("activity", [{"record_id": r, "bu": "bu1", "update": base.set(jobdesc="base")}])
    phone_b = Replica()
    phone_b.apply(base.doc.get_update())
    ua = base.set(remarks="from a")
    ub = phone_b.set(priority="HIGH")
    await a.push("activity", [{"record_id": r, "update": ua}])
    await b.push("activity", [{"record_id": r, "update": ub}])
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=a.headers())).json()
    assert record["fields"] == {"jobdesc": "base", "remarks": "from a", "priority": "HIGH"}
    assert record["version"] == 3


async def test_same_field_conflict_converges_on_every_replica(api: Make) -> None:
    a, b = api(device="dev-a"), api(device="dev-b")
    r = rid()
    ra, rb = Replica(), Replica()
    ua, ub = ra.set(remarks="A wrote this"), rb.set(remarks="B wrote this")
    res_a = await a.push(
        "activity",
        [{"record_id": r, "bu": "bu1", "update": ua, "state_vector": ra.doc.get_state()}],
    )
    res_b = await b.push(
        "activity",
        [{"record_id": r, "bu": "bu1", "update": ub, "state_vector": rb.doc.get_state()}],
    )
    ra.apply(res_a[0]["update"])
    rb.apply(res_b[0]["update"])
    res_a = await a.push("activity", [{"record_id": r, "state_vector": ra.doc.get_state()}])
    ra.apply(res_a[0]["update"])
    changes, _ = await a.pull_all("activity")
    assert ra.state() == rb.state() == server_view(changes)[r]


async def test_push_with_state_vector_returns_what_the_device_lacks(api: Make) -> None:
    a, b = api(device="dev-a"), api(device="dev-b")
    records = {rid(): Replica() for _ in range(5)}
    await a.push(
        "activity",
        [{"record_id": r, "bu": "bu1", "update": rep.set(jobdesc=r)} for r, rep in records.items()],
    )
    fresh = {r: Replica() for r in records}
    # one request catches up every record by state vector
    results = await b.push(
        "activity",
        [{"record_id": r, "state_vector": rep.doc.get_state()} for r, rep in fresh.items()],
    )
    for result in results:
        assert result["status"] == "unchanged"
        fresh[result["record_id"]].apply(result["update"])
    assert {r: rep.state() for r, rep in fresh.items()} == {r: {"jobdesc": r} for r in records}
    # a device that is up to date gets nothing
    results = await b.push(
        "activity",
        [{"record_id": r, "state_vector": rep.doc.get_state()} for r, rep in fresh.items()],
    )
    assert all(res["update"] is None for res in results)
    unknown = await b.push("activity", [{"record_id": rid(), "state_vector": b"\x00"}])
    assert unknown[0]["status"] == "error" and unknown[0]["error"]["code"] == "not_found"


async def test_out_of_order_updates_are_pending_until_their_parent_arrives(
    api: Make, client: Any
) -> None:
    dev = api()
    r = rid()
    rep = Replica()
    first, second = rep.set(jobdesc="one"), rep.set(remarks="two")
    pending = await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": second}])
    assert pending[0]["status"] == "pending"
    # the server has nothing of that writer yet: the device must re-send from clock 0
    assert not any(inspect_state_vector(pending[0]["state_vector"]).values())
    again = await dev.push("activity", [{"record_id": r, "update": second}])
    assert again[0]["status"] == "pending" and again[0]["version"] == pending[0]["version"]
    done = await dev.push("activity", [{"record_id": r, "update": first}])
    assert done[0]["status"] == "merged"
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())).json()
    assert record["fields"] == {"jobdesc": "one", "remarks": "two"}


async def test_type_errors_are_repaired_with_a_decision(api: Make) -> None:
    dev = api()
    r = rid()
    rep = Replica()
    ok = await dev.push(
        "activity", [{"record_id": r, "bu": "bu1", "update": rep.set(gracetime=15)}]
    )
    assert ok[0]["decisions"] == []
    bad = await dev.push("activity", [{"record_id": r, "update": rep.set(gracetime="15m")}])
    assert bad[0]["status"] == "merged"
    [decision] = bad[0]["decisions"]
    assert decision["rule"] == "schema.type" and decision["field"] == "gracetime"
    assert decision["rejected"] == "15m" and decision["kept"] == 15
    rep.apply(bad[0]["update"])
    assert rep.state()["gracetime"] == 15
    # the device that applied the compensation syncs again: no new compensation
    calm = await dev.push("activity", [{"record_id": r, "update": rep.doc.get_update()}])
    assert calm[0]["decisions"] == [] and calm[0]["status"] == "unchanged"


async def test_msgpack_push_and_pull(api: Make) -> None:
    dev = api()
    r = rid()
    answer = await dev.push_msgpack(
        "helpdesk", [{"record_id": r, "bu": "bu1", "update": Replica().set(ticketdesc="printer")}]
    )
    assert answer["results"][0]["status"] == "created"
    resp = await dev.client.get(
        "/api/v1/sync/helpdesk/changes", headers=dev.headers(Accept="application/msgpack")
    )
    import msgpack

    page = msgpack.unpackb(await resp.read())
    assert [c["record_id"] for c in page["changes"]] == [r]
    assert isinstance(page["changes"][0]["update"], bytes)


async def test_idempotent_retry_replays_and_a_changed_body_is_409(api: Make) -> None:
    dev = api()
    r = rid()
    item = {"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc="once")}
    first = await dev.push("activity", [item], **idempotency("k-1"))
    replay = await dev.push("activity", [item], **idempotency("k-1"))
    assert replay == first and first[0]["status"] == "created"
    changes, _ = await dev.pull_all("activity")
    assert len(changes) == 1
    other = {"record_id": rid(), "bu": "bu1", "update": Replica().set(jobdesc="twice")}
    conflict = await dev.push("activity", [other], status=409, **idempotency("k-1"))
    assert conflict["error"]["code"] == "idempotency_mismatch"
    # keys are per user: another user may use the same key
    someone = await dev.push("activity", [other], **idempotency("k-2"))
    assert someone[0]["status"] == "created"


async def test_delta_pull_pages_through_2500_changes_and_resumes(api: Make) -> None:
    dev = api()
    ids = [rid() for _ in range(2600)]
    for chunk in range(0, len(ids), 1000):
        await dev.push(
            "activity",
            [
                {"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc=r)}
                for r in ids[chunk : chunk + 1000]
            ],
        )
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await dev.changes("activity", cursor, limit=300)
        seen.extend(c["record_id"] for c in page["changes"])
        cursor, pages = page["cursor"], pages + 1
        if not page["has_more"]:
            break
    assert pages >= 9 and sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    # resume: nothing new, then exactly the new changes
    assert (await dev.changes("activity", cursor))["changes"] == []
    newer = rid()
    await dev.push(
        "activity", [{"record_id": newer, "bu": "bu1", "update": Replica().set(jobdesc="new")}]
    )
    page = await dev.changes("activity", cursor)
    assert [c["record_id"] for c in page["changes"]] == [newer] and not page["has_more"]


async def test_pull_merges_a_records_updates_into_one_change(api: Make) -> None:
    dev = api()
    r = rid()
    rep = Replica()
    await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": rep.set(jobdesc="a")}])
    for i in range(5):
        await dev.push("activity", [{"record_id": r, "update": rep.set(remarks=f"r{i}")}])
    changes, _ = await dev.pull_all("activity")
    assert len(changes) == 1 and changes[0]["version"] == 6
    assert server_view(changes)[r] == {"jobdesc": "a", "remarks": "r4"}


async def test_tenants_and_bus_are_isolated(api: Make, client: Any) -> None:
    t1, t2 = api("t1", ("bu1",)), api("t2", ("bu1",), device="dev-t2")
    t1_bu2 = api("t1", ("bu2",), user="u2", device="dev-b2")
    r = rid()
    await t1.push(
        "activity", [{"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc="secret")}]
    )
    # the other tenant sees nothing, and its push of the same id makes its own record
    assert (await t2.pull_all("activity"))[0] == []
    probe = await t2.push("activity", [{"record_id": r, "state_vector": b"\x00"}])
    assert probe[0]["error"]["code"] == "not_found" and probe[0]["update"] is None
    resp = await client.get(f"/api/v1/records/activity/{r}", headers=t2.headers())
    assert resp.status == 404
    mine = await t2.push(
        "activity", [{"record_id": r, "bu": "bu1", "update": Replica().set(jobdesc="t2")}]
    )
    assert mine[0]["status"] == "created"
    t1_view = await (await client.get(f"/api/v1/records/activity/{r}", headers=t1.headers())).json()
    assert t1_view["fields"] == {"jobdesc": "secret"}
    # another bu of the same tenant: not visible, not writable, same answer as unknown
    assert (await t1_bu2.pull_all("activity"))[0] == []
    write = await t1_bu2.push("activity", [{"record_id": r, "update": Replica().set(jobdesc="x")}])
    assert write[0]["error"]["code"] == "not_found" and write[0]["version"] == 0
    outside = await t1.push(
        "activity", [{"record_id": rid(), "bu": "bu9", "update": Replica().set(a=1)}]
    )
    assert outside[0]["error"]["code"] == "not_found"
    resp = await client.get(f"/api/v1/records/activity/{r}", headers=t1_bu2.headers())
    assert resp.status == 404


async def test_a_client_id_belongs_to_its_first_device(api: Make) -> None:
    a, b = api(device="dev-a"), api(device="dev-b")
    r = rid()
    shared = Replica(client_id=777)
    first = shared.set(jobdesc="a")
    assert (await a.push("activity", [{"record_id": r, "bu": "bu1", "update": first}]))[0][
        "status"
    ] == "created"
    stolen = await b.push("activity", [{"record_id": r, "update": shared.set(remarks="b")}])
    assert stolen[0]["status"] == "error" and stolen[0]["error"]["code"] == "client_id_owned"
    # relaying structs the server already has is fine (a full-state push)
    relay = Replica()
    relay.apply(first)
    relayed = await b.push("activity", [{"record_id": r, "update": relay.doc.get_update()}])
    assert relayed[0]["status"] == "unchanged"


async def test_a_struct_waiting_behind_two_gaps_is_not_lost(api: Make, client: Any) -> None:
    """yrs 0.28 drops a waiting struct when its parent arrives after a later struct of the
    same writer (delivery 0, 1, 3, 4, 2 below); the server re-applies waiting updates."""
    dev = api()
    r = rid()
    rep = Replica()
    ups = [
        rep.set(jobdesc="created"),
        rep.set(jobdesc=""),
        rep.set(jobdesc=""),
        rep.set(remarks="15m"),
        rep.set(jobdesc="last"),
    ]
    for i in (0, 1, 3, 4, 2):
        await dev.push("activity", [{"record_id": r, "bu": "bu1", "update": ups[i]}])
    record = await (await client.get(f"/api/v1/records/activity/{r}", headers=dev.headers())).json()
    assert record["fields"] == {"jobdesc": "last", "remarks": "15m"}
    # and a reload from storage (log order 0, 1, 3, 4, 2) gives the same record
    from server.services import SERVICES

    svc = client.server.app[SERVICES]
    key = RecordKey("t1", "activity", r)
    rec = (await svc.live.pin_many([key]))[key]
    svc.live.unpin([rec])
    svc.live.poison(rec)
    fresh = Replica()
    caught_up = await dev.push(
        "activity", [{"record_id": r, "state_vector": fresh.doc.get_state()}]
    )
    fresh.apply(caught_up[0]["update"])
    assert fresh.state() == {"jobdesc": "last", "remarks": "15m"}
