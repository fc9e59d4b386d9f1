"""Rules, rule builders and field declarations every domain shares.

``base_rules`` open every domain's rule list: ``check_types`` makes sure the later,
business rules only ever see known fields holding values of the right type, and
``protect_meta`` keeps the server's metadata map out of devices' hands.

Business rules judge *changes*: they compare ``after`` with ``before`` and refuse a
change by restoring the value ``before`` had (``restore``). A value nobody changed
is never repaired by them, so evaluating a state against itself finds nothing, and
the server's own repairs never trigger further repairs (no ping-pong).

One merge may integrate several updates of a device (queued offline and pushed
together, or delivered out of order: the later ones wait for the one that lets them
in). Delivered one at a time, a value the device wrote before the refused one would
have stood when it was refused; so a refusal puts back the last value this merge
wrote that the rule accepts, if there is one, rather than ``before``'s
(``written_before``; ``check_types``, ``ordered_times``, ``not_in_future``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from crdt_models.constraints import Context, Correction, apply_to_state, same_value
from crdt_models.record import MAX_SAFE_INTEGER, NonScalar, RecordState
from crdt_models.schema import Field, FieldType, Rule
from crdt_models.values import describe, problem

RULE_UNKNOWN_FIELD = "schema.unknown_field"
RULE_TYPE = "schema.type"
RULE_META = "record.meta_protected"

PRIORITIES = frozenset({"LOW", "MEDIUM", "HIGH"})

PRIORITY = Field("priority", FieldType.ENUM, choices=PRIORITIES)
GRACETIME = Field("gracetime", FieldType.INT, minimum=0, unit="minutes")
PLANDATETIME = Field("plandatetime", FieldType.DATETIME)
EXPIRYDATETIME = Field("expirydatetime", FieldType.DATETIME)
LAT = Field("lat", FieldType.NUMBER)
LON = Field("lon", FieldType.NUMBER)
REMARKS = Field("remarks", FieldType.STRING)

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG), for great-circle distances."""

_ABSENT = object()


# --- reading states --------------------------------------------------------------


def value_of(state: RecordState | None, name: str) -> object:
    """A field's value; None when the field (or the whole record) is absent."""
    return None if state is None else state.fields.get(name)


def changed(before: RecordState | None, after: RecordState, name: str) -> bool:
    """Did this merge change the field? An absent field counts as null."""
    return not same_value(value_of(before, name), value_of(after, name))


def time_of(state: RecordState | None, name: str) -> datetime | None:
    """A DATETIME field as an aware datetime; None if absent, null or not a valid time."""
    return as_time(value_of(state, name))


def as_time(raw: object) -> datetime | None:
    """A DATETIME value as an aware datetime; None if null or not a valid time."""
    if not isinstance(raw, str):
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def number_of(state: RecordState | None, name: str) -> float | None:
    """A NUMBER/INT field as a float; None if absent, null or not a finite number."""
    raw = value_of(state, name)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return float(raw) if math.isfinite(raw) else None


def iso_utc(moment: datetime) -> str:
    """``2024-05-01T12:00:00.000Z``: UTC, milliseconds, "Z" (as JS ``toISOString()`` writes)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shown(value: object) -> str:
    """A value inside a reason: enum words, times and numbers as they are, others described."""
    if value is None:
        return "no value"
    if isinstance(value, str) and value and len(value) <= 40 and " " not in value:
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
        return str(int(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return describe(value)


# --- repairing -------------------------------------------------------------------


def restore(
    rule: str,
    field: Field,
    before: RecordState | None,
    current: RecordState,
    reason: str,
    ctx: Context | None = None,
    ok: Callable[[object], bool] | None = None,
) -> Correction | None:
    """Put the field back as ``before`` had it (removed if it had no valid value there).

    Given ``ctx`` and ``ok`` (the values the refusing rule accepts): back to the last
    value this merge wrote that ``ok`` accepts instead, if any (``written_before``).
    None when ``current`` already holds the value, so a rule never re-writes a value an
    earlier rule (or nobody) changed.
    """
    name = field.name
    target = _ABSENT if before is None else before.fields.get(name, _ABSENT)
    if target is not _ABSENT and problem(field, target) is not None:
        target = _ABSENT
    earlier = _ABSENT if ctx is None or ok is None else written_before(field, ctx, ok)
    if earlier is not _ABSENT:
        target, reason = earlier, f"{reason}; kept {shown(earlier)}, the value it wrote before it"
    rejected = current.fields.get(name)
    if target is _ABSENT:
        if name not in current.fields:
            return None
        return Correction(rule, name, rejected, None, reason, "delete")
    if name in current.fields and same_value(current.fields[name], target):
        return None
    return Correction(rule, name, rejected, target, reason, "set")


def written_before(
    field: Field, ctx: Context, ok: Callable[[object], bool] | None = None
) -> object:
    """The last value (not null) this merge wrote to ``field`` that is valid for it and that
    ``ok`` accepts; ``_ABSENT`` if none (or the merge wrote through the server).

    Delivered one update at a time it would have stood when a later value was refused.
    Only a refusing rule asks (parsing the updates costs), with everything it checks in
    ``ok``, so the value it puts back is one it would have accepted.
    """
    if ctx.written is None:
        return _ABSENT

    def wanted(value: object) -> bool:
        return value is not None and problem(field, value) is None and (ok is None or ok(value))

    found = ctx.written.last_for_field(field.name, wanted)
    return found[0] if found else _ABSENT


def restored(corrections: Iterable[Correction | None]) -> list[Correction]:
    """The corrections that are needed (``restore`` answers None for no-ops)."""
    return [c for c in corrections if c is not None]


# --- base rules: types and meta --------------------------------------------------


def base_rules(fields: Iterable[Field]) -> tuple[Rule, ...]:
    """The rules every domain starts with: ``check_types`` for its fields, ``protect_meta``."""
    return (check_types(fields), protect_meta)


def check_types(fields: Iterable[Field]) -> Rule:
    """The type-check rule for a model with these fields.

    Unknown field -> deleted. Wrong type or out of range -> the last valid value this
    merge wrote before it (``written_before``), else the value ``before`` had, if that
    was valid, else deleted. (A factory, because a rule sees only ``(before, after,
    context)`` and must know the model's fields.)
    """
    by_name = {field.name: field for field in fields}

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        found = (_check(by_name, before, name, value, ctx) for name, value in after.fields.items())
        return [correction for correction in found if correction is not None]

    rule.__name__ = rule.__qualname__ = "check_types"
    return rule


def _check(
    fields: Mapping[str, Field],
    before: RecordState | None,
    name: str,
    value: object,
    ctx: Context,
) -> Correction | None:
    field = fields.get(name)
    if field is None:
        reason = f"{name} is not a field of this record; it was removed"
        return Correction(RULE_UNKNOWN_FIELD, name, value, None, reason, "delete")
    wrong = problem(field, value)
    if wrong is None:
        return None
    earlier = written_before(field, ctx)
    if earlier is not _ABSENT:
        reason = f"{wrong}; kept {describe(earlier)}, the value it wrote before it"
        return Correction(RULE_TYPE, name, value, earlier, reason, "set")
    previous = before.fields.get(name, _ABSENT) if before is not None else _ABSENT
    if previous is not _ABSENT and problem(field, previous) is None:
        reason = f"{wrong}; kept the previous value, {describe(previous)}"
        return Correction(RULE_TYPE, name, value, previous, reason, "set")
    return Correction(RULE_TYPE, name, value, None, f"{wrong}; the value was removed", "delete")


def protect_meta(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
    """Only the server writes ``meta`` (through compensations): any other change is undone."""
    old = {} if before is None else before.meta
    found: list[Correction] = []
    for key in sorted(set(old) | set(after.meta)):
        if key in old and key in after.meta and same_value(old[key], after.meta[key]):
            continue
        reason = f"meta.{key} is kept by the server; records' metadata cannot be edited"
        rejected = after.meta.get(key)
        kept = old.get(key, _ABSENT)
        if kept is _ABSENT or isinstance(kept, NonScalar):
            found.append(Correction(RULE_META, key, rejected, None, reason, "meta_delete"))
        else:
            found.append(Correction(RULE_META, key, rejected, kept, reason, "meta_set"))
    return found


# --- rule builders ---------------------------------------------------------------


@dataclass(frozen=True)
class StatusFlow:
    """A status field that only moves forward.

    A status may move to one of equal or higher ``rank`` (statuses of one rank are
    interchangeable: a technician pauses and resumes); a ``terminal`` status never
    changes; a status is never cleared once set. A record without a status may take
    any. The server sees only the net change of an offline device, so "forward" is
    by rank, not step by step (ASSIGNED -> COMPLETED is a forward move).
    """

    field: Field
    ranks: Mapping[str, int]
    terminal: frozenset[str]

    def allows(self, old: object, new: object) -> bool:
        if old is None or not isinstance(old, str) or old not in self.ranks:
            return True
        if old in self.terminal:
            return new == old
        return isinstance(new, str) and self.ranks.get(new, -1) >= self.ranks[old]

    def why_not(self, old: object, new: object) -> str:
        name = self.field.name
        if new is None:
            return f"{name} cannot be cleared once set; it stays {shown(old)}"
        if old in self.terminal:
            return f"{name} {shown(old)} is final; it cannot change to {shown(new)}"
        return f"{name} only moves forward: {shown(old)} cannot go back to {shown(new)}"

    def beats(self, new: object, current: object) -> bool:
        """Is ``new`` a status further along than ``current`` (which may be none)?"""
        if not isinstance(new, str) or new not in self.ranks:
            return False
        if not isinstance(current, str) or current not in self.ranks:
            return True
        return current not in self.terminal and self.ranks[new] > self.ranks[current]

    def why_kept(self, hidden: object, current: object) -> str:
        name = self.field.name
        return (
            f"{name} {shown(hidden)} from this merge was hidden by a concurrent"
            f" {shown(current)}; {name} only moves forward, so {shown(hidden)} stays"
        )


def keep_hidden_advance(
    rule_name: str,
    field: Field,
    beats: Callable[[object, object], bool],
    why: Callable[[object, object], str],
    choices: Iterable[str] | None = None,
) -> Rule:
    """Put back a value this merge wrote that a concurrent write hid, if it ``beats`` the
    value that won (``crdt_models.written`` says why Yjs hides it).

    It goes right after the type checks, so the rules after it judge the kept value
    exactly as if it had won the merge (a value the writer may not set is undone).
    ``beats`` must accept only values the field's type allows. ``choices``: the field's
    values when they are a fixed set of words (a status): only those that beat the
    current one are looked for, and none at all when nothing can beat it.
    """
    words = None if choices is None else tuple(choices)

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        if ctx.written is None:
            return []
        current = value_of(after, field.name)
        ahead = None if words is None else [w for w in words if beats(w, current)]
        if ahead == []:
            return []
        best: object = None
        for value in ctx.written.for_field(field.name, lambda v: beats(v, current), ahead):
            if best is None or beats(value, best):
                best = value
        if best is None:
            return []
        return [Correction(rule_name, field.name, current, best, why(best, current))]

    rule.__name__ = rule.__qualname__ = f"keep_hidden_advance_{field.name}"
    return rule


def forward_only(rule_name: str, flow: StatusFlow) -> Rule:
    """Refuse a status change the flow does not allow: the status goes back to ``before``'s."""

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        name = flow.field.name
        old, new = value_of(before, name), value_of(after, name)
        if not changed(before, after, name) or flow.allows(old, new):
            return []
        return restored([restore(rule_name, flow.field, before, after, flow.why_not(old, new))])

    rule.__name__ = rule.__qualname__ = f"forward_only_{flow.field.name}"
    return rule


def ordered_times(
    rule_name: str,
    first: Field,
    second: Field,
    *,
    strict: bool = False,
    accept: Callable[[object, Context], bool] | None = None,
) -> Rule:
    """``second`` is not before ``first`` (``strict``: after it), when both are set.

    A change that breaks the order is refused: the later time (``second``) goes back
    first; if the order still fails, ``first`` goes back too (to ``before``'s pair,
    which was in order). Each goes back to the last time this merge wrote for it that
    is in order (and that ``accept``, the model's other checks of these times, accepts),
    else to ``before``'s. A record's times that nobody changed are left alone.
    """
    word = "is not after" if strict else "is before"

    def ordered(a_raw: object, b_raw: object) -> bool:
        a, b = as_time(a_raw), as_time(b_raw)
        return a is None or b is None or (b > a if strict else b >= a)

    def in_order(state: RecordState) -> bool:
        return ordered(value_of(state, first.name), value_of(state, second.name))

    def fits(state: RecordState, field: Field, ctx: Context) -> Callable[[object], bool]:
        """Would ``field`` holding the value be in order with the other time of ``state``?"""

        def ok(value: object) -> bool:
            a = value if field is first else value_of(state, first.name)
            b = value if field is second else value_of(state, second.name)
            return ordered(a, b) and (accept is None or accept(value, ctx))

        return ok

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        if in_order(after):
            return []
        a, b = value_of(after, first.name), value_of(after, second.name)
        reason = f"{second.name} {shown(b)} {word} {first.name} {shown(a)}"
        found: list[Correction] = []
        state = after
        for field in (second, first):
            if in_order(state) or not changed(before, after, field.name):
                continue
            fix = restore(rule_name, field, before, state, reason, ctx, fits(state, field, ctx))
            if fix is not None:
                found.append(fix)
                state = apply_to_state(state, [fix])
        return found

    rule.__name__ = rule.__qualname__ = f"ordered_{first.name}_{second.name}"
    return rule


def in_future(value: object, ctx: Context) -> bool:
    """Is ``value`` a time more than ``settings.clock_skew`` ahead of the server's clock?"""
    moment = as_time(value)
    return moment is not None and moment > ctx.now + ctx.settings.clock_skew


def not_in_future(rule_name: str, field: Field) -> Rule:
    """A changed time may be at most ``settings.clock_skew`` ahead of the server's clock;
    a later one goes back to the last time this merge wrote that is not, else ``before``'s."""

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        value = value_of(after, field.name)
        if not in_future(value, ctx) or not changed(before, after, field.name):
            return []
        skew = ctx.settings.clock_skew
        reason = (
            f"{field.name} {shown(value)} is in the future "
            f"(server time {iso_utc(ctx.now)}, allowing {_minutes(skew.total_seconds())})"
        )

        def ok(earlier: object) -> bool:
            return not in_future(earlier, ctx)

        return restored([restore(rule_name, field, before, after, reason, ctx, ok)])

    rule.__name__ = rule.__qualname__ = f"not_in_future_{field.name}"
    return rule


def coordinates(rule_name: str, lat: Field, lon: Field, *, geofenced: bool = False) -> Rule:
    """A changed (lat, lon) pair must be a place on Earth (and inside the bu's geofence).

    A bad pair is refused as a whole: both go back to ``before``'s values, so a
    position is never half old, half new. Other fields (e.g. the punch time) stay.
    """

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        if not (changed(before, after, lat.name) or changed(before, after, lon.name)):
            return []
        reason = _position_problem(after, lat, lon, ctx if geofenced else None)
        if reason is None:
            return []
        fixes = (restore(rule_name, field, before, after, reason) for field in (lat, lon))
        return restored(fixes)

    rule.__name__ = rule.__qualname__ = f"coordinates_{lat.name}_{lon.name}"
    return rule


def _position_problem(
    state: RecordState, lat: Field, lon: Field, ctx: Context | None
) -> str | None:
    la, lo = number_of(state, lat.name), number_of(state, lon.name)
    if la is not None and not -90 <= la <= 90:
        return f"{lat.name} must be between -90 and 90 degrees; got {shown(la)}"
    if lo is not None and not -180 <= lo <= 180:
        return f"{lon.name} must be between -180 and 180 degrees; got {shown(lo)}"
    fence = None if ctx is None else ctx.geofence
    if ctx is None or fence is None or la is None or lo is None:
        return None
    distance = distance_m(la, lo, fence.lat, fence.lon)
    if distance <= fence.radius_m:
        return None
    return (
        f"({lat.name}, {lon.name}) = ({shown(la)}, {shown(lo)}) is {distance:,.0f} m from the"
        f" site of bu {ctx.bu}; it must be within {fence.radius_m:,.0f} m"
    )


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle (haversine) distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _minutes(seconds: float) -> str:
    minutes = seconds / 60
    text = f"{minutes:g}"
    return f"{text} minute{'' if text == '1' else 's'} of clock skew"
