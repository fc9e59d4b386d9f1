"""The constraint engine: run a model's rules, net their corrections, write them back.

``evaluate`` is pure. ``compensate`` is the only function here that touches a
doc: it writes the kept values in one transaction whose origin marks it as the
server's own work, so the server never re-compensates or echoes it by mistake.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from pycrdt import Map

from crdt_models.record import FIELDS_ROOT, NonScalar, RecordDoc, RecordState, json_value
from crdt_models.schema import DomainModel
from crdt_models.values import QUOTE_LIMIT

SERVER_ORIGIN = "fieldsync-server"

Action = Literal["set", "delete"]
_ACTIONS: frozenset[str] = frozenset({"set", "delete"})


class Origin(StrEnum):
    """Who made the change being checked."""

    DEVICE = "device"
    BACKOFFICE = "backoffice"
    SERVER = "server"


@dataclass(frozen=True)
class Context:
    """Who is merging, and when (``now`` must be timezone-aware)."""

    user: str
    roles: frozenset[str]
    device: str | None
    origin: Origin
    now: datetime

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("Context.now must be timezone-aware")


@dataclass(frozen=True)
class Correction:
    """One repair: ``set`` writes ``kept`` into ``fields[field]``; ``delete`` removes the key."""

    rule: str
    field: str
    rejected: object
    kept: object
    reason: str
    action: Action = "set"

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown correction action {self.action!r}")
        if self.action == "set" and isinstance(self.kept, NonScalar):
            raise ValueError(f"{self.rule}: cannot keep a nested value in {self.field}")

    def slot(self) -> tuple[str, str]:
        """What this correction writes; later corrections of the same slot replace it."""
        return (FIELDS_ROOT, self.field)

    def decision(self) -> dict[str, object]:
        """The JSON-ready decision returned to the device and kept with the record."""
        return {
            "rule": self.rule,
            "field": self.field,
            "rejected": decision_value(self.rejected),
            "kept": decision_value(self.kept),
            "reason": self.reason,
        }


def decision_value(value: object) -> object:
    """A value as a decision shows it: "<map>" for NonScalar, "nan"/"inf" as text, long text cut."""
    if isinstance(value, NonScalar):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > QUOTE_LIMIT:
        return value[:QUOTE_LIMIT] + "…"
    return json_value(value)


def apply_to_state(state: RecordState, corrections: Iterable[Correction]) -> RecordState:
    """The state after the corrections, as ``compensate`` would leave the doc (pure)."""
    fields = dict(state.fields)
    for correction in corrections:
        if correction.action == "set":
            fields[correction.field] = correction.kept
        else:
            fields.pop(correction.field, None)
    return replace(state, fields=MappingProxyType(fields))


def evaluate(
    model: DomainModel, before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """Run the model's rules in order; each sees the state the earlier ones left."""
    state = after
    found: list[Correction] = []
    for rule in model.rules:
        corrections = list(rule(before, state, ctx))
        found.extend(corrections)
        state = apply_to_state(state, corrections)
    return _net(after, found)


def _net(after: RecordState, found: list[Correction]) -> list[Correction]:
    """One correction per slot: the last one wins, but it names what the device actually sent.

    A slot whose final value is what ``after`` already had is dropped (no-op).
    """
    first: dict[tuple[str, str], Correction] = {}
    last: dict[tuple[str, str], Correction] = {}
    for correction in found:
        first.setdefault(correction.slot(), correction)
        last[correction.slot()] = correction
    netted = (replace(last[slot], rejected=first[slot].rejected) for slot in first)
    return [c for c in netted if not _is_noop(after, c)]


def _is_noop(after: RecordState, correction: Correction) -> bool:
    present = correction.field in after.fields
    if correction.action == "delete":
        return not present
    return present and _same(after.fields[correction.field], correction.kept)


def _same(a: object, b: object) -> bool:
    """Equal as stored values: 1 == 1.0, but True is not 1 and NonScalars never match."""
    if isinstance(a, NonScalar) or isinstance(b, NonScalar):
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def compensate(doc: RecordDoc, corrections: Iterable[Correction]) -> None:
    """Write the corrections to ``doc`` in one transaction with origin ``SERVER_ORIGIN``.

    Must not be called inside another transaction: the edit has to be its own
    update so the server can store and send it as the compensation.
    """
    pending = list(corrections)
    if not pending:
        return
    with doc.transaction(origin=SERVER_ORIGIN) as txn:
        if txn.origin != SERVER_ORIGIN:
            raise RuntimeError("compensate() must run in its own transaction")
        fields = doc.get(FIELDS_ROOT, type=Map)
        for correction in pending:
            _write(fields, correction)


def _write(fields: Map[object], correction: Correction) -> None:
    if correction.action == "set":
        fields[correction.field] = correction.kept
    elif correction.field in fields:
        del fields[correction.field]
