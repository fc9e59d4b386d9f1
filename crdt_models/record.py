"""Reading a record's Yjs doc into a plain, safe state, and back out as JSON.

Docs hold untrusted device data. A value may be a shared type nested tens of
thousands of levels deep; pycrdt's recursive ``to_py()``/``str()`` overflow the
native stack on such values and kill the process. So the ``fields`` and ``meta``
maps are read key by key, and anything that is not a scalar becomes a
``NonScalar`` marker that is never descended into.

Root types of a record doc:

- ``fields`` (Map): the record's fields, scalars only (wire contract v1).
- ``history`` (Array of Maps): server-authored entries, for models that keep one.
- ``meta`` (Map): server metadata the rules keep, scalars only, e.g.
  ``"lock.punchintime": "<back-office user>"``. Only the server writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from crdt_models.schema import DomainModel

FIELDS_ROOT = "fields"
HISTORY_ROOT = "history"
META_ROOT = "meta"

RecordDoc: TypeAlias = Doc[Any]
"""A record's Yjs doc (pycrdt parametrizes Doc by its root types; records mix several)."""

#: Largest integer a JS number (a float64) holds exactly.
MAX_SAFE_INTEGER = 2**53

_KINDS: tuple[tuple[type, str], ...] = (
    (Map, "map"),
    (Array, "array"),
    (Text, "text"),
    (XmlFragment, "xml"),
    (XmlElement, "xml"),
    (XmlText, "xml"),
    (Doc, "doc"),
    (dict, "json-map"),
    (list, "json-array"),
    (bytes, "bytes"),
    (bytearray, "bytes"),
)


@dataclass(frozen=True)
class NonScalar:
    """A value records must not hold (a nested type, bytes…); its content is never read."""

    kind: str

    def __str__(self) -> str:
        return f"<{self.kind}>"


HistoryEntry = Mapping[str, object] | NonScalar


@dataclass(frozen=True, slots=True)
class RecordState:
    """A record's content as the constraints see it: scalars and NonScalar markers.

    ``has_history`` says the model keeps a ``history`` array, so that
    ``materialize`` can show an empty history as ``[]`` without the model.
    ``meta`` is the server's metadata map (read one level, like ``fields``).

    Every cached record keeps one, so it is built for the garbage collector: the maps and
    history entries are plain dicts, which CPython does not track while they hold only
    scalars, so a state costs a full collection one object (two with a history), not one
    per map and entry. They are read-only by contract (typed ``Mapping``): nothing may
    change a state in place.
    """

    fields: Mapping[str, object]
    history: tuple[HistoryEntry, ...] = ()
    has_history: bool = False
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.fields) is not dict:
            object.__setattr__(self, "fields", dict(self.fields))
        if type(self.meta) is not dict:
            object.__setattr__(self, "meta", dict(self.meta))
        history = self.history
        if type(history) is not tuple or not all(type(e) is dict for e in history):
            object.__setattr__(self, "history", tuple(_plain_entry(e) for e in history))


def _plain_entry(entry: HistoryEntry) -> HistoryEntry:
    return entry if isinstance(entry, (dict, NonScalar)) else dict(entry)


def new_doc(client_id: int | None = None) -> RecordDoc:
    """An empty record doc; pass the node's ``client_id`` so server edits are attributable."""
    return Doc() if client_id is None else Doc(client_id=client_id)


def root_map(doc: RecordDoc, name: str) -> Map[object]:
    """The root Map `name` of a record doc.

    Looked up on every call, never kept per doc: a few microseconds (less inside an open
    transaction), where keeping the root types cost every cached record a dozen more
    objects for the garbage collector to walk (and a kept `Map` refers to its doc).
    """
    return doc.get(name, type=Map)  # type: ignore[no-any-return]


def root_array(doc: RecordDoc, name: str) -> Array[object]:
    """The root Array `name` of a record doc, looked up on every call (see `root_map`)."""
    return doc.get(name, type=Array)  # type: ignore[no-any-return]


def read_state(doc: RecordDoc, model: DomainModel) -> RecordState:
    """Read ``fields``, ``meta`` (and ``history`` if the model has it) without recursing."""
    keeps_history = HISTORY_ROOT in model.arrays
    with doc.transaction():
        fields = read_map(root_map(doc, FIELDS_ROOT))
        meta = read_map(root_map(doc, META_ROOT))
        history = _read_history(root_array(doc, HISTORY_ROOT)) if keeps_history else ()
    return RecordState(fields, history, keeps_history, meta)


def read_map(ymap: Map[object]) -> dict[str, object]:
    """One level of a map: scalars as they are, anything else as NonScalar.

    Reads pycrdt's integrated map inside one transaction: `ymap[key]` opens a
    transaction and re-checks the key on every read, six times slower on the hot path
    of every merge. Nested values come back as raw `_pycrdt` types, which become markers.
    """
    with ymap.doc.transaction() as txn:
        raw_txn, integrated = txn._txn, ymap.integrated
        return {
            key: scalar_or_marker(integrated.get(raw_txn, key)) for key in integrated.keys(raw_txn)
        }


def scalar_or_marker(raw: object) -> object:
    """A scalar unchanged; any container or unknown object as a NonScalar (not inspected)."""
    if raw is None or isinstance(raw, (str, bool, int, float)):
        return raw
    for cls, kind in _KINDS:
        if isinstance(raw, cls):
            return NonScalar(kind)
    return NonScalar(type(raw).__name__.lower())


def _read_history(array: Array[object]) -> tuple[HistoryEntry, ...]:
    return tuple(_history_entry(array[index]) for index in range(len(array)))


def _history_entry(raw: object) -> HistoryEntry:
    """A Y.Map entry, or a plain JSON object entry (``yarray.push([{...}])``), read one level."""
    if isinstance(raw, Map):
        return read_map(raw)
    if isinstance(raw, dict):
        return {str(k): scalar_or_marker(v) for k, v in raw.items()}
    marker = scalar_or_marker(raw)
    return marker if isinstance(marker, NonScalar) else NonScalar(type(raw).__name__.lower())


def json_value(value: object) -> object:
    """A JSON-ready scalar: NonScalar and non-finite numbers become None.

    pycrdt stores Python ints as floats (JS has one number type, and Yjs writes
    15.0 as the integer 15), so an integral float in the safe range reads as int.
    """
    if isinstance(value, NonScalar):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
            return int(value)
    return value


def materialize(state: RecordState) -> dict[str, object]:
    """``{"fields": {...}}``, plus ``"history": [...]`` for models that keep one, plus
    ``"meta": {...}`` when the server keeps metadata on the record (e.g. back-office locks).

    ``meta`` is left out when empty, so records without metadata read as before.
    """
    out: dict[str, object] = {"fields": {k: json_value(v) for k, v in state.fields.items()}}
    if state.has_history:
        out["history"] = [_materialize_entry(entry) for entry in state.history]
    if state.meta:
        out["meta"] = {k: json_value(v) for k, v in state.meta.items()}
    return out


def _materialize_entry(entry: HistoryEntry) -> dict[str, object] | None:
    if isinstance(entry, NonScalar):
        return None
    return {key: json_value(value) for key, value in entry.items()}
