"""attendance rules: server wins (owned fields, back-office locks), GPS sanity, punch times."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pycrdt import Map

from crdt_models import attendance as att
from crdt_models import constraints, record
from crdt_models.constraints import Origin, RuleSettings
from crdt_models.rules_common import RULE_META, RULE_TYPE
from tests.test_rules_support import (
    BACKOFFICE,
    BU,
    DEVICE,
    INSIDE,
    OUTSIDE,
    SERVER,
    SITE,
    at,
    by_field,
    ctx,
    doc_of,
    edit,
    evaluate,
    merge,
    merged_at_once,
    replica,
    state,
)

MODEL = att.MODEL
LOCKED = state(punchintime=at(-60), remarks="bus", meta={"lock.punchintime": "bo1"})


# --- server wins -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"), [("verified", True), ("verifiedby", "me"), ("approval", "OK")]
)
def test_devices_never_change_server_owned_fields(name: str, value: object) -> None:
    fix = by_field(evaluate("attendance", state(), state({name: value})))[name]
    assert (fix.rule, fix.action) == (att.RULE_SERVER_OWNED, "delete")
    before = state({name: value})
    fix = by_field(evaluate("attendance", before, state()))[name]
    assert (fix.action, fix.kept) == ("set", value)
    assert by_field(evaluate("attendance", None, state({name: value})))[name].action == "delete"


def test_back_office_and_server_set_server_owned_fields() -> None:
    after = state(verified=True, verifiedby="bo1", approval="OK")
    for context in (BACKOFFICE, SERVER):
        got = evaluate("attendance", state(), after, context)
        assert [c for c in got if c.action in ("set", "delete")] == []


def test_a_back_office_change_locks_the_field() -> None:
    before = state(punchintime=at(-60), remarks="bus")
    after = state(punchintime=at(-50), remarks="bus", verified=True)
    got = evaluate("attendance", before, after, BACKOFFICE)
    assert [(c.action, c.field, c.kept, c.is_repair) for c in got] == [
        ("meta_set", "lock.punchintime", "bo1", False)
    ]
    assert constraints.decisions(got) == []


def test_a_device_cannot_overwrite_a_locked_field() -> None:
    got = evaluate(
        "attendance", LOCKED, state(punchintime=at(-55), remarks="walked", meta=LOCKED.meta)
    )
    fix = by_field(got)
    assert list(fix) == ["punchintime"]
    assert (fix["punchintime"].rule, fix["punchintime"].kept) == (att.RULE_LOCKED, at(-60))
    assert "corrected by the back office (bo1)" in fix["punchintime"].reason
    cleared = evaluate("attendance", LOCKED, state(remarks="bus", meta=LOCKED.meta))
    assert by_field(cleared)["punchintime"].kept == at(-60)


def test_the_back_office_changes_a_locked_field_again_and_takes_the_lock() -> None:
    other = ctx(Origin.BACKOFFICE, user="bo2")
    got = evaluate(
        "attendance", LOCKED, state(punchintime=at(-40), remarks="bus", meta=LOCKED.meta), other
    )
    assert [(c.action, c.field, c.kept) for c in got] == [("meta_set", "lock.punchintime", "bo2")]


def test_a_repaired_back_office_change_locks_nothing() -> None:
    before = state(punchintime=at(-60))
    got = evaluate("attendance", before, state(punchintime=at(60)), BACKOFFICE)
    assert [(c.rule, c.action) for c in got] == [(att.RULE_FUTURE, "set")]


def test_devices_cannot_touch_meta() -> None:
    after = state(punchintime=at(-60), remarks="bus", meta={"lock.remarks": "me"})
    got = evaluate("attendance", LOCKED, after)
    assert {(c.rule, c.action, c.field) for c in got} == {
        (RULE_META, "meta_set", "lock.punchintime"),
        (RULE_META, "meta_delete", "lock.remarks"),
    }
    assert {d["field"] for d in constraints.decisions(got)} == {
        "meta.lock.punchintime",
        "meta.lock.remarks",
    }


# --- GPS -------------------------------------------------------------------------


def test_punches_inside_the_geofence_are_kept() -> None:
    after = state(punchintime=at(-1), lat_in=INSIDE[0], lon_in=INSIDE[1], accuracy=10)
    assert evaluate("attendance", None, after) == []


def test_punches_outside_the_geofence_lose_the_position_but_keep_the_time() -> None:
    before = state(lat_in=INSIDE[0], lon_in=INSIDE[1], punchintime=at(-30))
    after = state(lat_in=OUTSIDE[0], lon_in=OUTSIDE[1], punchintime=at(-1))
    got = by_field(evaluate("attendance", before, after))
    assert {k: (c.rule, c.kept) for k, c in got.items()} == {
        "lat_in": (att.RULE_POSITION, INSIDE[0]),
        "lon_in": (att.RULE_POSITION, INSIDE[1]),
    }
    assert "m from the site of bu bu1; it must be within 500 m" in got["lat_in"].reason


def test_no_geofence_for_a_bu_without_one_or_without_a_bu() -> None:
    after = state(lat_out=OUTSIDE[0], lon_out=OUTSIDE[1])
    assert evaluate("attendance", None, after, ctx(bu="bu2")) == []
    assert evaluate("attendance", None, after, ctx(bu=None)) == []
    assert evaluate("attendance", None, after, ctx(settings=RuleSettings())) == []


def test_the_geofence_applies_to_the_back_office_too() -> None:
    got = evaluate("attendance", state(), state(lat_out=OUTSIDE[0], lon_out=OUTSIDE[1]), BACKOFFICE)
    assert {(c.field, c.action) for c in got} == {("lat_out", "delete"), ("lon_out", "delete")}


@pytest.mark.parametrize(
    ("lat", "lon"), [(90.5, 10.0), (-91.0, 10.0), (10.0, 180.5), (10.0, -181.0)]
)
def test_coordinates_off_earth_are_refused(lat: float, lon: float) -> None:
    got = by_field(evaluate("attendance", None, state(lat_in=lat, lon_in=lon), ctx(bu=None)))
    assert set(got) == {"lat_in", "lon_in"}


def test_a_half_new_position_is_judged_with_its_other_half() -> None:
    before = state(lat_in=INSIDE[0], lon_in=INSIDE[1])
    after = state(lat_in=OUTSIDE[0], lon_in=INSIDE[1])
    got = by_field(evaluate("attendance", before, after))
    assert list(got) == ["lat_in"] and got["lat_in"].kept == INSIDE[0]


def test_accuracy_limits() -> None:
    assert evaluate("attendance", None, state(accuracy=50)) == []
    fix = by_field(evaluate("attendance", state(accuracy=5), state(accuracy=50.5)))["accuracy"]
    assert (fix.rule, fix.kept) == (att.RULE_ACCURACY, 5)
    assert "within 50 m" in fix.reason
    negative = by_field(evaluate("attendance", None, state(accuracy=-1)))["accuracy"]
    assert negative.rule == RULE_TYPE


def test_an_unchanged_position_is_not_judged_again() -> None:
    """A geofence added (or moved) later does not rewrite old punches."""
    old = state(lat_in=OUTSIDE[0], lon_in=OUTSIDE[1], accuracy=90, remarks="a")
    new = state(lat_in=OUTSIDE[0], lon_in=OUTSIDE[1], accuracy=90, remarks="b")
    assert evaluate("attendance", old, new) == []


# --- punch times -----------------------------------------------------------------


def test_punch_times_may_be_a_little_ahead_of_the_server() -> None:
    assert evaluate("attendance", None, state(punchintime=at(4.9))) == []
    fix = by_field(evaluate("attendance", None, state(punchintime=at(5.1))))["punchintime"]
    assert (fix.rule, fix.action) == (att.RULE_FUTURE, "delete")
    assert "in the future" in fix.reason and "5 minutes of clock skew" in fix.reason


def test_clock_skew_is_a_setting() -> None:
    strict = ctx(settings=RuleSettings(clock_skew=timedelta(0)))
    assert by_field(evaluate("attendance", None, state(punchouttime=at(0.5)), strict))
    loose = ctx(settings=RuleSettings(clock_skew=timedelta(hours=1)))
    assert evaluate("attendance", None, state(punchouttime=at(30)), loose) == []


def test_punch_out_must_be_after_punch_in() -> None:
    before = state(punchintime=at(-60))
    for out in (at(-60), at(-90)):
        fix = by_field(evaluate("attendance", before, state(punchintime=at(-60), punchouttime=out)))
        assert (fix["punchouttime"].rule, fix["punchouttime"].action) == (att.RULE_ORDER, "delete")
    assert evaluate("attendance", before, state(punchintime=at(-60), punchouttime=at(-59))) == []


def test_a_device_punch_out_before_a_locked_punch_in_is_refused_alone() -> None:
    after = state(punchintime=at(-10), punchouttime=at(-20), remarks="bus", meta=LOCKED.meta)
    got = by_field(evaluate("attendance", LOCKED, after))
    assert {k: c.rule for k, c in got.items()} == {
        "punchintime": att.RULE_LOCKED,
    }
    assert (
        evaluate(
            "attendance",
            LOCKED,
            state({**after.fields, "punchintime": at(-60)}, meta=LOCKED.meta),
        )
        == []
    )


# --- through real docs -----------------------------------------------------------


def test_back_office_correction_then_a_late_device_update() -> None:
    """The device's offline value reaches the server after the back office's correction.

    Whichever write Yjs lets win (client ids decide), the server ends with the back
    office's value, and the device receives it.
    """
    for device_client in (5, 50_000):
        server = doc_of(state(people="p1", punchintime=at(-60)), client_id=1000)
        before = record.read_state(server, MODEL)
        device = replica(server, device_client)
        late = edit(device, lambda d: d.get("fields", type=Map).__setitem__("punchintime", at(-45)))

        constraints.backoffice_edit(server, MODEL, {"punchintime": at(-58)})
        first = merge(server, "attendance", before, b"\x00\x00", BACKOFFICE)
        assert dict(first.repaired.meta) == {"lock.punchintime": "bo1"}
        assert record.materialize(first.repaired)["meta"] == {"lock.punchintime": "bo1"}

        second = merge(server, "attendance", first.repaired, late, DEVICE)
        assert second.repaired.fields["punchintime"] == at(-58)
        decisions = constraints.decisions(second.corrections)
        expected = [att.RULE_LOCKED] if second.after.fields["punchintime"] != at(-58) else []
        assert [d["rule"] for d in decisions] == expected

        device.apply_update(server.get_update(device.get_state()))
        assert record.read_state(device, MODEL) == record.read_state(server, MODEL)


def test_the_site_geofence_is_what_the_context_says() -> None:
    assert ctx().geofence == SITE and ctx(bu="x").geofence is None
    assert ctx(bu=BU, settings=RuleSettings()).geofence is None


# --- several updates of one phone in one merge ------------------------------------


def test_a_refused_punch_time_falls_back_to_the_one_the_same_merge_wrote_before_it() -> None:
    """Punch-in, then an edit to a time in the future, merged at once: delivered in order
    the first would have stood, so the record keeps it rather than losing its punch-in."""
    done = merged_at_once(
        "attendance",
        state(people="p1"),
        [{"punchintime": at(-60)}, {"punchintime": at(60)}],
        DEVICE,
    )
    assert done.repaired.fields.get("punchintime") == at(-60)
    fix = by_field(done.corrections)["punchintime"]
    assert (fix.rule, fix.rejected, fix.kept) == (att.RULE_FUTURE, at(60), at(-60))


def test_a_refused_punch_out_falls_back_to_the_one_the_same_merge_wrote_before_it() -> None:
    before = state(people="p1", punchintime=at(-120))
    writes = [{"punchouttime": at(-10)}, {"punchouttime": at(-200)}]
    done = merged_at_once("attendance", before, writes, DEVICE)
    assert done.repaired.fields.get("punchouttime") == at(-10)
    assert by_field(done.corrections)["punchouttime"].rule == att.RULE_ORDER


def test_a_punch_out_never_falls_back_to_a_time_in_the_future() -> None:
    before = state(people="p1", punchintime=at(-120))
    writes = [{"punchouttime": at(60)}, {"punchouttime": at(-200)}]
    done = merged_at_once("attendance", before, writes, DEVICE)
    assert "punchouttime" not in done.repaired.fields


def test_a_refused_accuracy_falls_back_to_the_one_the_same_merge_wrote_before_it() -> None:
    """Punch-in with a good fix, punch-out with a coarse one, merged at once: the punch-in's
    accuracy stays, as it would have had they arrived one at a time."""
    writes = [{"punchintime": at(-60), "accuracy": 10}, {"punchouttime": at(-5), "accuracy": 500}]
    done = merged_at_once("attendance", state(people="p1"), writes, DEVICE)
    assert done.repaired.fields.get("accuracy") == 10
    assert done.repaired.fields.get("punchouttime") == at(-5)
