"""Record versions: how a group's record writes continue what is stored.

Every write of a record carries the version it produces, one more than the last.
A group collapses to one row per record (its last write) plus the stored version
the first write continued: a backend writes the row only if the stored version is
still that one, which is how two nodes merging one record never overwrite each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple

from .base import RecordConflict
from .types import RecordKey, RecordWrite, WriteBatch


class VersionedWrite(NamedTuple):
    write: RecordWrite  # the record's last write in the group
    base: int  # the stored version it continues; 0 for a record not yet stored


def versioned_writes(batches: Sequence[WriteBatch]) -> list[VersionedWrite]:
    """One row per record, in key order (so concurrent writers lock rows in one order)."""
    first: dict[RecordKey, int] = {}
    last: dict[RecordKey, RecordWrite] = {}
    for write in (w for b in batches for w in b.records):
        previous = last.get(write.key)
        if previous is not None and write.version != previous.version + 1:
            raise RecordConflict(
                f"{write.key} skips from version {previous.version} to {write.version}"
            )
        first.setdefault(write.key, write.version)
        last[write.key] = write
    return [VersionedWrite(last[k], first[k] - 1) for k in sorted(last)]


async def stale_records(
    batches: Sequence[WriteBatch],
    stored_versions: Callable[[Iterable[RecordKey]], Awaitable[dict[RecordKey, int]]],
) -> set[RecordKey] | None:
    """After a group failed with a conflict: the records whose stored version is no longer
    the one the group's writes continue (None: its writes do not even chain).

    Read after the rollback, so it may name a record another writer moved a moment later
    too (versions only grow: a record stale at the commit is still stale here).
    """
    try:
        writes = versioned_writes(batches)
    except RecordConflict:
        return None
    stored = await stored_versions([w.key for w, _ in writes])
    return {w.key for w, base in writes if stored.get(w.key, 0) != base}
