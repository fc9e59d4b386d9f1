"""Rules and field declarations every domain shares.

``check_types`` is the first rule of every domain: it makes sure the later,
business rules only ever see known fields holding values of the right type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from crdt_models.constraints import Context, Correction
from crdt_models.record import RecordState
from crdt_models.schema import Field, FieldType, Rule
from crdt_models.values import describe, problem

RULE_UNKNOWN_FIELD = "schema.unknown_field"
RULE_TYPE = "schema.type"

PRIORITIES = frozenset({"LOW", "MEDIUM", "HIGH"})

PRIORITY = Field("priority", FieldType.ENUM, choices=PRIORITIES)
GRACETIME = Field("gracetime", FieldType.INT, minimum=0, unit="minutes")
PLANDATETIME = Field("plandatetime", FieldType.DATETIME)
EXPIRYDATETIME = Field("expirydatetime", FieldType.DATETIME)
LAT = Field("lat", FieldType.NUMBER)
LON = Field("lon", FieldType.NUMBER)
REMARKS = Field("remarks", FieldType.STRING)

_ABSENT = object()


def check_types(fields: Iterable[Field]) -> Rule:
    """The type-check rule for a model with these fields.

    Unknown field -> deleted. Wrong type or out of range -> the value ``before``
    had, if that was valid, else deleted. (A factory, because a rule sees only
    ``(before, after, context)`` and must know the model's fields.)
    """
    by_name = {field.name: field for field in fields}

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        found = (_check(by_name, before, name, value) for name, value in after.fields.items())
        return [correction for correction in found if correction is not None]

    rule.__name__ = rule.__qualname__ = "check_types"
    return rule


def _check(
    fields: Mapping[str, Field], before: RecordState | None, name: str, value: object
) -> Correction | None:
    field = fields.get(name)
    if field is None:
        reason = f"{name} is not a field of this record; it was removed"
        return Correction(RULE_UNKNOWN_FIELD, name, value, None, reason, "delete")
    wrong = problem(field, value)
    if wrong is None:
        return None
    previous = before.fields.get(name, _ABSENT) if before is not None else _ABSENT
    if previous is not _ABSENT and problem(field, previous) is None:
        reason = f"{wrong}; kept the previous value, {describe(previous)}"
        return Correction(RULE_TYPE, name, value, previous, reason, "set")
    return Correction(RULE_TYPE, name, value, None, f"{wrong}; the value was removed", "delete")
