"""activity rules: the jobstatus machine, AUTOCLOSED by the server only, time order, position."""

from __future__ import annotations

import pytest

from crdt_models import activity
from crdt_models.constraints import Context, Origin
from tests.test_rules_support import (
    ACTIVITY_NEXT,
    BACKOFFICE,
    DEVICE,
    SERVER,
    at,
    by_field,
    ctx,
    evaluate,
    merged_at_once,
    repaired,
    state,
)

STATUSES = sorted(activity.JOBSTATUSES)
FORWARD = [(old, new) for old in STATUSES for new in sorted(ACTIVITY_NEXT[old]) if old != new]
BACKWARD = [(old, new) for old in STATUSES for new in STATUSES if new not in ACTIVITY_NEXT[old]]


@pytest.mark.parametrize(("old", "new"), [p for p in FORWARD if p[1] != "AUTOCLOSED"])
def test_forward_moves_are_kept(old: str, new: str) -> None:
    assert evaluate("activity", state(jobstatus=old), state(jobstatus=new)) == []


@pytest.mark.parametrize(("old", "new"), [p for p in BACKWARD if p[1] != "AUTOCLOSED"])
def test_backward_moves_and_leaving_a_final_status_are_repaired(old: str, new: str) -> None:
    fix = by_field(evaluate("activity", state(jobstatus=old), state(jobstatus=new)))["jobstatus"]
    assert (fix.rule, fix.rejected, fix.kept, fix.action) == (
        activity.RULE_FLOW,
        new,
        old,
        "set",
    )
    assert fix.is_repair and old in fix.reason and new in fix.reason


def test_a_technician_pauses_and_resumes() -> None:
    for old, new in [("INPROGRESS", "STANDBY"), ("STANDBY", "WORKING"), ("WORKING", "INPROGRESS")]:
        assert evaluate("activity", state(jobstatus=old), state(jobstatus=new)) == []


def test_an_offline_device_may_jump_forward() -> None:
    assert evaluate("activity", state(jobstatus="ASSIGNED"), state(jobstatus="COMPLETED")) == []


def test_clearing_a_status_is_refused() -> None:
    for after in (state(), state(jobstatus=None)):
        fix = by_field(evaluate("activity", state(jobstatus="INPROGRESS"), after))["jobstatus"]
        assert (fix.kept, fix.action) == ("INPROGRESS", "set")
        assert "cleared" in fix.reason


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "AUTOCLOSED"])
def test_a_new_record_may_start_in_any_status_but_autoclosed(status: str) -> None:
    assert evaluate("activity", None, state(jobstatus=status)) == []
    assert evaluate("activity", state(), state(jobstatus=status)) == []


@pytest.mark.parametrize("context", [DEVICE, BACKOFFICE, ctx(roles=["supervisor", "approver"])])
def test_autoclosed_is_refused_to_devices_and_back_office(context: Context) -> None:
    fix = by_field(
        evaluate("activity", state(jobstatus="INPROGRESS"), state(jobstatus="AUTOCLOSED"), context)
    )["jobstatus"]
    assert (fix.rule, fix.kept) == (activity.RULE_AUTOCLOSED, "INPROGRESS")
    new = evaluate("activity", None, state(jobstatus="AUTOCLOSED"), context)
    assert [(c.rule, c.action) for c in new] == [(activity.RULE_AUTOCLOSED, "delete")]


def test_the_server_autocloses_open_tasks_but_not_final_ones() -> None:
    for old in ("ASSIGNED", "STANDBY", "PARTIALLYCOMPLETED"):
        assert (
            evaluate("activity", state(jobstatus=old), state(jobstatus="AUTOCLOSED"), SERVER) == []
        )
    fix = by_field(
        evaluate("activity", state(jobstatus="COMPLETED"), state(jobstatus="AUTOCLOSED"), SERVER)
    )["jobstatus"]
    assert (fix.rule, fix.kept) == (activity.RULE_FLOW, "COMPLETED")


def test_autoclosed_is_final_even_for_the_back_office() -> None:
    fix = by_field(
        evaluate("activity", state(jobstatus="AUTOCLOSED"), state(jobstatus="ASSIGNED"), BACKOFFICE)
    )["jobstatus"]
    assert fix.kept == "AUTOCLOSED" and "final" in fix.reason


def test_an_unchanged_status_is_never_judged() -> None:
    s = state(jobstatus="COMPLETED", jobdesc="x")
    assert evaluate("activity", s, state(jobstatus="COMPLETED", jobdesc="y")) == []


def test_endtime_before_starttime_restores_endtime() -> None:
    before = state(starttime=at(-60), endtime=at(-30))
    fix = by_field(evaluate("activity", before, state(starttime=at(-60), endtime=at(-90))))
    assert list(fix) == ["endtime"]
    assert (fix["endtime"].rule, fix["endtime"].kept) == (activity.RULE_END, at(-30))


def test_a_new_endtime_before_starttime_is_removed() -> None:
    fix = by_field(evaluate("activity", None, state(starttime=at(-60), endtime=at(-90))))
    assert (fix["endtime"].action, list(fix)) == ("delete", ["endtime"])


def test_a_later_starttime_that_passes_endtime_is_refused() -> None:
    before = state(starttime=at(-60), endtime=at(-30))
    fix = by_field(evaluate("activity", before, state(starttime=at(-10), endtime=at(-30))))
    assert list(fix) == ["starttime"] and fix["starttime"].kept == at(-60)


def test_both_times_moved_out_of_order_go_back_as_a_pair() -> None:
    before = state(starttime=at(-60), endtime=at(-30))
    after = state(starttime=at(-10), endtime=at(-20))
    assert dict(repaired("activity", before, after).fields) == dict(before.fields)


def test_equal_start_and_end_times_are_fine() -> None:
    assert evaluate("activity", None, state(starttime=at(-5), endtime=at(-5))) == []


def test_expiry_before_plan_is_refused() -> None:
    before = state(plandatetime=at(60), expirydatetime=at(120))
    fix = by_field(evaluate("activity", before, state(plandatetime=at(60), expirydatetime=at(30))))
    assert (fix["expirydatetime"].rule, fix["expirydatetime"].kept) == (
        activity.RULE_EXPIRY,
        at(120),
    )


def test_times_compare_as_instants_not_text() -> None:
    start = "2024-05-01T10:00:00+05:30"  # 04:30Z
    assert evaluate("activity", None, state(starttime=start, endtime="2024-05-01T05:00:00Z")) == []


def test_positions_off_earth_are_refused_as_a_pair() -> None:
    before = state(lat=12.5, lon=77.0)
    fix = by_field(evaluate("activity", before, state(lat=95.0, lon=78.0)))
    assert {k: (c.rule, c.kept) for k, c in fix.items()} == {
        "lat": (activity.RULE_POSITION, 12.5),
        "lon": (activity.RULE_POSITION, 77.0),
    }
    assert "between -90 and 90" in fix["lat"].reason


def test_activity_positions_have_no_geofence() -> None:
    assert evaluate("activity", None, state(lat=-33.9, lon=151.2), ctx(Origin.DEVICE)) == []


def test_a_repair_writes_the_decision_format() -> None:
    fix = evaluate("activity", state(jobstatus="COMPLETED"), state(jobstatus="ASSIGNED"))[0]
    assert fix.decision() == {
        "rule": "activity.jobstatus_forward",
        "field": "jobstatus",
        "rejected": "ASSIGNED",
        "kept": "COMPLETED",
        "reason": "jobstatus COMPLETED is final; it cannot change to ASSIGNED",
    }


def test_an_end_before_the_start_falls_back_to_the_end_the_same_merge_wrote_before_it() -> None:
    """endtime set, then edited to before starttime, merged at once: the first endtime
    stays (delivered in order it would have), the task does not lose its end."""
    before = state(jobdesc="x", starttime=at(-60))
    writes = [{"endtime": at(-10)}, {"endtime": at(-100)}]
    done = merged_at_once("activity", before, writes, DEVICE)
    fix = by_field(done.corrections)["endtime"]
    assert (fix.rule, fix.rejected, fix.kept) == (activity.RULE_END, at(-100), at(-10))
