"""helpdesk rules: escalation preserved, isescalated derived, server-authored ticket history."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pycrdt import Array, Doc, Map

from crdt_models import constraints, helpdesk, history, record, rules_common
from crdt_models.constraints import Correction, Origin
from crdt_models.record import NonScalar, RecordState
from tests.test_rules_support import (
    BACKOFFICE,
    DEVICE,
    NOW,
    SERVER,
    by_field,
    comparable,
    ctx,
    doc_of,
    edit,
    entry_dict,
    evaluate,
    merge,
    repaired,
    replica,
    state,
)

MODEL = helpdesk.MODEL
SUPERVISOR_BO = ctx(Origin.BACKOFFICE, roles=["supervisor"], user="sup1")
SUPERVISOR_DEVICE = ctx(roles=["supervisor"])
WHEN = "2024-05-01T12:00:00.000Z"


def entry(
    field: str, old: object, new: object, action: str = "change", who: str = "u1"
) -> dict[str, object]:
    return {"when": WHEN, "who": who, "action": action, "field": field, "from": old, "to": new}


def appended(corrections: list[Correction]) -> list[object]:
    return [c.kept for c in corrections if c.action == "history_append"]


def ticket(**fields: object) -> RecordState:
    return state(fields, has_history=True)


# --- escalation ------------------------------------------------------------------


@pytest.mark.parametrize("context", [DEVICE, SUPERVISOR_DEVICE, BACKOFFICE])
def test_level_never_drops_through_devices_or_plain_back_office(
    context: constraints.Context,
) -> None:
    before = ticket(level=2, isescalated=True)
    fix = by_field(evaluate("helpdesk", before, ticket(level=1, isescalated=True), context))
    assert (fix["level"].rule, fix["level"].kept, fix["level"].rejected) == (
        helpdesk.RULE_LEVEL,
        2,
        1,
    )
    assert list(fix) == ["level"]


def test_clearing_the_level_is_a_drop() -> None:
    before = ticket(level=2, isescalated=True)
    assert by_field(evaluate("helpdesk", before, ticket(isescalated=True)))["level"].kept == 2


def test_a_supervisor_in_the_back_office_lowers_the_level() -> None:
    before = ticket(level=2, isescalated=True)
    got = evaluate("helpdesk", before, ticket(level=0, isescalated=True), SUPERVISOR_BO)
    fix = by_field(got)["isescalated"]
    assert (fix.kept, fix.is_repair) == (False, False)  # derived, not a refusal
    assert appended(got) == [entry("level", 2, 0, who="sup1")]
    assert constraints.decisions(got) == []


def test_devices_raise_the_level_and_isescalated_follows() -> None:
    got = evaluate("helpdesk", ticket(level=0), ticket(level=1))
    fix = by_field(got)["isescalated"]
    assert (fix.kept, fix.is_repair) == (True, False)
    assert appended(got) == [entry("level", 0, 1)]


def test_a_wrong_isescalated_from_a_device_gets_a_decision() -> None:
    got = evaluate(
        "helpdesk", ticket(level=2, isescalated=True), ticket(level=2, isescalated=False)
    )
    [decision] = constraints.decisions(got)
    assert decision == {
        "rule": "helpdesk.isescalated_follows_level",
        "field": "isescalated",
        "rejected": False,
        "kept": True,
        "reason": "isescalated follows level: level 2 means isescalated is true",
    }


def test_an_unescalated_ticket_needs_no_isescalated() -> None:
    assert evaluate("helpdesk", None, ticket(ticketdesc="printer")) == []
    assert evaluate("helpdesk", ticket(level=0), ticket(level=0, isescalated=False)) == []


def test_a_level_drop_with_isescalated_false_is_refused_twice() -> None:
    before = ticket(level=2, isescalated=True)
    got = evaluate("helpdesk", before, ticket(level=0, isescalated=False))
    assert {d["field"] for d in constraints.decisions(got)} == {"level", "isescalated"}
    assert dict(repaired("helpdesk", before, ticket(level=0, isescalated=False)).fields) == dict(
        before.fields
    )
    assert appended(got) == []


# --- history entries -------------------------------------------------------------


def test_a_new_ticket_records_its_initial_values() -> None:
    got = evaluate("helpdesk", None, ticket(status="NEW", priority="HIGH", ticketdesc="x"))
    assert appended(got) == [
        entry("status", None, "NEW", "create"),
        entry("priority", None, "HIGH", "create"),
    ]
    assert all(not c.is_repair for c in got)


def test_every_tracked_change_is_recorded_once_in_field_order() -> None:
    before = ticket(status="NEW", priority="LOW", assignedtopeople="p1", comments="a")
    after = ticket(status="OPEN", priority="HIGH", assignedtogroup=7.0, comments="b")
    assert appended(evaluate("helpdesk", before, after)) == [
        entry("status", "NEW", "OPEN"),
        entry("priority", "LOW", "HIGH"),
        entry("assignedtopeople", "p1", None),
        entry("assignedtogroup", None, 7),
    ]


def test_a_refused_change_leaves_no_entry() -> None:
    got = evaluate("helpdesk", ticket(status="NEW"), ticket(status="LOST"))
    assert appended(got) == []
    assert by_field(got)["status"].kept == "NEW"


def test_history_times_are_utc_with_milliseconds() -> None:
    from datetime import timedelta, timezone

    local = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    got = evaluate("helpdesk", None, ticket(status="NEW"), ctx(now=local, user="who"))
    assert appended(got) == [entry("status", None, "NEW", "create", who="who")]


# --- history protection ----------------------------------------------------------

E1, E2, E3 = entry("status", None, "NEW", "create"), entry("level", 0, 1), entry("level", 1, 2)


def kept_history(old: list[Any], new: list[Any]) -> tuple[Any, ...]:
    before = state(level=2, isescalated=True, history=old)
    after = state(level=2, isescalated=True, history=new)
    got = evaluate("helpdesk", before, after)
    assert all(c.action.startswith("history_") for c in got), got
    return constraints.apply_to_state(after, got).history


@pytest.mark.parametrize(
    "new",
    [
        [E1, E3],  # deleted
        [E1, {"note": 1}, E2, E3],  # inserted
        [E1, {**E2, "to": 5}, E3],  # altered
        [E3, E2, E1],  # reordered (deleted and re-inserted)
        [],  # emptied
        [E1, E2, E3, E3, NonScalar("str")],  # appended a copy and junk
        [{**E1, "extra": True}, NonScalar("array"), E3],
    ],
)
def test_devices_cannot_change_history(new: list[Any]) -> None:
    assert [entry_dict(e) for e in kept_history([E1, E2, E3], new)] == [E1, E2, E3]


def test_true_is_not_one_in_history() -> None:
    old = [entry("status", None, 1, "create")]
    new = [entry("status", None, True, "create")]
    assert [entry_dict(e) for e in kept_history(old, new)] == old


def test_history_decisions_say_what_happened() -> None:
    before = state(history=[E1, E2])
    after = state(history=[{**E1, "to": "X"}, {"note": 1}])
    got = evaluate("helpdesk", before, after)
    kinds = [(c.action, c.index, c.count, c.is_repair) for c in got]
    assert kinds == [
        ("history_remove", 0, 2, False),
        ("history_insert", 0, 1, True),
        ("history_insert", 1, 1, True),
    ]
    decisions = constraints.decisions(got)
    assert decisions[0]["rejected"] == {**E1, "to": "X"} and decisions[0]["kept"] == E1
    assert decisions[0]["field"] == "history" and "altered" in str(decisions[0]["reason"])
    json.dumps(decisions, allow_nan=False)


def test_an_inserted_run_is_one_correction() -> None:
    got = evaluate(
        "helpdesk", state(history=[E1]), state(history=[E1, *[{"n": i} for i in range(9)]])
    )
    [fix] = got
    assert (fix.action, fix.index, fix.count, fix.is_repair) == ("history_remove", 1, 9, True)
    assert len(fix.decision()["rejected"]) == constraints.DECISION_ENTRIES  # type: ignore[arg-type]


def test_junk_the_server_cannot_write_back_is_not_restored() -> None:
    """An old record may hold junk entries; deleting them is not undone (nothing to write)."""
    before = state(history=[E1, NonScalar("str"), {"to": NonScalar("map")}, E2])
    assert kept_history(list(before.history), [E1, E2]) == (E1, E2)


def test_server_origin_and_back_office_cannot_change_history_either() -> None:
    before = state(history=[E1])
    for context in (BACKOFFICE, SERVER):
        got = evaluate("helpdesk", before, state(), context)
        assert [c.action for c in got] == ["history_insert"]


# --- through real docs -----------------------------------------------------------


def history_array(doc: Doc[Any]) -> Array[Any]:
    array: Array[Any] = doc.get(record.HISTORY_ROOT, type=Array)
    return array


def test_tampering_with_history_in_a_doc_is_undone_and_converges() -> None:
    server = doc_of(state(level=1, isescalated=True, history=[E1, E2, E3]), client_id=1000)
    before = record.read_state(server, MODEL)
    device = replica(server, 77)

    def tamper(doc: Doc[Any]) -> None:
        h = history_array(doc)
        del h[0]
        h[0]["to"] = 9  # alter E2 in place
        h.insert(1, Map({"note": "mine"}))
        h.append({"plain": "json"})
        doc.get(record.FIELDS_ROOT, type=Map)["status"] = "OPEN"

    update = edit(device, tamper)
    done = merge(server, "helpdesk", before, update, DEVICE)
    assert done.compensation_updates == 1
    got = comparable(done.repaired)["history"]
    assert got == [E1, E2, E3, entry("status", None, "OPEN")]
    assert comparable(constraints.apply_to_state(done.after, done.corrections)) == comparable(
        done.repaired
    )
    assert evaluate("helpdesk", done.repaired, done.repaired) == []

    assert done.compensation is not None
    device.apply_update(done.compensation)
    assert comparable(record.read_state(device, MODEL)) == comparable(done.repaired)


def test_concurrent_history_appends_and_device_deletes() -> None:
    """The device deletes an entry it saw while the server appends one it has not seen."""
    server = doc_of(state(status="NEW", history=[E1]), client_id=1000)
    before = record.read_state(server, MODEL)
    device = replica(server, 5)
    update = edit(device, lambda d: history_array(d).__delitem__(0))

    bo = constraints.backoffice_edit
    bo(server, MODEL, {"status": "OPEN"})
    first = merge(server, "helpdesk", before, b"\x00\x00", BACKOFFICE)
    second = merge(server, "helpdesk", first.repaired, update, DEVICE)
    got = comparable(second.repaired)["history"]
    assert [e["field"] for e in got] == ["status", "status"] and got[0] == E1


def test_a_flood_of_inserted_entries_is_removed_quickly() -> None:
    server = doc_of(state(level=1, isescalated=True, history=[E1, E2]), client_id=1000)
    before = record.read_state(server, MODEL)
    device = replica(server, 9)

    def flood(doc: Doc[Any]) -> None:
        h = history_array(doc)
        h.extend([{"n": i % 7} for i in range(3_000)])
        h.insert(1, {"n": 1})

    update = edit(device, flood)
    started = time.perf_counter()
    done = merge(server, "helpdesk", before, update, DEVICE)
    assert time.perf_counter() - started < 5
    assert [c.count for c in done.corrections] == [1, 3_000]
    assert len(json.dumps(constraints.decisions(done.corrections))) < 2_000
    assert comparable(done.repaired)["history"] == [E1, E2]


def test_history_entry_shape() -> None:
    made = history.history_entry(ctx(user="x"), "change", "level", 1.0, 2.0)
    assert made == {
        "when": WHEN,
        "who": "x",
        "action": "change",
        "field": "level",
        "from": 1,
        "to": 2,
    }
    assert rules_common.iso_utc(NOW) == WHEN
