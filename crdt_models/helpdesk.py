"""Helpdesk tickets, with escalation levels and a server-authored history.

Rules, after the shared type and meta checks:

- **History is the server's.** Devices cannot add, alter or delete ``history``
  entries (``history.protect_history``): what they do to it is undone.
- **Escalation is preserved.** ``level`` never drops through a device merge, whatever
  the device's roles; a back-office user with the ``supervisor`` role may lower it
  (one without may not); the server's own jobs may. An escalation a concurrent
  edit hid in the merge (Yjs keeps the higher client id's value) is put back before
  the other rules run.
- ``isescalated`` always equals ``level > 0`` (empty counts as false). The server
  keeps it so; a device that wrote a wrong value gets a decision, a value that merely
  follows a ``level`` change does not.
- **Ticket history.** Every net change of ``status``, ``level``, ``priority``,
  ``assignedtopeople`` or ``assignedtogroup`` appends a server-authored entry
  (``history.record_history``), after all repairs.
"""

from __future__ import annotations

from crdt_models import rules_common as common
from crdt_models.constraints import Context, Correction, Origin
from crdt_models.history import protect_history, record_history
from crdt_models.record import HISTORY_ROOT, RecordState
from crdt_models.schema import Field, FieldType, Rule, build_model
from crdt_models.values import problem

NAME = "helpdesk"

SUPERVISOR = "supervisor"
STATUSES = frozenset({"NEW", "OPEN", "ONHOLD", "RESOLVED", "CLOSED", "CANCELLED"})

LEVEL = Field("level", FieldType.INT, minimum=0)
ISESCALATED = Field("isescalated", FieldType.BOOL)

FIELDS = (
    Field("ticketdesc", FieldType.STRING),
    common.PRIORITY,
    Field("status", FieldType.ENUM, choices=STATUSES),
    LEVEL,
    ISESCALATED,
    Field("assignedtopeople", FieldType.REF),
    Field("assignedtogroup", FieldType.REF),
    Field("comments", FieldType.STRING),
)

TRACKED = ("status", "level", "priority", "assignedtopeople", "assignedtogroup")

RULE_LEVEL = "helpdesk.level_kept"
RULE_ESCALATED = "helpdesk.isescalated_follows_level"
RULE_HISTORY = "helpdesk.history"


def level_of(state: RecordState | None) -> float:
    """The escalation level; an empty level is 0."""
    return common.number_of(state, LEVEL.name) or 0.0


def level_beats(new: object, current: object) -> bool:
    """Is ``new`` a valid level above ``current`` (an empty level is 0)?"""
    if new is None or isinstance(new, bool) or problem(LEVEL, new) is not None:
        return False
    assert isinstance(new, (int, float))
    return new > (current if isinstance(current, (int, float)) else 0)


def why_level_kept(hidden: object, current: object) -> str:
    return (
        f"an escalation to level {common.shown(hidden)} in this merge was hidden by a"
        f" concurrent level {common.shown(current)}; escalations are never lost"
    )


def may_lower_level(ctx: Context) -> bool:
    if ctx.origin is Origin.SERVER:
        return True
    return ctx.origin is Origin.BACKOFFICE and ctx.has_role(SUPERVISOR)


def level_never_drops(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """A lower ``level`` is put back, unless a supervisor lowers it in the back office."""
    if level_of(after) >= level_of(before) or may_lower_level(ctx):
        return []
    who = (
        "a device" if ctx.origin is Origin.DEVICE else "the back office without the supervisor role"
    )
    reason = (
        f"an escalated ticket's level does not drop; {who} cannot lower it"
        f" ({common.shown(level_of(before))} -> {common.shown(level_of(after))})"
    )
    return common.restored([common.restore(RULE_LEVEL, LEVEL, before, after, reason)])


def isescalated_follows_level(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """``isescalated`` is ``level > 0``; a device that wrote a wrong value is told so."""
    escalated = level_of(after) > 0
    current = common.value_of(after, ISESCALATED.name)
    if (current is True) if escalated else (current is None or current is False):
        return []
    written = common.changed(before, after, ISESCALATED.name)
    reason = (
        f"isescalated follows level: level {common.shown(level_of(after))}"
        f" means isescalated is {str(escalated).lower()}"
    )
    return [
        Correction(RULE_ESCALATED, ISESCALATED.name, current, escalated, reason, is_repair=written)
    ]


RULES: tuple[Rule, ...] = (
    *common.base_rules(FIELDS),
    common.keep_hidden_advance(RULE_LEVEL, LEVEL, level_beats, why_level_kept),
    protect_history,
    level_never_drops,
    isescalated_follows_level,
    record_history(RULE_HISTORY, TRACKED),
)

MODEL = build_model(NAME, FIELDS, RULES, arrays=(HISTORY_ROOT,))
