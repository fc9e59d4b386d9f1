"""The shape of a record: field types, fields and domain models."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from crdt_models.constraints import Context, Correction
    from crdt_models.record import RecordState

#: Root arrays a model may declare besides ``fields`` (RecordState reads only these).
SUPPORTED_ARRAYS = frozenset({"history"})

Rule: TypeAlias = Callable[["RecordState | None", "RecordState", "Context"], Iterable["Correction"]]
"""A constraint ``(before, after, context) -> corrections``; ``before`` None = new record."""


class FieldType(Enum):
    STRING = "string"
    INT = "int"
    NUMBER = "number"
    BOOL = "bool"
    DATETIME = "datetime"
    DATE = "date"
    """A calendar day ``YYYY-MM-DD``: a day is not an instant, so it carries no timezone."""
    ENUM = "enum"
    REF = "ref"
    """An id of another entity: the old API sent integer keys, newer clients send strings."""


@dataclass(frozen=True)
class Field:
    name: str
    type: FieldType
    choices: frozenset[str] | None = None
    server_owned: bool = False
    minimum: float | None = None
    """Smallest accepted value of an INT/NUMBER field (a pure range check)."""
    unit: str | None = None
    """Unit named in reasons, e.g. "minutes" -> "an integer number of minutes"."""

    def __post_init__(self) -> None:
        if (self.type is FieldType.ENUM) != (self.choices is not None):
            raise ValueError(f"{self.name}: choices are required for ENUM fields and only for them")
        if self.minimum is not None and self.type not in (FieldType.INT, FieldType.NUMBER):
            raise ValueError(f"{self.name}: minimum applies to INT and NUMBER fields only")


@dataclass(frozen=True, eq=False)
class DomainModel:
    """One record kind. Compared by identity: each domain has exactly one model."""

    name: str
    fields: Mapping[str, Field]
    rules: tuple[Rule, ...]
    arrays: tuple[str, ...] = ()


def build_model(
    name: str, fields: Iterable[Field], rules: Iterable[Rule], arrays: Iterable[str] = ()
) -> DomainModel:
    """Build a model, refusing duplicate field names and unsupported root arrays."""
    by_name: dict[str, Field] = {}
    for field in fields:
        if field.name in by_name:
            raise ValueError(f"{name}: field {field.name!r} declared twice")
        by_name[field.name] = field
    extra = set(arrays) - SUPPORTED_ARRAYS
    if extra:
        raise ValueError(f"{name}: unsupported root arrays {sorted(extra)}")
    return DomainModel(name, MappingProxyType(by_name), tuple(rules), tuple(arrays))
