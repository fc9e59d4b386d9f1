"""The back-office API: GET with decision history, PATCH as a server-authored, rule-checked edit."""

from __future__ import annotations

import uuid
from typing import Any

from tests.helpers import Api, Client, Replica, SocketDevice, token


async def created(client: Client, **fields: Any) -> tuple[str, Replica, Api]:
    device = Api(client, token(), device="phone")
    rep = Replica()
    r = str(uuid.uuid4())
    await device.push("activity", [{"record_id": r, "bu": "bu1", "update": rep.set(**fields)}])
    return r, rep, device


async def patch(
    client: Client,
    r: str,
    body: Any,
    roles: tuple[str, ...] = ("backoffice",),
    bus: tuple[str, ...] = ("bu1",),
    domain: str = "activity",
) -> tuple[int, Any]:
    api = Api(client, token(bus=bus, user="office", roles=roles), device="office-pc")
    resp = await client.patch(f"/api/v1/records/{domain}/{r}", json=body, headers=api.headers())
    return resp.status, await resp.json()


async def test_a_backoffice_edit_is_merged_and_reaches_devices_live(client: Client) -> None:
    r, rep, _ = await created(client, jobdesc="fix pump", priority="LOW")
    live = SocketDevice(await client.ws_connect("/api/v1/ws"))
    await live.hello(token(), "phone", ["activity"])
    await live.caught_up("activity")
    status, body = await patch(client, r, {"fields": {"priority": "HIGH", "remarks": None}})
    assert status == 200, body
    assert body["fields"] == {"jobdesc": "fix pump", "priority": "HIGH"}
    assert body["version"] == 2 and body["decisions"] == []
    frame = await live.recv()
    assert frame["t"] == "changes"
    rep.apply(frame["changes"][0]["update"])
    assert rep.state() == {"jobdesc": "fix pump", "priority": "HIGH"}


async def test_only_backoffice_and_supervisors_may_edit(client: Client) -> None:
    r, _, _ = await created(client, jobdesc="x")
    status, body = await patch(client, r, {"fields": {"priority": "HIGH"}}, roles=("approver",))
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, _ = await patch(client, r, {"fields": {"priority": "HIGH"}}, roles=("supervisor",))
    assert status == 200


async def test_bad_edits_are_refused_and_change_nothing(client: Client) -> None:
    r, _, device = await created(client, jobdesc="x")
    cases = [
        ({"fields": {"nosuchfield": 1}}, 422, "invalid_record"),
        ({"fields": {"remarks": {"nested": True}}}, 422, "invalid_record"),
        ({"fields": {}}, 400, "malformed_body"),
        ({"fields": {"remarks": "x"}, "extra": 1}, 400, "malformed_body"),
        (["not", "a", "map"], 400, "malformed_body"),
    ]
    for body, status, code in cases:
        got, answer = await patch(client, r, body)
        assert (got, answer["error"]["code"]) == (status, code), body
    got, answer = await patch(client, r, {"fields": {"remarks": "y"}}, bus=("bu2",))
    assert got == 404
    got, answer = await patch(client, str(uuid.uuid4()), {"fields": {"remarks": "y"}})
    assert got == 404
    record = await (
        await client.get(f"/api/v1/records/activity/{r}", headers=device.headers())
    ).json()
    assert record["version"] == 1 and record["fields"] == {"jobdesc": "x"}


async def test_rules_apply_to_the_back_office_and_decisions_are_kept(client: Client) -> None:
    r, rep, device = await created(client, gracetime=10)
    status, body = await patch(client, r, {"fields": {"gracetime": "soon"}})
    assert status == 200
    assert body["fields"]["gracetime"] == 10
    assert [d["field"] for d in body["decisions"]] == ["gracetime"]
    [caught_up] = await device.push(
        "activity", [{"record_id": r, "state_vector": rep.doc.get_state()}]
    )
    rep.apply(caught_up["update"])
    await device.push("activity", [{"record_id": r, "update": rep.set(gracetime=-5)}])
    record = await (
        await client.get(f"/api/v1/records/activity/{r}", headers=device.headers())
    ).json()
    history = record["decision_history"]
    assert [(d["field"], d["by"]) for d in history] == [
        ("gracetime", "office"),
        ("gracetime", "u1"),
    ]
    assert all({"version", "at", "rule", "rejected", "kept", "reason"} <= set(d) for d in history)
