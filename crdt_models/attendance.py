"""Attendance: a person's punch-in/punch-out for one day, verified by the back office."""

from __future__ import annotations

from crdt_models import rules_common as common
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "attendance"

FIELDS = (
    Field("people", FieldType.REF),
    Field("datefor", FieldType.DATE),
    Field("punchintime", FieldType.DATETIME),
    Field("punchouttime", FieldType.DATETIME),
    Field("lat_in", FieldType.NUMBER),
    Field("lon_in", FieldType.NUMBER),
    Field("lat_out", FieldType.NUMBER),
    Field("lon_out", FieldType.NUMBER),
    Field("accuracy", FieldType.NUMBER),
    Field("shift", FieldType.REF),
    common.REMARKS,
    Field("verified", FieldType.BOOL, server_owned=True),
    Field("verifiedby", FieldType.REF, server_owned=True),
    Field("approval", FieldType.STRING, server_owned=True),
)

# Business rules (GPS sanity, punch times, server wins) go after check_types.
RULES: tuple[Rule, ...] = (common.check_types(FIELDS),)

MODEL = build_model(NAME, FIELDS, RULES)
