"""Helpers for the test_rules_* files (this module holds no tests).

- builders: ``ctx``, ``state``, ``doc_of`` (a doc holding a state), ``merge``
  (the server's merge, as ``server/pipeline.py`` runs it);
- an independent oracle of what a valid server state is (``violations``) and of
  which moves between two server states the rules allow (``transition_problems``),
  written from DESIGN.md, not from the rules' code;
- value pools mixing valid and invalid values, and hypothesis strategies over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st
from pycrdt import Array, Doc, Map

from crdt_models import constraints, record, registry
from crdt_models.constraints import Context, Correction, Geofence, Origin, RuleSettings
from crdt_models.record import HistoryEntry, NonScalar, RecordState
from crdt_models.schema import DomainModel
from crdt_models.values import problem
from crdt_models.written import WrittenValues
from crdt_models.yupdate import inspect_state_vector

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
BU = "bu1"
SITE = Geofence(lat=12.9716, lon=77.5946, radius_m=500)
INSIDE = (12.9720, 77.5950)  # ~60 m from SITE
OUTSIDE = (12.9900, 77.5946)  # ~2 km from SITE
SETTINGS = RuleSettings(geofences={BU: SITE}, max_accuracy_m=50)

DOMAINS = ("activity", "attendance", "helpdesk", "work-orders")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def at(minutes: float) -> str:
    """NOW + minutes, as a record stores a time."""
    return iso(NOW + timedelta(minutes=minutes))


def ctx(
    origin: Origin = Origin.DEVICE,
    roles: Sequence[str] = (),
    user: str = "u1",
    *,
    bu: str | None = BU,
    settings: RuleSettings = SETTINGS,
    now: datetime = NOW,
) -> Context:
    device = "dev-1" if origin is Origin.DEVICE else None
    return Context(user, frozenset(roles), device, origin, now, bu=bu, settings=settings)


DEVICE = ctx()
BACKOFFICE = ctx(Origin.BACKOFFICE, user="bo1")
SERVER = ctx(Origin.SERVER, user="fieldsync")


def state(
    fields: Mapping[str, object] | None = None,
    *,
    meta: Mapping[str, object] | None = None,
    history: Sequence[Any] = (),
    has_history: bool = False,
    **more: object,
) -> RecordState:
    values = {**(fields or {}), **more}
    return RecordState(values, tuple(history), has_history or bool(history), dict(meta or {}))


def model(name: str) -> DomainModel:
    return registry.get_model(name)


def evaluate(
    name: str, before: RecordState | None, after: RecordState, context: Context = DEVICE
) -> list[Correction]:
    return constraints.evaluate(model(name), before, after, context)


def repaired(
    name: str, before: RecordState | None, after: RecordState, context: Context = DEVICE
) -> RecordState:
    return constraints.apply_to_state(after, evaluate(name, before, after, context))


def by_field(corrections: Sequence[Correction]) -> dict[str, Correction]:
    found = {c.field: c for c in corrections if c.action in ("set", "delete")}
    assert len(found) == len([c for c in corrections if c.action in ("set", "delete")])
    return found


def comparable(s: RecordState) -> dict[str, Any]:
    """A state as JSON shows it (history entries and meta included)."""
    out = record.materialize(s)
    out["meta"] = {k: record.json_value(v) for k, v in s.meta.items()}
    out.setdefault("history", [])
    return out


# --- docs ------------------------------------------------------------------------

NESTED = NonScalar("map")
"""In doc-level tests: write a nested Y.Map (a hostile value) instead of a scalar."""
DELETE = object()
"""In doc-level tests: delete the key."""


def put(ymap: Map[Any], key: str, value: object) -> None:
    if value is DELETE:
        if key in ymap:
            del ymap[key]
    elif isinstance(value, NonScalar):
        ymap[key] = Map({"a": Map({"b": 1})})
    else:
        ymap[key] = value


def doc_of(s: RecordState, client_id: int | None = None) -> Doc[Any]:
    """A doc holding the state (NonScalar values become nested maps)."""
    doc = record.new_doc(client_id)
    with doc.transaction():
        fields = doc.get(record.FIELDS_ROOT, type=Map)
        for key, value in s.fields.items():
            put(fields, key, value)
        meta = doc.get(record.META_ROOT, type=Map)
        for key, value in s.meta.items():
            put(meta, key, value)
        history = doc.get(record.HISTORY_ROOT, type=Array)
        for entry in s.history:
            history.append("junk" if isinstance(entry, NonScalar) else Map(dict(entry)))
    return doc


def replica(doc: Doc[Any], client_id: int) -> Doc[Any]:
    copy = record.new_doc(client_id)
    copy.apply_update(doc.get_update())
    return copy


def edit(doc: Doc[Any], change: Callable[[Doc[Any]], None]) -> bytes:
    """Run ``change`` in one transaction; the update it made."""
    since = doc.get_state()
    with doc.transaction():
        change(doc)
    return doc.get_update(since)


@dataclass
class Merged:
    """What one server merge did."""

    before: RecordState | None
    after: RecordState
    corrections: list[Correction]
    repaired: RecordState
    compensation: bytes | None
    compensation_updates: int = 0
    extra: list[bytes] = field(default_factory=list)


def merge(
    server: Doc[Any], name: str, before: RecordState | None, update: bytes, context: Context
) -> Merged:
    """The server's merge: apply, read, evaluate (seeing what the update wrote, hidden
    values included), compensate in one transaction, read again."""
    return merge_together(server, name, before, [update], context)


def merge_together(
    server: Doc[Any],
    name: str,
    before: RecordState | None,
    updates: Sequence[bytes],
    context: Context,
) -> Merged:
    """One merge of several updates, as when later ones arrive first and wait (``pending``)
    for the one that lets them in, or a device's queued updates arrive in one push."""
    since = inspect_state_vector(server.get_state())
    for update in updates:
        server.apply_update(update)
    now = inspect_state_vector(server.get_state())
    written = WrittenValues(server, list(updates), since, now)
    return constrain(server, name, before, replace(context, written=written))


def merged_at_once(
    name: str, before: RecordState, writes: Sequence[Mapping[str, object]], context: Context
) -> Merged:
    """A phone makes ``writes`` on ``before``, each its own update; the server merges them
    all at once, as a queue of updates merged into one (``Y.mergeUpdates`` keeps the values
    later ones overwrote) or updates delivered out of order (see test_hidden_writes)."""
    server = replica(doc_of(before, client_id=1), 2)
    phone = replica(server, 100)
    updates: list[bytes] = []
    for values in writes:
        since = phone.get_state()
        with phone.transaction():
            phone.get(record.FIELDS_ROOT, type=Map).update(values)
        updates.append(phone.get_update(since))
    return merge_together(server, name, before, updates, context)


def constrain(server: Doc[Any], name: str, before: RecordState | None, context: Context) -> Merged:
    domain = model(name)
    after = record.read_state(server, domain)
    corrections = constraints.evaluate(domain, before, after, context)
    updates: list[bytes] = []
    subscription = server.observe(lambda event: updates.append(event.update))
    constraints.compensate(server, corrections)
    server.unobserve(subscription)
    compensation = updates[0] if updates else None
    now_state = record.read_state(server, domain)
    return Merged(before, after, corrections, now_state, compensation, len(updates))


# --- the oracle: valid server states and allowed moves ---------------------------

_OPEN_ACTIVITY = {
    "INPROGRESS",
    "WORKING",
    "STANDBY",
    "PARTIALLYCOMPLETED",
    "COMPLETED",
    "AUTOCLOSED",
}
ACTIVITY_NEXT = {
    "ASSIGNED": {"ASSIGNED", *_OPEN_ACTIVITY},
    "INPROGRESS": _OPEN_ACTIVITY,
    "WORKING": _OPEN_ACTIVITY,
    "STANDBY": _OPEN_ACTIVITY,
    "PARTIALLYCOMPLETED": {"PARTIALLYCOMPLETED", "COMPLETED", "AUTOCLOSED"},
    "COMPLETED": {"COMPLETED"},
    "AUTOCLOSED": {"AUTOCLOSED"},
}
"""Where jobstatus may go (AUTOCLOSED: by the server's own jobs only)."""
WORK_NEXT = {
    "ASSIGNED": {"ASSIGNED", "INPROGRESS", "COMPLETED", "CANCELLED"},
    "INPROGRESS": {"INPROGRESS", "COMPLETED", "CANCELLED"},
    "COMPLETED": {"COMPLETED"},
    "CANCELLED": {"CANCELLED"},
}
TRACKED = ("status", "level", "priority", "assignedtopeople", "assignedtogroup")
ENTRY_KEYS = {"when", "who", "action", "field", "from", "to"}
OWNED = ("verified", "verifiedby", "approval")


def _time(s: RecordState, name: str) -> datetime | None:
    value = s.fields.get(name)
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _num(s: RecordState | None, name: str) -> float | None:
    value = None if s is None else s.fields.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _get(s: RecordState | None, name: str) -> object:
    return None if s is None else s.fields.get(name)


def _out_of_order(s: RecordState, first: str, second: str, strict: bool = False) -> bool:
    a, b = _time(s, first), _time(s, second)
    return a is not None and b is not None and (b <= a if strict else b < a)


def _bad_position(s: RecordState, lat: str, lon: str, context: Context | None) -> bool:
    la, lo = _num(s, lat), _num(s, lon)
    if (la is not None and abs(la) > 90) or (lo is not None and abs(lo) > 180):
        return True
    fence = (
        None
        if context is None or context.bu is None
        else context.settings.geofences.get(context.bu)
    )
    if fence is None or la is None or lo is None:
        return False
    return _haversine(la, lo, fence.lat, fence.lon) > fence.radius_m


def _haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(h))


def violations(name: str, s: RecordState, context: Context) -> list[str]:
    """What is wrong with a server state (empty: valid). ``context`` gives settings, bu, now."""
    found: list[str] = []
    fields = model(name).fields
    for key, value in s.fields.items():
        if key not in fields or problem(fields[key], value) is not None:
            found.append(f"bad field {key}={value!r}")
    found += [f"bad meta {k}" for k, v in s.meta.items() if isinstance(v, NonScalar)]
    if name in ("activity", "work-orders"):
        if _out_of_order(s, "plandatetime", "expirydatetime"):
            found.append("expiry before plan")
        if _bad_position(s, "lat", "lon", None):
            found.append("lat/lon off Earth")
    if name == "activity" and _out_of_order(s, "starttime", "endtime"):
        found.append("end before start")
    if name == "attendance":
        found += _attendance_violations(s, context)
    if name == "helpdesk":
        found += _helpdesk_violations(s)
    return found


def _attendance_violations(s: RecordState, context: Context) -> list[str]:
    found = []
    for lat, lon in (("lat_in", "lon_in"), ("lat_out", "lon_out")):
        if _bad_position(s, lat, lon, context):
            found.append(f"bad position {lat}/{lon}")
    accuracy = _num(s, "accuracy")
    if accuracy is not None and not 0 <= accuracy <= context.settings.max_accuracy_m:
        found.append("accuracy")
    if _out_of_order(s, "punchintime", "punchouttime", strict=True):
        found.append("punch-out not after punch-in")
    return found


def _helpdesk_violations(s: RecordState) -> list[str]:
    found = []
    level = _num(s, "level") or 0
    escalated = s.fields.get("isescalated")
    if (escalated is True) != (level > 0) or escalated not in (None, True, False):
        found.append(f"isescalated {escalated!r} with level {level}")
    for entry in s.history:
        if isinstance(entry, NonScalar) or set(entry) != ENTRY_KEYS:
            found.append(f"bad history entry {entry!r}")
    return found


def _moved(before: RecordState | None, after: RecordState, name: str) -> bool:
    return not constraints.same_value(_get(before, name), _get(after, name))


def transition_problems(
    name: str, before: RecordState | None, after: RecordState, context: Context
) -> list[str]:
    """What the move from server state ``before`` to ``after`` (by ``context``) must not do."""
    checks = {
        "activity": _activity_moves,
        "work-orders": _work_moves,
        "attendance": _attendance_moves,
        "helpdesk": _helpdesk_moves,
    }
    found = checks[name](before, after, context)
    meta_moved = before is not None and dict(before.meta) != dict(after.meta)
    if context.origin is not Origin.BACKOFFICE and meta_moved:
        assert before is not None
        found.append(f"meta changed by {context.origin}: {before.meta} -> {after.meta}")
    return found


def _status_moves(
    before: RecordState | None, after: RecordState, key: str, table: dict[str, set[str]]
) -> list[str]:
    old, new = _get(before, key), _get(after, key)
    if isinstance(old, str) and old in table and new not in table[old]:
        return [f"{key} {old} -> {new}"]
    return []


def _activity_moves(before: RecordState | None, after: RecordState, c: Context) -> list[str]:
    found = _status_moves(before, after, "jobstatus", ACTIVITY_NEXT)
    new = _get(after, "jobstatus")
    if new == "AUTOCLOSED" and _moved(before, after, "jobstatus") and c.origin is not Origin.SERVER:
        found.append(f"AUTOCLOSED set by {c.origin}")
    return found


def _required(permit: object) -> bool:
    return permit is not None and permit != "NOT_REQUIRED"


def _work_moves(before: RecordState | None, after: RecordState, c: Context) -> list[str]:
    found = _status_moves(before, after, "workstatus", WORK_NEXT)
    old_p, new_p = _get(before, "workpermit"), _get(after, "workpermit")
    trusted = c.origin is Origin.SERVER or "approver" in c.roles
    decided = {"APPROVED", "REJECTED"}
    deciding = new_p in decided or old_p in decided or (_required(old_p) and not _required(new_p))
    if _moved(before, after, "workpermit") and not trusted and deciding:
        found.append(f"permit {old_p} -> {new_p} without approver")
    started = {"INPROGRESS", "COMPLETED"}
    old_s, new_s = _get(before, "workstatus"), _get(after, "workstatus")
    if new_s in started and old_s not in started and _required(new_p) and new_p != "APPROVED":
        found.append(f"started ({old_s} -> {new_s}) with permit {new_p}")
    return found


def _attendance_moves(before: RecordState | None, after: RecordState, c: Context) -> list[str]:
    found = []
    for key in model("attendance").fields:
        if not _moved(before, after, key):
            continue
        locked = before is not None and f"lock.{key}" in before.meta
        if c.origin is Origin.DEVICE and (key in OWNED or locked):
            found.append(f"device changed {key}")
        unlocked = after.meta.get(f"lock.{key}") != c.user
        if c.origin is Origin.BACKOFFICE and key not in OWNED and unlocked:
            found.append(f"back office changed {key} without a lock")
    return found


def _helpdesk_moves(before: RecordState | None, after: RecordState, c: Context) -> list[str]:
    found = []
    lowering = c.origin is Origin.SERVER or (
        c.origin is Origin.BACKOFFICE and "supervisor" in c.roles
    )
    if (_num(after, "level") or 0) < (_num(before, "level") or 0) and not lowering:
        found.append(f"level dropped by {c.origin} {sorted(c.roles)}")
    old = [entry_dict(e) for e in (before.history if before is not None else ())]
    new = [entry_dict(e) for e in after.history]
    if new[: len(old)] != old:
        found.append("history was not kept")
    action = "create" if before is None else "change"
    expected = [
        (f, action, _plain(_get(before, f)), _plain(_get(after, f)))
        for f in TRACKED
        if _moved(before, after, f)
    ]
    added = [(e.get("field"), e.get("action"), e.get("from"), e.get("to")) for e in new[len(old) :]]
    if [(f, a, _plain(x), _plain(y)) for f, a, x, y in added] != expected:
        found.append(f"history entries {added} != changes {expected}")
    when = (
        c.now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{c.now.microsecond // 1000:03d}Z"
    )
    for e in new[len(old) :]:
        if (e.get("who"), e.get("when")) != (c.user, when):
            found.append(f"history entry {e} not by {c.user} at {when}")
    return found


def entry_dict(entry: HistoryEntry) -> dict[str, object]:
    return {"junk": entry.kind} if isinstance(entry, NonScalar) else dict(entry)


def _plain(value: object) -> object:
    return record.json_value(value)


# --- value pools and strategies --------------------------------------------------

TIMES: list[object] = [
    at(-600),
    at(-120),
    at(-60),
    at(-30),
    at(2),
    at(240),
    "yesterday",
    "2024-05-01T08:00:00",
]
GPS: list[object] = [INSIDE[0], INSIDE[1], OUTSIDE[0], 95.0, -200.0, 12.5, 77.0]
STATUS_POOLS: dict[str, dict[str, list[object]]] = {
    "activity": {
        "jobstatus": [*ACTIVITY_NEXT, "DONE", None],
        "starttime": TIMES,
        "endtime": TIMES,
        "plandatetime": TIMES,
        "expirydatetime": TIMES,
        "gracetime": [0, 15, -1, "15m"],
        "priority": ["LOW", "HIGH", "urgent"],
        "jobdesc": ["fix pump", NESTED],
        "assignee": ["p1", 7, ""],
        "lat": GPS,
        "lon": GPS,
        "remarks": ["ok"],
        "colour": ["red"],
    },
    "work-orders": {
        "workstatus": [*WORK_NEXT, "STARTED", None],
        "workpermit": ["NOT_REQUIRED", "APPROVED", "REJECTED", "PARTIALLY_APPROVED", None, "YES"],
        "plandatetime": TIMES,
        "expirydatetime": TIMES,
        "gracetime": [0, 30, -5],
        "priority": ["LOW", "MEDIUM"],
        "description": ["replace valve", NESTED],
        "vendor": ["v1"],
        "performedby": ["p1"],
        "lat": GPS,
        "lon": GPS,
        "remarks": ["ok"],
    },
    "attendance": {
        "punchintime": TIMES,
        "punchouttime": TIMES,
        "lat_in": GPS,
        "lon_in": GPS,
        "lat_out": GPS,
        "lon_out": GPS,
        "accuracy": [5, 20, 49.5, 80, -1, 500],
        "people": ["p1", "p2"],
        "datefor": ["2024-05-01", "01/05/2024"],
        "shift": ["s1"],
        "remarks": ["late bus", NESTED],
        "verified": [True, False, "yes"],
        "verifiedby": ["bo1", "dev"],
        "approval": ["OK", "REJECTED"],
    },
    "helpdesk": {
        "status": ["NEW", "OPEN", "ONHOLD", "RESOLVED", "CLOSED", "CANCELLED", "LOST"],
        "level": [0, 1, 2, 3, -1, 1.5, None],
        "isescalated": [True, False, None, 1],
        "priority": ["LOW", "MEDIUM", "HIGH"],
        "assignedtopeople": ["p1", "p2", 3],
        "assignedtogroup": ["g1", 9],
        "ticketdesc": ["printer jam", NESTED],
        "comments": ["called back"],
    },
}
META_KEYS = ["lock.punchintime", "lock.remarks", "note"]


def pool(name: str) -> dict[str, list[object]]:
    return STATUS_POOLS[name]


def field_changes(name: str, *, nested: bool = True) -> st.SearchStrategy[dict[str, object]]:
    """1-4 fields set (from the pool), deleted (DELETE) or, if ``nested``, nested."""
    values = pool(name)
    keys = sorted(values)

    def one(key: str) -> st.SearchStrategy[object]:
        choices = [v for v in values[key] if nested or not isinstance(v, NonScalar)]
        return st.sampled_from(choices) | st.just(DELETE)

    return st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({k: one(k) for k in chosen})
    )


def apply_changes(s: RecordState, changes: Mapping[str, object]) -> RecordState:
    fields = dict(s.fields)
    for key, value in changes.items():
        if value is DELETE:
            fields.pop(key, None)
        else:
            fields[key] = value
    return RecordState(fields, s.history, s.has_history, s.meta)


def contexts() -> st.SearchStrategy[Context]:
    roles = st.sets(st.sampled_from(["approver", "supervisor", "backoffice"]), max_size=3)
    settings = st.sampled_from([SETTINGS, RuleSettings(), RuleSettings(max_accuracy_m=10)])
    return st.builds(
        ctx,
        origin=st.sampled_from(list(Origin)),
        roles=roles,
        user=st.sampled_from(["u1", "u2", "bo1"]),
        bu=st.sampled_from([BU, "bu2", None]),
        settings=settings,
        now=st.sampled_from([NOW, NOW + timedelta(hours=3), NOW - timedelta(hours=3)]),
    )


def junk_entries() -> st.SearchStrategy[object]:
    return st.sampled_from(
        [
            NonScalar("str"),
            {"when": at(0), "who": "me", "action": "change", "field": "level", "from": 3, "to": 0},
            {"note": "hi"},
            {"to": NonScalar("map")},
        ]
    )


@st.composite
def tampered_history(draw: st.DrawFn, history: Sequence[Any]) -> tuple[Any, ...]:
    """The history after a device's edits: deletes, inserts, alterations."""
    entries = list(history)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["delete", "insert", "alter"]))
        if op == "insert":
            entries.insert(draw(st.integers(0, len(entries))), draw(junk_entries()))
        elif entries and op == "delete":
            del entries[draw(st.integers(0, len(entries) - 1))]
        elif entries:
            i = draw(st.integers(0, len(entries) - 1))
            if not isinstance(entries[i], NonScalar):
                entries[i] = {**entries[i], "to": draw(st.sampled_from(["HACK", 0, True, None]))}
    return tuple(entries)


@st.composite
def tampered_meta(draw: st.DrawFn, meta: Mapping[str, object]) -> dict[str, object]:
    out = dict(meta)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(META_KEYS))
        if draw(st.booleans()):
            out.pop(key, None)
        else:
            out[key] = draw(st.sampled_from(["me", 1, NonScalar("map")]))
    return out
