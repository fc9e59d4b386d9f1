"""Attendance: a person's punch-in/punch-out for one day, verified by the back office.

Rules, after the shared type and meta checks:

- **Server wins.** A device never changes a server-owned field (``verified``,
  ``verifiedby``, ``approval``), nor a field the back office has set: when the back
  office changes a field, the server records a lock in ``meta``
  (``"lock.<field>": "<back-office user>"``), and a later device change of that field
  is put back. The back office may change anything, subject to the checks below.
- **GPS sanity.** A punch position (``lat_in``/``lon_in``, ``lat_out``/``lon_out``)
  is a place on Earth and, when the record's bu has a geofence
  (``Context.settings.geofences``), inside it; a bad position goes back as a pair
  (the punch time stays). ``accuracy`` is >= 0 and at most ``settings.max_accuracy_m``.
- **Punch times.** Not later than the server's clock plus ``settings.clock_skew``;
  punch-out after punch-in.

A refused punch time or ``accuracy`` (or a value of the wrong type) goes back to the
last acceptable one the same merge wrote before it (a device's updates pushed together,
or delivered out of order), else to the record's. A refused position always goes back
to the record's: each field's writes are known, not which ``lat`` came with which ``lon``.
"""

from __future__ import annotations

from crdt_models import rules_common as common
from crdt_models.constraints import Context, Correction, Origin
from crdt_models.record import RecordState
from crdt_models.schema import Field, FieldType, Rule, build_model

NAME = "attendance"

LOCK_PREFIX = "lock."

PUNCHIN = Field("punchintime", FieldType.DATETIME)
PUNCHOUT = Field("punchouttime", FieldType.DATETIME)
LAT_IN, LON_IN = Field("lat_in", FieldType.NUMBER), Field("lon_in", FieldType.NUMBER)
LAT_OUT, LON_OUT = Field("lat_out", FieldType.NUMBER), Field("lon_out", FieldType.NUMBER)
ACCURACY = Field("accuracy", FieldType.NUMBER, minimum=0, unit="metres")

FIELDS = (
    Field("people", FieldType.REF),
    Field("datefor", FieldType.DATE),
    PUNCHIN,
    PUNCHOUT,
    LAT_IN,
    LON_IN,
    LAT_OUT,
    LON_OUT,
    ACCURACY,
    Field("shift", FieldType.REF),
    common.REMARKS,
    Field("verified", FieldType.BOOL, server_owned=True),
    Field("verifiedby", FieldType.REF, server_owned=True),
    Field("approval", FieldType.STRING, server_owned=True),
)

RULE_SERVER_OWNED = "attendance.server_owned"
RULE_LOCKED = "attendance.backoffice_lock"
RULE_POSITION = "attendance.position"
RULE_ACCURACY = "attendance.accuracy"
RULE_FUTURE = "attendance.punch_not_in_future"
RULE_ORDER = "attendance.punchout_after_punchin"


def lock_key(field: str) -> str:
    """The ``meta`` key that marks ``field`` as set by the back office."""
    return LOCK_PREFIX + field


def locked_by(state: RecordState | None, field: str) -> str | None:
    """Who in the back office locked ``field`` (None: not locked)."""
    if state is None or lock_key(field) not in state.meta:
        return None
    who = state.meta[lock_key(field)]
    return who if isinstance(who, str) else "the back office"


def server_wins(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
    """A device's change of a server-owned or back-office-locked field is put back."""
    if ctx.origin is not Origin.DEVICE:
        return []
    found: list[Correction | None] = []
    for field in FIELDS:
        if not common.changed(before, after, field.name):
            continue
        who = locked_by(before, field.name)
        if field.server_owned:
            reason = f"{field.name} is set by the back office only; a device cannot change it"
            found.append(common.restore(RULE_SERVER_OWNED, field, before, after, reason))
        elif who is not None:
            reason = (
                f"{field.name} was corrected by the back office ({who});"
                " a device cannot overwrite it"
            )
            found.append(common.restore(RULE_LOCKED, field, before, after, reason))
    return common.restored(found)


def accuracy_within_limit(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """A changed GPS accuracy is within ``settings.max_accuracy_m``."""
    accuracy = common.number_of(after, ACCURACY.name)
    limit = ctx.settings.max_accuracy_m
    if accuracy is None or accuracy <= limit or not common.changed(before, after, ACCURACY.name):
        return []
    reason = (
        f"accuracy {common.shown(accuracy)} m is too coarse; punches need a GPS fix"
        f" within {common.shown(limit)} m"
    )

    def ok(earlier: object) -> bool:
        return isinstance(earlier, (int, float)) and earlier <= limit

    return common.restored(
        [common.restore(RULE_ACCURACY, ACCURACY, before, after, reason, ctx, ok)]
    )


def punch_time_ok(value: object, ctx: Context) -> bool:
    """What a punch time must be besides in order: not in the future."""
    return not common.in_future(value, ctx)


def record_locks(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
    """The fields the back office changed (net of repairs) are locked against devices."""
    if ctx.origin is not Origin.BACKOFFICE:
        return []
    found: list[Correction] = []
    for field in FIELDS:
        if field.server_owned or not common.changed(before, after, field.name):
            continue
        reason = f"{field.name} set by the back office ({ctx.user}); devices cannot change it now"
        key = lock_key(field.name)
        found.append(
            Correction(
                RULE_LOCKED, key, after.meta.get(key), ctx.user, reason, "meta_set", is_repair=False
            )
        )
    return found


RULES: tuple[Rule, ...] = (
    *common.base_rules(FIELDS),
    server_wins,
    common.coordinates(RULE_POSITION, LAT_IN, LON_IN, geofenced=True),
    common.coordinates(RULE_POSITION, LAT_OUT, LON_OUT, geofenced=True),
    accuracy_within_limit,
    common.not_in_future(RULE_FUTURE, PUNCHIN),
    common.not_in_future(RULE_FUTURE, PUNCHOUT),
    common.ordered_times(RULE_ORDER, PUNCHIN, PUNCHOUT, strict=True, accept=punch_time_ok),
    record_locks,
)

MODEL = build_model(NAME, FIELDS, RULES)
