"""Work orders: maintenance work, possibly needing an approved work permit.

Rules, after the shared type and meta checks:

- ``workstatus`` follows ASSIGNED -> INPROGRESS -> COMPLETED, or CANCELLED from an
  open state (ASSIGNED, INPROGRESS); COMPLETED and CANCELLED are final; a status is
  never cleared. A new record may start in any status. A status further along that a
  concurrent edit hid in the merge is put back before the other rules run.
- A permit is decided by an ``approver`` (a device or back-office user with that
  role; the server's own jobs too): only they set ``workpermit`` to APPROVED or
  REJECTED, change a decided permit, or waive a required one (to NOT_REQUIRED or
  empty). Anyone may declare a permit required (PARTIALLY_APPROVED); for anyone else
  it then stays required, also when the same merge (a device's updates pushed together,
  or delivered out of order) ends with another value: delivered one at a time, the
  declaration would have stood and that value would have been judged against it.
- Work does not start without its permit: while ``workpermit`` is set and not
  NOT_REQUIRED, ``workstatus`` moves to INPROGRESS (or straight to COMPLETED, which
  implies it started) only if the permit is APPROVED; otherwise it goes back to its
  previous value (ASSIGNED on a record that had none).
- ``expirydatetime`` is not before ``plandatetime`` (a refused time goes back to the last
  one the same merge wrote that is in order, else to the record's); ``lat``/``lon`` are
  a place on Earth.
"""

from __future__ import annotations

from types import MappingProxyType

from crdt_models import rules_common as common
from crdt_models.constraints import Context, Correction, Origin, same_value
from crdt_models.record import RecordState
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "work-orders"

APPROVER = "approver"
ASSIGNED, INPROGRESS, COMPLETED, CANCELLED = "ASSIGNED", "INPROGRESS", "COMPLETED", "CANCELLED"
NOT_REQUIRED, APPROVED, REJECTED = "NOT_REQUIRED", "APPROVED", "REJECTED"
PARTIALLY_APPROVED = "PARTIALLY_APPROVED"

WORKSTATUSES = frozenset({ASSIGNED, INPROGRESS, COMPLETED, CANCELLED})
WORKPERMITS = frozenset({NOT_REQUIRED, APPROVED, REJECTED, PARTIALLY_APPROVED})
DECIDED = frozenset({APPROVED, REJECTED})
STARTED = frozenset({INPROGRESS, COMPLETED})

WORKSTATUS = Field("workstatus", FieldType.ENUM, choices=WORKSTATUSES)
WORKPERMIT = Field("workpermit", FieldType.ENUM, choices=WORKPERMITS)

FIELDS = (
    Field("description", FieldType.STRING),
    common.PLANDATETIME,
    common.EXPIRYDATETIME,
    common.GRACETIME,
    common.PRIORITY,
    WORKSTATUS,
    WORKPERMIT,
    Field("vendor", FieldType.REF),
    Field("performedby", FieldType.REF),
    common.LAT,
    common.LON,
    common.REMARKS,
)

FLOW = common.StatusFlow(
    WORKSTATUS,
    ranks=MappingProxyType({ASSIGNED: 0, INPROGRESS: 1, COMPLETED: 2, CANCELLED: 2}),
    terminal=frozenset({COMPLETED, CANCELLED}),
)

RULE_FLOW = "work-orders.workstatus_flow"
RULE_APPROVER = "work-orders.permit_by_approver"
RULE_PERMIT = "work-orders.permit_before_start"
RULE_EXPIRY = "work-orders.expiry_after_plan"
RULE_POSITION = "work-orders.position"


def permit_required(permit: object) -> bool:
    """A permit is required when ``workpermit`` is set to anything but NOT_REQUIRED."""
    return permit is not None and permit != NOT_REQUIRED


def permit_by_approver(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """Only an approver decides (or waives) a permit. A permit this merge declared required
    (``declared``) is judged as the permit it had: a refused value goes back to it."""
    name = WORKPERMIT.name
    if ctx.origin is Origin.SERVER or ctx.has_role(APPROVER):
        return []
    old, new = common.value_of(before, name), common.value_of(after, name)
    was = PARTIALLY_APPROVED if declared(old, ctx) else old
    if same_value(was, new):
        return []
    if new in DECIDED:
        reason = f"only an approver can set workpermit to {new}"
    elif old in DECIDED:
        reason = f"workpermit {old} was decided by an approver; only an approver can change it"
    elif permit_required(was) and not permit_required(new):
        reason = f"only an approver can waive a required permit ({was} -> {common.shown(new)})"
    else:
        return []
    if was != old:
        reason += f"; kept {was}, which it declared before"
        return [Correction(RULE_APPROVER, name, new, was, reason)]
    return common.restored([common.restore(RULE_APPROVER, WORKPERMIT, before, after, reason)])


def declared(old: object, ctx: Context) -> bool:
    """Did this merge declare a permit required (PARTIALLY_APPROVED) over ``old``, one not
    required? Anyone may, so delivered one update at a time the declaration would have
    stood, and a later value would have been judged against it."""
    if ctx.written is None or permit_required(old):
        return False
    words = (PARTIALLY_APPROVED,)
    return bool(ctx.written.for_field(WORKPERMIT.name, lambda v: v in words, words))


def no_start_without_permit(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """Work that needs a permit starts only once the permit is APPROVED."""
    old, new = common.value_of(before, WORKSTATUS.name), common.value_of(after, WORKSTATUS.name)
    permit = common.value_of(after, WORKPERMIT.name)
    if new not in STARTED or old in STARTED or not permit_required(permit) or permit == APPROVED:
        return []
    reason = f"work cannot start ({new}) while its permit is {permit}, not APPROVED"
    fix = common.restore(RULE_PERMIT, WORKSTATUS, before, after, reason)
    if fix is not None and fix.kept is None:  # it had no status: it waits, ASSIGNED
        fix = Correction(RULE_PERMIT, WORKSTATUS.name, new, ASSIGNED, reason)
    return common.restored([fix])


RULES: tuple[Rule, ...] = (
    *common.base_rules(FIELDS),
    common.keep_hidden_advance(RULE_FLOW, WORKSTATUS, FLOW.beats, FLOW.why_kept, FLOW.ranks),
    common.forward_only(RULE_FLOW, FLOW),
    permit_by_approver,
    no_start_without_permit,
    common.ordered_times(RULE_EXPIRY, common.PLANDATETIME, common.EXPIRYDATETIME),
    common.coordinates(RULE_POSITION, common.LAT, common.LON),
)

MODEL = build_model(NAME, FIELDS, RULES)
