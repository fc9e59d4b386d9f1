"""Activity (tasks): a job a technician or guard carries out at a site.

Rules, after the shared type and meta checks:

- ``jobstatus`` only moves forward (``FLOW``): ASSIGNED -> INPROGRESS/WORKING/STANDBY
  (a technician pauses and resumes among these) -> PARTIALLYCOMPLETED -> COMPLETED;
  COMPLETED and AUTOCLOSED are final; a status is never cleared. A new record may
  start in any status but AUTOCLOSED. Across concurrent edits too: a status further
  along that a concurrent edit hid in the merge (Yjs keeps the higher client id's
  value) is put back before the other rules run.
- AUTOCLOSED is set by the server's own jobs only (``Origin.SERVER``), never by a
  device or the back office. A refused AUTOCLOSED falls back to the furthest status the
  same merge wrote before it (updates delivered together or out of order), else to the
  status the record had.
- ``endtime`` is not before ``starttime``; ``expirydatetime`` is not before
  ``plandatetime`` (a task that expires before it is due would be auto-closed
  before anyone could start it: always a typo). A refused time goes back to the last
  one the same merge wrote that is in order, else to the record's.
- ``lat``/``lon`` are a place on Earth.
"""

from __future__ import annotations

from types import MappingProxyType

from crdt_models import rules_common as common
from crdt_models.constraints import Context, Correction, Origin
from crdt_models.record import RecordState
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "activity"

AUTOCLOSED = "AUTOCLOSED"
JOBSTATUSES = frozenset(
    {
        "ASSIGNED",
        "INPROGRESS",
        "WORKING",
        "STANDBY",
        "PARTIALLYCOMPLETED",
        "COMPLETED",
        AUTOCLOSED,
    }
)

JOBSTATUS = Field("jobstatus", FieldType.ENUM, choices=JOBSTATUSES)
STARTTIME = Field("starttime", FieldType.DATETIME)
ENDTIME = Field("endtime", FieldType.DATETIME)

FIELDS = (
    Field("jobdesc", FieldType.STRING),
    common.PLANDATETIME,
    common.EXPIRYDATETIME,
    common.GRACETIME,
    common.PRIORITY,
    JOBSTATUS,
    Field("assignee", FieldType.REF),
    STARTTIME,
    ENDTIME,
    common.LAT,
    common.LON,
    common.REMARKS,
)

FLOW = common.StatusFlow(
    JOBSTATUS,
    ranks=MappingProxyType(
        {
            "ASSIGNED": 0,
            "INPROGRESS": 1,
            "WORKING": 1,
            "STANDBY": 1,
            "PARTIALLYCOMPLETED": 2,
            "COMPLETED": 3,
            AUTOCLOSED: 3,
        }
    ),
    terminal=frozenset({"COMPLETED", AUTOCLOSED}),
)

RULE_FLOW = "activity.jobstatus_forward"
RULE_AUTOCLOSED = "activity.autoclosed_by_server"
RULE_END = "activity.endtime_after_starttime"
RULE_EXPIRY = "activity.expiry_after_plan"
RULE_POSITION = "activity.position"


def autoclosed_by_server_only(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """Only the server's own jobs close a task as AUTOCLOSED."""
    if ctx.origin is Origin.SERVER or not common.changed(before, after, JOBSTATUS.name):
        return []
    if common.value_of(after, JOBSTATUS.name) != AUTOCLOSED:
        return []
    reason = "jobstatus AUTOCLOSED is set by the server only (when a task expires)"
    written = _status_written_before(before, ctx)
    if written is not None:
        reason += f"; kept {written}, the status it wrote before it"
        return [Correction(RULE_AUTOCLOSED, JOBSTATUS.name, AUTOCLOSED, written, reason)]
    return common.restored([common.restore(RULE_AUTOCLOSED, JOBSTATUS, before, after, reason)])


def _status_written_before(before: RecordState | None, ctx: Context) -> str | None:
    """The furthest status other than AUTOCLOSED this merge wrote that may follow
    ``before``'s: delivered one update at a time, it would have been accepted before the
    AUTOCLOSED was refused (updates that arrive together, or out of order, merge at once)."""
    if ctx.written is None:
        return None
    old = common.value_of(before, JOBSTATUS.name)
    choices = sorted(JOBSTATUSES - {AUTOCLOSED})
    best: str | None = None
    for value in ctx.written.for_field(JOBSTATUS.name, lambda v: v in choices, choices):
        if FLOW.allows(old, value) and (best is None or FLOW.beats(value, best)):
            best = str(value)
    return best


RULES: tuple[Rule, ...] = (
    *common.base_rules(FIELDS),
    common.keep_hidden_advance(RULE_FLOW, JOBSTATUS, FLOW.beats, FLOW.why_kept, FLOW.ranks),
    autoclosed_by_server_only,
    common.forward_only(RULE_FLOW, FLOW),
    common.ordered_times(RULE_END, STARTTIME, ENDTIME),
    common.ordered_times(RULE_EXPIRY, common.PLANDATETIME, common.EXPIRYDATETIME),
    common.coordinates(RULE_POSITION, common.LAT, common.LON),
)

MODEL = build_model(NAME, FIELDS, RULES)
