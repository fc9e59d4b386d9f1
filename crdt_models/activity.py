"""Activity (tasks): a job a technician or guard carries out at a site."""

from __future__ import annotations

from crdt_models import rules_common as common
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "activity"

JOBSTATUSES = frozenset(
    {
        "ASSIGNED",
        "INPROGRESS",
        "WORKING",
        "STANDBY",
        "PARTIALLYCOMPLETED",
        "COMPLETED",
        "AUTOCLOSED",
    }
)

FIELDS = (
    Field("jobdesc", FieldType.STRING),
    common.PLANDATETIME,
    common.EXPIRYDATETIME,
    common.GRACETIME,
    common.PRIORITY,
    Field("jobstatus", FieldType.ENUM, choices=JOBSTATUSES),
    Field("assignee", FieldType.REF),
    Field("starttime", FieldType.DATETIME),
    Field("endtime", FieldType.DATETIME),
    common.LAT,
    common.LON,
    common.REMARKS,
)

# Business rules (the jobstatus machine, AUTOCLOSED server-only) go after check_types.
RULES: tuple[Rule, ...] = (common.check_types(FIELDS),)

MODEL = build_model(NAME, FIELDS, RULES)
