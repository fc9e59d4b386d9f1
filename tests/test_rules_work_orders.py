"""work-orders rules: the workflow, permits decided by approvers, no start without a permit."""

from __future__ import annotations

import pytest

from crdt_models import work_orders as wo
from crdt_models.constraints import Origin
from tests.test_rules_support import (
    BACKOFFICE,
    DEVICE,
    SERVER,
    WORK_NEXT,
    at,
    by_field,
    ctx,
    evaluate,
    merged_at_once,
    repaired,
    state,
)

STATUSES = sorted(wo.WORKSTATUSES)
PERMITS = sorted(wo.WORKPERMITS)
APPROVER_DEVICE = ctx(roles=["approver"])
APPROVER_BACKOFFICE = ctx(Origin.BACKOFFICE, roles=["approver", "backoffice"], user="bo1")


@pytest.mark.parametrize(
    ("old", "new"), [(o, n) for o in STATUSES for n in STATUSES if n in WORK_NEXT[o] and o != n]
)
def test_workflow_moves_are_kept(old: str, new: str) -> None:
    assert evaluate("work-orders", state(workstatus=old), state(workstatus=new)) == []


@pytest.mark.parametrize(
    ("old", "new"), [(o, n) for o in STATUSES for n in STATUSES if n not in WORK_NEXT[o]]
)
def test_workflow_violations_go_back(old: str, new: str) -> None:
    for context in (DEVICE, BACKOFFICE, APPROVER_BACKOFFICE):
        got = evaluate("work-orders", state(workstatus=old), state(workstatus=new), context)
        fix = by_field(got)["workstatus"]
        assert (fix.rule, fix.kept, fix.rejected) == (wo.RULE_FLOW, old, new)


def test_cancelled_from_any_open_state_but_not_from_completed() -> None:
    for old in ("ASSIGNED", "INPROGRESS"):
        assert evaluate("work-orders", state(workstatus=old), state(workstatus="CANCELLED")) == []
    got = evaluate("work-orders", state(workstatus="COMPLETED"), state(workstatus="CANCELLED"))
    assert by_field(got)["workstatus"].kept == "COMPLETED"


@pytest.mark.parametrize("new", ["APPROVED", "REJECTED"])
def test_only_an_approver_decides_a_permit(new: str) -> None:
    before = state(workpermit="PARTIALLY_APPROVED")
    after = state(workpermit=new)
    for context in (DEVICE, BACKOFFICE, ctx(roles=["supervisor", "backoffice"])):
        fix = by_field(evaluate("work-orders", before, after, context))["workpermit"]
        assert (fix.rule, fix.kept) == (wo.RULE_APPROVER, "PARTIALLY_APPROVED")
        assert "approver" in fix.reason
    for context in (APPROVER_DEVICE, APPROVER_BACKOFFICE, SERVER):
        assert evaluate("work-orders", before, after, context) == []


def test_a_forged_approval_on_a_new_record_is_removed() -> None:
    got = evaluate("work-orders", None, state(workpermit="APPROVED", description="x"))
    assert [(c.field, c.action) for c in got] == [("workpermit", "delete")]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("APPROVED", "PARTIALLY_APPROVED"),
        ("REJECTED", "NOT_REQUIRED"),
        ("REJECTED", None),
        ("PARTIALLY_APPROVED", "NOT_REQUIRED"),
        ("PARTIALLY_APPROVED", None),
    ],
)
def test_a_decided_or_required_permit_is_not_undone_by_others(old: str, new: str | None) -> None:
    fix = by_field(evaluate("work-orders", state(workpermit=old), state(workpermit=new)))
    assert fix["workpermit"].kept == old
    assert (
        evaluate("work-orders", state(workpermit=old), state(workpermit=new), APPROVER_DEVICE) == []
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [(None, "NOT_REQUIRED"), (None, "PARTIALLY_APPROVED"), ("NOT_REQUIRED", "PARTIALLY_APPROVED")],
)
def test_anyone_may_declare_a_permit_required(old: str | None, new: str) -> None:
    before = state() if old is None else state(workpermit=old)
    assert evaluate("work-orders", before, state(workpermit=new)) == []


@pytest.mark.parametrize("permit", ["REJECTED", "PARTIALLY_APPROVED"])
@pytest.mark.parametrize("new", ["INPROGRESS", "COMPLETED"])
def test_work_does_not_start_without_its_permit(permit: str, new: str) -> None:
    before = state(workstatus="ASSIGNED", workpermit=permit)
    after = state(workstatus=new, workpermit=permit)
    for context in (DEVICE, APPROVER_DEVICE, BACKOFFICE, SERVER):
        fix = by_field(evaluate("work-orders", before, after, context))["workstatus"]
        assert (fix.rule, fix.kept, fix.rejected) == (wo.RULE_PERMIT, "ASSIGNED", new)
        assert permit in fix.reason


@pytest.mark.parametrize("permit", [None, "NOT_REQUIRED", "APPROVED"])
def test_work_starts_with_an_approved_or_no_permit(permit: str | None) -> None:
    before = state(workstatus="ASSIGNED", workpermit=permit)
    assert evaluate("work-orders", before, state(workstatus="INPROGRESS", workpermit=permit)) == []


def test_a_new_record_created_started_without_permit_waits_assigned() -> None:
    for before in (None, state(), state(workstatus=None)):
        after = state(workstatus="INPROGRESS", workpermit="PARTIALLY_APPROVED")
        fix = by_field(evaluate("work-orders", before, after))["workstatus"]
        assert (fix.action, fix.kept) == ("set", "ASSIGNED")


def test_approval_and_start_in_one_merge_by_an_approver() -> None:
    before = state(workstatus="ASSIGNED", workpermit="PARTIALLY_APPROVED")
    after = state(workstatus="INPROGRESS", workpermit="APPROVED")
    assert evaluate("work-orders", before, after, APPROVER_DEVICE) == []
    fixed = repaired("work-orders", before, after, DEVICE)
    assert dict(fixed.fields) == dict(before.fields)


def test_a_permit_withdrawn_after_the_start_does_not_stop_the_work() -> None:
    before = state(workstatus="INPROGRESS", workpermit="APPROVED")
    after = state(workstatus="INPROGRESS", workpermit="REJECTED")
    assert evaluate("work-orders", before, after, APPROVER_BACKOFFICE) == []


def test_waiving_a_permit_to_start_is_refused_as_a_whole() -> None:
    before = state(workstatus="ASSIGNED", workpermit="REJECTED")
    after = state(workstatus="INPROGRESS", workpermit="NOT_REQUIRED")
    got = by_field(evaluate("work-orders", before, after))
    assert {k: c.kept for k, c in got.items()} == {
        "workpermit": "REJECTED",
        "workstatus": "ASSIGNED",
    }


def test_expiry_and_position_checks() -> None:
    after = state(plandatetime=at(60), expirydatetime=at(0), lat=10.0, lon=181.0)
    got = by_field(evaluate("work-orders", None, after))
    assert {k: (c.rule, c.action) for k, c in got.items()} == {
        "expirydatetime": (wo.RULE_EXPIRY, "delete"),
        "lat": (wo.RULE_POSITION, "delete"),
        "lon": (wo.RULE_POSITION, "delete"),
    }


def test_decision_for_a_refused_start() -> None:
    before = state(workstatus="ASSIGNED", workpermit="REJECTED")
    after = state(workstatus="INPROGRESS", workpermit="REJECTED")
    [fix] = evaluate("work-orders", before, after, DEVICE)
    assert fix.decision() == {
        "rule": "work-orders.permit_before_start",
        "field": "workstatus",
        "rejected": "INPROGRESS",
        "kept": "ASSIGNED",
        "reason": "work cannot start (INPROGRESS) while its permit is REJECTED, not APPROVED",
    }


# --- several updates of one phone in one merge ------------------------------------


@pytest.mark.parametrize(
    ("permit_before", "then"),
    [(None, "APPROVED"), ("NOT_REQUIRED", "NOT_REQUIRED")],
    ids=["approved", "waived"],
)
def test_a_permit_declared_then_approved_or_waived_by_a_non_approver_stays_required(
    permit_before: str | None, then: str
) -> None:
    """The phone declared the permit required, then set it APPROVED (or NOT_REQUIRED)
    and started: delivered in order that is refused and PARTIALLY_APPROVED stays, so the
    start is refused too. Merged at once, the permit must not fall back to none (and let
    the work start)."""
    permit = {} if permit_before is None else {"workpermit": permit_before}
    before = state({"description": "x", "workstatus": "ASSIGNED", **permit})
    writes = [
        {"workpermit": "PARTIALLY_APPROVED"},
        {"workpermit": then, "workstatus": "INPROGRESS"},
    ]
    done = merged_at_once("work-orders", before, writes, DEVICE)
    assert done.repaired.fields["workpermit"] == "PARTIALLY_APPROVED"
    assert done.repaired.fields["workstatus"] == "ASSIGNED"
    fix = by_field(done.corrections)["workpermit"]
    assert (fix.rejected, fix.kept) == (then, "PARTIALLY_APPROVED")
    if then == "APPROVED":
        assert fix.rule == wo.RULE_APPROVER


def test_a_decided_permit_does_not_fall_back_to_a_declaration_written_with_it() -> None:
    before = state(description="x", workstatus="ASSIGNED", workpermit="APPROVED")
    writes = [{"workpermit": "PARTIALLY_APPROVED"}, {"workpermit": "REJECTED"}]
    done = merged_at_once("work-orders", before, writes, DEVICE)
    assert done.repaired.fields["workpermit"] == "APPROVED"


def test_an_approver_may_still_waive_a_permit_declared_in_the_same_merge() -> None:
    before = state(description="x", workstatus="ASSIGNED")
    writes = [{"workpermit": "PARTIALLY_APPROVED"}, {"workpermit": "NOT_REQUIRED"}]
    done = merged_at_once("work-orders", before, writes, APPROVER_DEVICE)
    assert done.corrections == [] and done.repaired.fields["workpermit"] == "NOT_REQUIRED"
