"""Work orders: maintenance work, possibly needing an approved work permit."""

from __future__ import annotations

from crdt_models import rules_common as common
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "work-orders"

WORKSTATUSES = frozenset({"ASSIGNED", "INPROGRESS", "COMPLETED", "CANCELLED"})
WORKPERMITS = frozenset({"NOT_REQUIRED", "APPROVED", "REJECTED", "PARTIALLY_APPROVED"})

FIELDS = (
    Field("description", FieldType.STRING),
    common.PLANDATETIME,
    common.EXPIRYDATETIME,
    common.GRACETIME,
    common.PRIORITY,
    Field("workstatus", FieldType.ENUM, choices=WORKSTATUSES),
    Field("workpermit", FieldType.ENUM, choices=WORKPERMITS),
    Field("vendor", FieldType.REF),
    Field("performedby", FieldType.REF),
    common.LAT,
    common.LON,
    common.REMARKS,
)

# Business rules (workflow, permit approval by `approver`, no start without permit)
# go after check_types.
RULES: tuple[Rule, ...] = (common.check_types(FIELDS),)

MODEL = build_model(NAME, FIELDS, RULES)
