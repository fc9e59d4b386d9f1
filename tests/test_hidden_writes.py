"""A forward move hidden by a concurrent write is kept: statuses and escalations.

Yjs resolves two concurrent writes of one key by client id; the loser is deleted as
it arrives and its value is collected. These tests build that case with real pycrdt
docs (and, at the end, through a real server) and check that the rules see the
hidden value: the record never moves back on the phone that moved it forward.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pycrdt import Doc, Map

from crdt_models import record
from crdt_models.constraints import Origin
from crdt_models.record import RecordState
from crdt_models.written import DocPlaces, WrittenValues
from crdt_models.yitems import NOT_SCALAR, ItemPlaces, read_items
from crdt_models.yupdate import inspect_state_vector
from tests.helpers import Api, Replica
from tests.test_rules_support import (
    Merged,
    by_field,
    ctx,
    doc_of,
    edit,
    merge,
    replica,
    state,
)

HIGH, LOW = 900_000, 100  # Yjs keeps the higher client id's value of two concurrent writes


def set_fields(doc: Doc[Any], **values: object) -> bytes:
    return edit(doc, lambda d: d.get(record.FIELDS_ROOT, type=Map).update(values))


def concurrent(base: Doc[Any], first: dict[str, object], second: dict[str, object]) -> list[bytes]:
    """Two phones edit copies of ``base`` offline: the first (higher client id) wins ties."""
    return [set_fields(replica(base, HIGH), **first), set_fields(replica(base, LOW), **second)]


def race(
    name: str, start: RecordState, first: dict[str, object], second: dict[str, object]
) -> tuple[Merged, Merged]:
    """The server merges both phones' edits of a record in ``start``, first then second."""
    base = doc_of(start, client_id=1)
    server = replica(base, 2)
    one_update, two_update = concurrent(base, first, second)
    one = merge(server, name, start, one_update, ctx())
    return one, merge(server, name, one.repaired, two_update, ctx())


# --- reading items ---------------------------------------------------------------


def test_items_carry_their_key_and_the_value_pycrdt_shows() -> None:
    doc = record.new_doc(7)
    update = set_fields(doc, s="hi", n=5, f=2.5, big=2**40, t=True, z=None, nested=[1, 2])
    items = {item.key: item for item in read_items(update)}
    shown = dict(doc.get(record.FIELDS_ROOT, type=Map).items())
    assert {k: items[k].value for k in shown if k != "nested"} == {
        k: v for k, v in shown.items() if k != "nested"
    }
    assert items["nested"].value is NOT_SCALAR
    assert all(
        item.parent_root == record.FIELDS_ROOT and item.client == 7 for item in items.values()
    )


def test_an_overwrite_names_its_origin_and_its_place_is_found_in_the_doc() -> None:
    doc = record.new_doc(7)
    set_fields(doc, jobstatus="ASSIGNED")
    (item,) = read_items(set_fields(doc, jobstatus="INPROGRESS"))
    assert item.parent_root is None and item.origin == (7, 0)
    places = ItemPlaces()
    places.add(doc.get_update())
    assert places.place((item.client, item.clock)) == (record.FIELDS_ROOT, "jobstatus")


def test_a_key_overwritten_five_thousand_times_resolves_without_recursion() -> None:
    doc = record.new_doc(7)
    for i in range(5000):
        set_fields(doc, remarks=f"r{i}")
    places = ItemPlaces()
    places.add(doc.get_update())
    assert places.place((7, 4999)) == (record.FIELDS_ROOT, "remarks")


def test_a_docs_places_are_kept_up_to_date_from_what_it_gained() -> None:
    doc = record.new_doc(7)
    set_fields(doc, jobstatus="ASSIGNED")
    places = DocPlaces()
    assert places.of(doc).place((7, 0)) == (record.FIELDS_ROOT, "jobstatus")
    assert places.of(doc).place((7, 1)) is None  # not written yet
    set_fields(doc, remarks="later")
    set_fields(doc, jobstatus="INPROGRESS")
    index = places.of(doc)
    assert index.place((7, 1)) == (record.FIELDS_ROOT, "remarks")
    assert index.place((7, 2)) == (record.FIELDS_ROOT, "jobstatus")


def test_written_values_include_the_hidden_write_only_once() -> None:
    base = doc_of(state(jobstatus="ASSIGNED"), client_id=1)
    server = replica(base, 2)
    first, second = concurrent(base, {"jobstatus": "INPROGRESS"}, {"jobstatus": "COMPLETED"})
    server.apply_update(first)
    since = inspect_state_vector(server.get_state())
    server.apply_update(second)
    now = inspect_state_vector(server.get_state())
    assert server.get(record.FIELDS_ROOT, type=Map)["jobstatus"] == "INPROGRESS"

    def written(sv_before: dict[int, int]) -> list[object]:
        return WrittenValues(server, [second], sv_before, now).for_field("jobstatus", bool)

    assert written(since) == ["COMPLETED"]
    assert written(now) == []  # a re-sent update writes nothing


# --- the rules -------------------------------------------------------------------


def test_a_completed_task_hidden_by_a_concurrent_inprogress_stays_completed() -> None:
    _, two = race(
        "activity",
        state(jobdesc="fix pump", jobstatus="ASSIGNED"),
        {"jobstatus": "INPROGRESS"},
        {"jobstatus": "COMPLETED"},
    )
    assert two.after.fields["jobstatus"] == "INPROGRESS"  # what Yjs alone leaves
    assert two.repaired.fields["jobstatus"] == "COMPLETED"
    fix = by_field(two.corrections)["jobstatus"]
    assert (fix.rule, fix.rejected, fix.kept, fix.is_repair) == (
        "activity.jobstatus_forward",
        "INPROGRESS",
        "COMPLETED",
        True,
    )
    assert "hidden by a concurrent INPROGRESS" in fix.reason


def test_a_status_of_equal_rank_that_lost_the_tie_stays_lost() -> None:
    _, two = race(
        "activity", state(jobstatus="ASSIGNED"), {"jobstatus": "WORKING"}, {"jobstatus": "STANDBY"}
    )
    assert two.corrections == [] and two.repaired.fields["jobstatus"] == "WORKING"


def test_a_hidden_autoclosed_from_a_device_is_not_brought_back() -> None:
    _, two = race(
        "activity",
        state(jobstatus="INPROGRESS"),
        {"jobstatus": "WORKING"},
        {"jobstatus": "AUTOCLOSED"},
    )
    assert two.repaired.fields["jobstatus"] == "WORKING"
    assert two.compensation is None


def test_hidden_work_start_without_an_approved_permit_is_not_brought_back() -> None:
    _, two = race(
        "work-orders",
        state(workstatus="ASSIGNED", workpermit="PARTIALLY_APPROVED"),
        {"remarks": "x", "workstatus": "ASSIGNED"},
        {"workstatus": "INPROGRESS"},
    )
    assert two.repaired.fields["workstatus"] == "ASSIGNED"


def test_a_permit_declared_required_is_not_lost_to_a_concurrent_not_required() -> None:
    _, two = race(
        "work-orders",
        state(description="valve", workstatus="ASSIGNED"),
        {"workpermit": "NOT_REQUIRED"},
        {"workpermit": "PARTIALLY_APPROVED", "workstatus": "INPROGRESS"},
    )
    assert two.after.fields["workpermit"] == "NOT_REQUIRED"  # what Yjs alone leaves
    assert two.repaired.fields["workpermit"] == "PARTIALLY_APPROVED"
    assert two.repaired.fields["workstatus"] == "ASSIGNED"


def test_a_hidden_escalation_is_kept_with_its_history() -> None:
    _, two = race(
        "helpdesk",
        state(ticketdesc="printer", status="OPEN", level=0, isescalated=False),
        {"level": 1, "isescalated": True},
        {"level": 2, "isescalated": True},
    )
    assert two.after.fields["level"] == 1
    assert two.repaired.fields["level"] == 2 and two.repaired.fields["isescalated"] is True
    entries = [e for e in two.repaired.history if isinstance(e, Mapping)]
    assert [(e["from"], e["to"]) for e in entries if e["field"] == "level"] == [
        (0, 1),
        (1, 2),
    ]
    assert "escalations are never lost" in by_field(two.corrections)["level"].reason


def test_a_hidden_lower_escalation_changes_nothing() -> None:
    _, two = race(
        "helpdesk",
        state(ticketdesc="printer", level=0, isescalated=False),
        {"level": 3},
        {"level": 1},
    )
    assert two.repaired.fields["level"] == 3 and two.compensation is None


def test_the_back_office_path_has_nothing_hidden() -> None:
    assert ctx(Origin.BACKOFFICE).written is None


# --- through a real server -------------------------------------------------------


async def test_phones_that_raced_on_a_status_all_end_completed(api: Callable[..., Api]) -> None:
    first, second = api(device="phone-high"), api(device="phone-low")
    rid = str(uuid.uuid4())
    creator = Replica()
    create = creator.set(jobdesc="fix pump", jobstatus="ASSIGNED")
    await first.push("activity", [{"record_id": rid, "bu": "bu1", "update": create}])
    high, low = Replica(2**40 + 17), Replica(31)
    for phone in (high, low):
        phone.apply(create)
    await first.push("activity", [{"record_id": rid, "update": high.set(jobstatus="INPROGRESS")}])
    (result,) = await second.push(
        "activity",
        [
            {
                "record_id": rid,
                "update": low.set(jobstatus="COMPLETED"),
                "state_vector": low.doc.get_state(),
            }
        ],
    )
    assert [(d["rule"], d["rejected"], d["kept"]) for d in result["decisions"]] == [
        ("activity.jobstatus_forward", "INPROGRESS", "COMPLETED")
    ]
    low.apply(result["update"])
    changes, _ = await first.pull_all("activity")
    for change in changes:
        high.apply(change["update"])
    assert low.state()["jobstatus"] == high.state()["jobstatus"] == "COMPLETED"


async def pushed_in_reverse(
    phone: Api, domain: str, create: Mapping[str, object], *writes: Mapping[str, object]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Create a record, make `writes` on one replica (an update each) and push them in
    reverse order in one request: the later ones wait for the first, and all integrate in
    one merge. The results (the first pending, the last merged) and the record's fields."""
    rid = str(uuid.uuid4())
    replica_ = Replica()
    await phone.push(domain, [{"record_id": rid, "bu": "bu1", "update": replica_.set(**create)}])
    updates = [replica_.set(**values) for values in writes]
    results = await phone.push(
        domain, [{"record_id": rid, "update": update} for update in reversed(updates)]
    )
    assert [r["status"] for r in results] == ["pending"] * (len(writes) - 1) + ["merged"]
    path = f"/api/v1/records/{domain}/{rid}"
    record = await (await phone.client.get(path, headers=phone.headers())).json()
    return results, record["fields"]


async def test_a_step_back_delivered_before_the_step_is_refused(api: Callable[..., Api]) -> None:
    """COMPLETED then INPROGRESS on one phone, delivered in reverse: the second waits
    for the first, both integrate in one merge, and COMPLETED stays as it would have
    if they had arrived in order."""
    _, fields = await pushed_in_reverse(
        api(device="phone"),
        "activity",
        {"jobdesc": "fix pump", "jobstatus": "ASSIGNED"},
        {"jobstatus": "COMPLETED"},
        {"jobstatus": "INPROGRESS"},
    )
    assert fields["jobstatus"] == "COMPLETED"


async def test_autoclosed_delivered_before_the_status_it_replaced_falls_back_to_that_status(
    api: Callable[..., Api],
) -> None:
    """ASSIGNED then AUTOCLOSED on one phone, delivered in reverse (found by the
    convergence property test): both integrate in one merge, AUTOCLOSED is refused, and
    ASSIGNED stays as it would have if they had arrived in order, not no status at all."""
    results, fields = await pushed_in_reverse(
        api(device="phone"),
        "activity",
        {"jobdesc": "fix pump"},
        {"jobstatus": "ASSIGNED"},
        {"jobstatus": "AUTOCLOSED"},
    )
    [decision] = results[1]["decisions"]
    assert (decision["rejected"], decision["kept"]) == ("AUTOCLOSED", "ASSIGNED")
    assert fields["jobstatus"] == "ASSIGNED"


def test_autoclosed_never_falls_back_to_a_step_back_written_with_it() -> None:
    """INPROGRESS before; the phone wrote ASSIGNED then AUTOCLOSED in one update: ASSIGNED
    would be a step back, so INPROGRESS stays."""
    start = state(jobdesc="x", jobstatus="INPROGRESS")
    server = replica(doc_of(start, client_id=1), 2)
    phone = replica(server, LOW)
    since = phone.get_state()
    set_fields(phone, jobstatus="ASSIGNED")
    set_fields(phone, jobstatus="AUTOCLOSED")
    merged = merge(server, "activity", start, phone.get_update(since), ctx())
    assert merged.repaired.fields["jobstatus"] == "INPROGRESS"


async def test_a_permit_declared_before_a_refused_approval_stays_required(
    api: Callable[..., Api],
) -> None:
    """A phone without the approver role declares a permit required, then sets it APPROVED
    and starts the work; delivered in reverse, both merge at once. Delivered in order, the
    approval and the start would have been refused with the permit still required: so they
    are now, and the permit does not vanish (which would have let the work start)."""
    _, fields = await pushed_in_reverse(
        api(device="phone"),
        "work-orders",
        {"description": "replace valve", "workstatus": "ASSIGNED"},
        {"workpermit": "PARTIALLY_APPROVED"},
        {"workpermit": "APPROVED", "workstatus": "INPROGRESS"},
    )
    assert (fields["workpermit"], fields["workstatus"]) == ("PARTIALLY_APPROVED", "ASSIGNED")


async def test_a_punch_in_edited_into_the_future_keeps_the_punch_in_written_before(
    api: Callable[..., Api],
) -> None:
    """Punch-in, then an edit to a time far in the future, delivered in reverse: the
    punch-in stays as it would have if they had arrived in order, not no punch-in."""
    _, fields = await pushed_in_reverse(
        api(device="phone"),
        "attendance",
        {"people": "p1"},
        {"punchintime": "2024-05-01T09:00:00.000Z"},
        {"punchintime": "2999-01-01T09:00:00.000Z"},
    )
    assert fields["punchintime"] == "2024-05-01T09:00:00.000Z"
