"""The constraint engine: run a model's rules, net their corrections, write them back.

``evaluate`` is pure. ``compensate`` and ``backoffice_edit`` are the only functions
here that touch a doc: each writes in one transaction whose origin marks it as the
server's own work, so the server never re-compensates or echoes it by mistake.

What a correction is (and its decision) lives in ``crdt_models.corrections``; who
merges, when and under which settings, in ``crdt_models.context``. Both are
re-exported here, so the server needs only this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

from pycrdt import Array, Map

from crdt_models.context import DEFAULT_SETTINGS, Context, Geofence, Origin, RuleSettings
from crdt_models.corrections import (
    DECISION_ENTRIES,
    DECISION_KEYS,
    FIELD_ACTIONS,
    HISTORY_ACTIONS,
    META_ACTIONS,
    Action,
    Correction,
    decision_value,
    decisions,
    is_plain_entry,
    is_scalar,
    same_value,
)
from crdt_models.record import (
    FIELDS_ROOT,
    HISTORY_ROOT,
    MAX_SAFE_INTEGER,
    META_ROOT,
    HistoryEntry,
    NonScalar,
    RecordDoc,
    RecordState,
    root_array,
    root_map,
    scalar_or_marker,
)
from crdt_models.schema import DomainModel

__all__ = [
    "DECISION_ENTRIES",
    "DECISION_KEYS",
    "DEFAULT_SETTINGS",
    "SERVER_ORIGIN",
    "Action",
    "Context",
    "Correction",
    "Geofence",
    "InvalidEdit",
    "Origin",
    "RuleSettings",
    "apply_to_state",
    "backoffice_edit",
    "compensate",
    "decision_value",
    "decisions",
    "evaluate",
    "is_plain_entry",
    "same_value",
]

SERVER_ORIGIN = "fieldsync-server"


# --- pure: apply, evaluate, net --------------------------------------------------


def apply_to_state(state: RecordState, corrections: Iterable[Correction]) -> RecordState:
    """The state after the corrections, as ``compensate`` would leave the doc (pure)."""
    fields, meta = dict(state.fields), dict(state.meta)
    history = list(state.history)
    for c in corrections:
        if c.action == "set":
            fields[c.field] = c.kept
        elif c.action == "delete":
            fields.pop(c.field, None)
        elif c.action == "meta_set":
            meta[c.field] = c.kept
        elif c.action == "meta_delete":
            meta.pop(c.field, None)
        else:
            _apply_history(history, c)
    return replace(
        state,
        fields=MappingProxyType(fields),
        meta=MappingProxyType(meta),
        history=tuple(history),
    )


def _apply_history(history: list[HistoryEntry], c: Correction) -> None:
    entry = MappingProxyType(dict(c.kept)) if isinstance(c.kept, Mapping) else None
    if c.action == "history_append" and entry is not None:
        history.append(entry)
    elif c.action == "history_insert" and entry is not None:
        history.insert(min(_index(c), len(history)), entry)
    elif c.action == "history_remove":
        del history[_index(c) : _index(c) + c.count]


def _index(c: Correction) -> int:
    assert c.index is not None
    return c.index


def evaluate(
    model: DomainModel, before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """Run the model's rules in order; each sees the state the earlier ones left."""
    state = after
    found: list[Correction] = []
    for rule in model.rules:
        corrections = list(rule(before, state, ctx))
        if corrections:
            found.extend(corrections)
            state = apply_to_state(state, corrections)
    return _net(after, found)


def _net(after: RecordState, found: list[Correction]) -> list[Correction]:
    """One correction per slot: the last one wins, but it names what the device actually sent.

    It is a repair if any correction of the slot was. A slot whose final value is what
    ``after`` already had is dropped (no-op). Slotless (history) corrections stay, in order.
    """
    order: list[tuple[str, str] | Correction] = []
    first: dict[tuple[str, str], Correction] = {}
    last: dict[tuple[str, str], Correction] = {}
    repair: dict[tuple[str, str], bool] = {}
    for correction in found:
        slot = correction.slot()
        if slot is None:
            order.append(correction)
            continue
        if slot not in first:
            first[slot] = correction
            order.append(slot)
        last[slot] = correction
        repair[slot] = repair.get(slot, False) or correction.is_repair
    netted: list[Correction] = []
    for item in order:
        if isinstance(item, Correction):
            netted.append(item)
            continue
        merged = replace(last[item], rejected=first[item].rejected, is_repair=repair[item])
        if not _is_noop(after, merged):
            netted.append(merged)
    return netted


def _is_noop(after: RecordState, correction: Correction) -> bool:
    where = after.meta if correction.action in META_ACTIONS else after.fields
    present = correction.field in where
    if correction.action in ("delete", "meta_delete"):
        return not present
    return present and same_value(where[correction.field], correction.kept)


# --- writing docs ----------------------------------------------------------------


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
        fields = root_map(doc, FIELDS_ROOT)
        meta = root_map(doc, META_ROOT)
        history = root_array(doc, HISTORY_ROOT) if _touches_history(pending) else None
        for correction in pending:
            if correction.action in FIELD_ACTIONS:
                _write_map(fields, correction)
            elif correction.action in META_ACTIONS:
                _write_map(meta, correction)
            else:
                assert history is not None
                _write_history(history, correction)


def _touches_history(corrections: list[Correction]) -> bool:
    return any(c.action in HISTORY_ACTIONS for c in corrections)


def _write_map(ymap: Map[object], correction: Correction) -> None:
    if correction.action in ("set", "meta_set"):
        ymap[correction.field] = correction.kept
    elif correction.field in ymap:
        del ymap[correction.field]


def _write_history(array: Array[object], c: Correction) -> None:
    length = len(array)
    if c.action == "history_append":
        array.append(_entry_map(c.kept))
    elif c.action == "history_insert":
        array.insert(min(_index(c), length), _entry_map(c.kept))
    elif _index(c) < length:
        del array[_index(c) : min(_index(c) + c.count, length)]


def _entry_map(entry: object) -> Map[object]:
    assert isinstance(entry, Mapping)
    return Map(dict(entry))


class InvalidEdit(ValueError):
    """A back-office edit that names unknown fields or carries values a record cannot hold."""


def backoffice_edit(doc: RecordDoc, model: DomainModel, values: Mapping[str, object]) -> None:
    """Write a back-office edit of ``fields`` as one transaction with origin ``SERVER_ORIGIN``.

    ``values`` follows JSON Merge Patch (RFC 7396): a value sets the field, ``None``
    removes it. Values equal to what the doc holds are not written; if nothing
    changes, no transaction is made. Raises ``InvalidEdit`` (writing nothing) for
    unknown field names and for values that are not scalars (objects, lists, bytes)
    or are integers beyond 2**53. Type and business rules are *not* checked here: run
    ``evaluate``/``compensate`` with ``Origin.BACKOFFICE`` afterwards, as for a device.
    Must not be called inside another transaction.
    """
    _check_edit(model, values)
    fields = root_map(doc, FIELDS_ROOT)
    with doc.transaction():
        current = {name: _current(fields, name) for name in values}
    writes = {
        name: value for name, value in values.items() if not _edit_is_noop(current[name], value)
    }
    if not writes:
        return
    with doc.transaction(origin=SERVER_ORIGIN) as txn:
        if txn.origin != SERVER_ORIGIN:
            raise RuntimeError("backoffice_edit() must run in its own transaction")
        for name, value in writes.items():
            if value is None:
                del fields[name]
            else:
                fields[name] = value


_MISSING = NonScalar("missing")


def _current(fields: Map[object], name: str) -> object:
    return scalar_or_marker(fields[name]) if name in fields else _MISSING


def _edit_is_noop(current: object, value: object) -> bool:
    if value is None:
        return current is _MISSING
    return same_value(current, value)


def _check_edit(model: DomainModel, values: Mapping[str, object]) -> None:
    unknown = sorted(str(name) for name in values if name not in model.fields)
    if unknown:
        raise InvalidEdit(f"{model.name} records have no field(s) {', '.join(unknown)}")
    for name, value in values.items():
        if not is_scalar(value):
            raise InvalidEdit(f"{name} must be a single value (text, number, true/false or null)")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INTEGER:
            raise InvalidEdit(f"{name} is an integer beyond 2**53, which a record cannot hold")
