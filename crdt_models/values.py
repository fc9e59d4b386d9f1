"""What each FieldType accepts, and human sentences for what it does not.

``problem(field, value)`` returns None for an acceptable value, else a reason a
support engineer can read, e.g. "gracetime must be an integer number of
minutes; got the string '15m'". ``None`` (a cleared value) is always accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import date, datetime

from crdt_models.record import MAX_SAFE_INTEGER, NonScalar
from crdt_models.schema import Field, FieldType

#: Longest piece of a string value quoted back in a reason or decision.
QUOTE_LIMIT = 60

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def problem(field: Field, value: object) -> str | None:
    """Why ``value`` is not acceptable for ``field``, or None if it is."""
    if value is None:
        return None
    if isinstance(value, NonScalar):
        return f"{field.name} must be a single value, not a nested {value.kind}"
    return _CHECKS[field.type](field, value)


def is_int(value: object) -> bool:
    """An integer, or an integral float (pycrdt and Yjs store numbers as floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not value.is_integer():
        return False
    return abs(value) <= MAX_SAFE_INTEGER


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def describe(value: object) -> str:
    """A short, safe description of a value for reasons ("the string '15m'")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, (int, float)):
        return f"the number {_number_text(value)}"
    if isinstance(value, NonScalar):
        return f"a nested {value.kind}"
    return f"a value of type {type(value).__name__}"


def quote(text: str) -> str:
    """``repr`` of a string, cut to QUOTE_LIMIT characters."""
    if len(text) <= QUOTE_LIMIT:
        return repr(text)
    return repr(text[:QUOTE_LIMIT]) + f"… ({len(text)} characters)"


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _got(field: Field, expected: str, value: object) -> str:
    return f"{field.name} must be {expected}; got {describe(value)}"


def _check_string(field: Field, value: object) -> str | None:
    return None if isinstance(value, str) else _got(field, "text", value)


def _check_bool(field: Field, value: object) -> str | None:
    return None if isinstance(value, bool) else _got(field, "true or false", value)


def _check_int(field: Field, value: object) -> str | None:
    unit = f" number of {field.unit}" if field.unit else ""
    if not is_int(value):
        return _got(field, f"an integer{unit}", value)
    return _check_minimum(field, value)


def _check_number(field: Field, value: object) -> str | None:
    if not is_number(value):
        return _got(field, "a finite number", value)
    return _check_minimum(field, value)


def _check_minimum(field: Field, value: object) -> str | None:
    assert isinstance(value, (int, float))
    if field.minimum is None or value >= field.minimum:
        return None
    unit = f" {field.unit}" if field.unit else ""
    least = _number_text(field.minimum)
    return f"{field.name} must be at least {least}{unit}; got {_number_text(value)}"


def _check_datetime(field: Field, value: object) -> str | None:
    expected = "an ISO-8601 date-time with a timezone, such as 2024-05-01T08:30:00Z"
    if not isinstance(value, str):
        return _got(field, expected, value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return _got(field, expected, value)
    if parsed.tzinfo is None:
        return (
            f"{field.name} needs a timezone (Z or an offset such as +05:30); "
            f"got {quote(value)}, which has none"
        )
    return None


def _check_date(field: Field, value: object) -> str | None:
    expected = "a calendar date YYYY-MM-DD"
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        return _got(field, expected, value)
    try:
        date.fromisoformat(value)
    except ValueError:
        return _got(field, expected, value)
    return None


def _check_enum(field: Field, value: object) -> str | None:
    assert field.choices is not None
    if isinstance(value, str) and value in field.choices:
        return None
    return _got(field, "one of " + ", ".join(sorted(field.choices)), value)


def _check_ref(field: Field, value: object) -> str | None:
    if (isinstance(value, str) and value) or is_int(value):
        return None
    return _got(field, "an id (non-empty text or an integer)", value)


_CHECKS: dict[FieldType, Callable[[Field, object], str | None]] = {
    FieldType.STRING: _check_string,
    FieldType.INT: _check_int,
    FieldType.NUMBER: _check_number,
    FieldType.BOOL: _check_bool,
    FieldType.DATETIME: _check_datetime,
    FieldType.DATE: _check_date,
    FieldType.ENUM: _check_enum,
    FieldType.REF: _check_ref,
}
