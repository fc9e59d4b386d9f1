"""What a correction is: one write of the server's compensation, and its decision.

A correction writes one of three places of a record doc:

- ``fields`` (``set``/``delete`` a field): the repairs rules make;
- ``meta`` (``meta_set``/``meta_delete`` a key): server metadata such as back-office
  locks, and the repair of a device that touched it;
- ``history`` (``history_append``/``history_insert``/``history_remove``): server-authored
  ticket history, and the repair of a device that touched it.

Corrections apply in list order; a history correction's ``index`` is a position in
the array as the corrections before it left it. ``is_repair`` says whether the
correction refuses something the change being checked did (a repair, shown to the
device as a decision) or only keeps the server's books (a history entry, a lock, a
value derived from another field), which the record itself shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from crdt_models.record import FIELDS_ROOT, HISTORY_ROOT, META_ROOT, NonScalar, json_value
from crdt_models.values import QUOTE_LIMIT

Action = Literal[
    "set", "delete", "meta_set", "meta_delete", "history_append", "history_insert", "history_remove"
]
FIELD_ACTIONS: frozenset[str] = frozenset({"set", "delete"})
META_ACTIONS: frozenset[str] = frozenset({"meta_set", "meta_delete"})
HISTORY_ACTIONS: frozenset[str] = frozenset({"history_append", "history_insert", "history_remove"})
_ACTIONS = FIELD_ACTIONS | META_ACTIONS | HISTORY_ACTIONS

#: Entries of a removed run of history shown in a decision.
DECISION_ENTRIES = 5
#: Keys of one history entry shown in a decision.
DECISION_KEYS = 10


@dataclass(frozen=True)
class Correction:
    """One write of the server's compensation, and the decision that explains it.

    ``field`` names the field (``set``/``delete``) or the meta key (``meta_*``);
    history corrections use ``"history"``. ``kept`` is the value written: a scalar,
    or for ``history_append``/``history_insert`` the entry (a mapping of scalars).
    ``history_remove`` deletes ``count`` entries at ``index``; ``rejected`` holds them.
    """

    rule: str
    field: str
    rejected: object
    kept: object
    reason: str
    action: Action = "set"
    index: int | None = None
    count: int = 1
    is_repair: bool = True

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown correction action {self.action!r}")
        if self.action in ("set", "meta_set") and not is_scalar(self.kept):
            raise ValueError(f"{self.rule}: cannot keep a nested value in {self.field}")
        if self.action in ("history_append", "history_insert") and not is_plain_entry(self.kept):
            raise ValueError(f"{self.rule}: a history entry must be a mapping of scalars")
        positional = self.action in ("history_insert", "history_remove")
        if positional != (self.index is not None) or (self.index is not None and self.index < 0):
            raise ValueError(f"{self.rule}: {self.action} needs an index >= 0 (and only it)")
        if self.count < 1 or (self.count != 1 and self.action != "history_remove"):
            raise ValueError(f"{self.rule}: count applies to history_remove only, and is >= 1")

    def slot(self) -> tuple[str, str] | None:
        """What this correction writes; later corrections of the same slot replace it.

        History corrections are positional: they have no slot, are never netted and
        apply in order.
        """
        if self.action in FIELD_ACTIONS:
            return (FIELDS_ROOT, self.field)
        if self.action in META_ACTIONS:
            return (META_ROOT, self.field)
        return None

    def decision(self) -> dict[str, object]:
        """The JSON-ready decision returned to the device and kept with the record."""
        return {
            "rule": self.rule,
            "field": self.shown_field(),
            "rejected": decision_value(self.rejected),
            "kept": decision_value(self.kept),
            "reason": self.reason,
        }

    def shown_field(self) -> str:
        """``field`` as a decision names it: meta keys as ``meta.<key>``."""
        if self.action in META_ACTIONS:
            return f"{META_ROOT}.{self.field}"
        if self.action in HISTORY_ACTIONS:
            return HISTORY_ROOT
        return self.field


def decisions(corrections: Iterable[Correction]) -> list[dict[str, object]]:
    """The decisions to return to the device: one per repair (bookkeeping shows in the record)."""
    return [c.decision() for c in corrections if c.is_repair]


def decision_value(value: object) -> object:
    """A value as a decision shows it: "<map>" for NonScalar, "nan"/"inf" as text, long text cut.

    A history entry shows as an object (its first DECISION_KEYS keys), a run of
    entries as a list (its first DECISION_ENTRIES entries).
    """
    if isinstance(value, Mapping):
        shown = list(value.items())[:DECISION_KEYS]
        return {_cut(str(k)): _scalar_shown(v) for k, v in shown}
    if isinstance(value, tuple):
        return [decision_value(v) for v in value[:DECISION_ENTRIES]]
    return _scalar_shown(value)


def _scalar_shown(value: object) -> object:
    if isinstance(value, NonScalar):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return _cut(value)
    return json_value(value)


def _cut(text: str) -> str:
    return text[:QUOTE_LIMIT] + "…" if len(text) > QUOTE_LIMIT else text


def is_scalar(value: object) -> bool:
    """A value a record's maps hold: null, text, a number or a boolean."""
    return value is None or isinstance(value, (str, bool, int, float))


def is_plain_entry(value: object) -> bool:
    """A history entry the server can write: a mapping of text keys to scalars."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and is_scalar(v) for k, v in value.items()
    )


def same_value(a: object, b: object) -> bool:
    """Equal as stored values: 1 == 1.0, but True is not 1 and NonScalars never match."""
    if isinstance(a, NonScalar) or isinstance(b, NonScalar):
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b
