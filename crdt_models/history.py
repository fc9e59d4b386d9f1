"""A server-authored history: entries appended by the server, untouchable by devices.

The root array ``history`` holds one Y.Map per entry,
``{when, who, action, field, from, to}`` (wire contract v1):

- ``when``: the merge's time, ISO-8601 UTC with milliseconds and "Z" (as JS
  ``toISOString()`` writes it);
- ``who``: the user the change is attributed to (``Context.user``);
- ``action``: ``"create"`` for a field's first value on a new record, else ``"change"``;
- ``field``, ``from``, ``to``: the field and its value before and after the merge
  (``from`` is null on ``"create"``; ``to`` is null when the value was cleared).

``record_history`` runs last, so it records the *net* change a merge made after
every repair: a change the rules refused leaves no entry. ``protect_history`` runs
before the business rules and undoes whatever a device did to the array. Yjs cannot
undelete, so a deleted (or altered) entry is restored by inserting a new Y.Map with
the same content at its position; entries a device inserted are removed.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from crdt_models.constraints import Context, Correction, is_plain_entry, same_value
from crdt_models.record import HISTORY_ROOT, HistoryEntry, NonScalar, RecordState, json_value
from crdt_models.rules_common import iso_utc, value_of
from crdt_models.schema import Rule

RULE_PROTECTED = "history.protected"

EntryKey = tuple[object, ...]


def history_entry(
    ctx: Context, action: str, field: str, old: object, new: object
) -> dict[str, object]:
    """One server-authored entry (values as JSON shows them: 2, not 2.0; nested -> null)."""
    return {
        "when": iso_utc(ctx.now),
        "who": ctx.user,
        "action": action,
        "field": field,
        "from": json_value(old),
        "to": json_value(new),
    }


def record_history(rule_name: str, tracked: Iterable[str]) -> Rule:
    """Append an entry for each tracked field whose value this merge changed.

    On a new record (``before`` None) every tracked field with a value gets a
    ``"create"`` entry. The entries are bookkeeping, not repairs: they make no
    decision; devices see them in the record's ``history``.
    """
    names = tuple(tracked)

    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        action = "create" if before is None else "change"
        found: list[Correction] = []
        for name in names:
            old, new = value_of(before, name), value_of(after, name)
            if same_value(old, new):
                continue
            entry = history_entry(ctx, action, name, old, new)
            reason = f"{name} {action}d: {entry['from']!r} -> {entry['to']!r}"
            found.append(
                Correction(
                    rule_name, HISTORY_ROOT, None, entry, reason, "history_append", is_repair=False
                )
            )
        return found

    rule.__name__ = rule.__qualname__ = "record_history"
    return rule


def protect_history(
    before: RecordState | None, after: RecordState, ctx: Context
) -> list[Correction]:
    """Undo any change to ``history`` the merge made: it becomes ``before``'s history again.

    Entries are matched by content; between two matched entries, what the device
    added is removed (one correction per run) and what it deleted or altered is
    re-inserted. An altered entry is one removed and one restored entry; its
    decision is the restore's (``rejected`` = the altered content). Entries the
    server cannot write (junk an older server let in) are not restored.
    """
    old = () if before is None else before.history
    new = after.history
    old_keys, new_keys = [entry_key(e) for e in old], [entry_key(e) for e in new]
    if old_keys == new_keys:
        return []
    found: list[Correction] = []
    pos = 0
    for old_gap, new_gap in _gaps(old_keys, new_keys):
        found.extend(_repair_gap(old, new, old_gap, new_gap, pos))
        pos += sum(1 for i in old_gap if is_plain_entry(old[i])) + 1
    return found


def _repair_gap(
    old: Sequence[HistoryEntry],
    new: Sequence[HistoryEntry],
    old_gap: range,
    new_gap: range,
    pos: int,
) -> list[Correction]:
    """Corrections turning ``new[new_gap]`` into ``old[old_gap]`` at array position ``pos``."""
    found: list[Correction] = []
    added = len(new_gap) - len(old_gap)
    if new_gap:
        removed = tuple(new[i] for i in new_gap)
        what = "1 entry" if len(removed) == 1 else f"{len(removed)} entries"
        was = "was" if len(removed) == 1 else "were"
        reason = (
            f"history is written by the server only: {what} that a device added or altered"
            f" {was} removed"
        )
        found.append(
            Correction(
                RULE_PROTECTED,
                HISTORY_ROOT,
                removed,
                None,
                reason,
                "history_remove",
                index=pos,
                count=len(removed),
                is_repair=added > 0,
            )
        )
    for offset, i in enumerate(old_gap):
        entry = old[i]
        if isinstance(entry, NonScalar) or not is_plain_entry(entry):
            continue
        altered = offset < len(new_gap)
        what = "altered or replaced" if altered else "deleted"
        reason = f"history is written by the server only: entry {i} was {what}; it was restored"
        rejected = new[new_gap[offset]] if altered else None
        found.append(
            Correction(
                RULE_PROTECTED,
                HISTORY_ROOT,
                rejected,
                dict(entry),
                reason,
                "history_insert",
                index=pos,
            )
        )
        pos += 1
    return found


def _gaps(old: list[EntryKey], new: list[EntryKey]) -> Iterable[tuple[range, range]]:
    """Match ``old`` entries in ``new`` (in order); yield the unmatched stretch before each
    match and after the last one, as (old indices, new indices)."""
    prev_old = prev_new = -1
    for i, j in _anchors(old, new):
        yield range(prev_old + 1, i), range(prev_new + 1, j)
        prev_old, prev_new = i, j
    yield range(prev_old + 1, len(old)), range(prev_new + 1, len(new))


def _anchors(old: list[EntryKey], new: list[EntryKey]) -> Iterable[tuple[int, int]]:
    """Greedy in-order matching, O((n + m) log m) even for a hostile ``new``.

    Each old entry matches its next occurrence in ``new``, unless the following old
    entry occurs sooner (then this one was deleted). Any in-order matching gives the
    right result; a good one just writes less.
    """
    where: dict[EntryKey, list[int]] = {}
    for j, key in enumerate(new):
        where.setdefault(key, []).append(j)

    def next_at(key: EntryKey, start: int) -> int | None:
        spots = where.get(key, [])
        k = bisect_left(spots, start)
        return spots[k] if k < len(spots) else None

    start = 0
    for i, key in enumerate(old):
        found = next_at(key, start)
        if found is None:
            continue
        if i + 1 < len(old):
            following = next_at(old[i + 1], start)
            if following is not None and following < found:
                continue
        yield i, found
        start = found + 1


def entry_key(entry: HistoryEntry) -> EntryKey:
    """What makes two entries the same: their keys and typed values (True is not 1)."""
    if isinstance(entry, NonScalar):
        return ("junk", entry.kind)
    return ("entry", *sorted((str(k), *_typed(v)) for k, v in entry.items()))


def _typed(value: object) -> tuple[object, ...]:
    if isinstance(value, NonScalar):
        return (4, value.kind)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, float) and not math.isfinite(value):
        return (5, repr(value))  # nan != nan: compare non-finite numbers by their text
    if isinstance(value, (int, float)):
        return (2, float(value))
    if isinstance(value, str):
        return (3, value)
    return (0, None)
