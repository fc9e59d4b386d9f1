"""Helpdesk tickets, with escalation levels and a server-authored history."""

from __future__ import annotations

from crdt_models import rules_common as common
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "helpdesk"

STATUSES = frozenset({"NEW", "OPEN", "ONHOLD", "RESOLVED", "CLOSED", "CANCELLED"})

FIELDS = (
    Field("ticketdesc", FieldType.STRING),
    common.PRIORITY,
    Field("status", FieldType.ENUM, choices=STATUSES),
    Field("level", FieldType.INT, minimum=0),
    Field("isescalated", FieldType.BOOL),
    Field("assignedtopeople", FieldType.REF),
    Field("assignedtogroup", FieldType.REF),
    Field("comments", FieldType.STRING),
)

# Business rules (escalation preservation, isescalated, history entries) go after
# check_types.
RULES: tuple[Rule, ...] = (common.check_types(FIELDS),)

MODEL = build_model(NAME, FIELDS, RULES, arrays=("history",))
