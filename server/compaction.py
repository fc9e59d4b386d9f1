"""Compaction: fold a record's log tail into its snapshot.

The snapshot is `merge_updates(old snapshot, *raw tail updates)`, never a doc's
`get_update()`: an update still waiting for a causal parent is invisible to
`get_update()` and would be lost, while `merge_updates` keeps it.
The change log itself stays: pulls read it. Policy lives here, once, for every backend.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pycrdt import merge_updates

from storage import Store
from storage.types import Fold, RecordKey, StoredRecord, WriteBatch

from .gate import DocFailed, contained

log = logging.getLogger(__name__)


def fold_of(stored: StoredRecord) -> Fold | None:
    if not stored.tail:
        return None
    updates = [stored.row.snapshot] if stored.row.snapshot else []
    updates += [e.update for e in stored.tail]
    try:
        snapshot: bytes = contained("merge_updates", merge_updates, *updates)
    except DocFailed:
        log.error("cannot compact %s: its updates do not merge", stored.row.key)
        return None
    return Fold(stored.row.key, snapshot, tuple(e.position for e in stored.tail))


async def compact(store: Store, keys: list[RecordKey]) -> int:
    """Fold the given records; returns how many were folded."""
    stored = await store.load_records(keys)
    folds = [f for s in stored.values() if (f := fold_of(s)) is not None]
    if folds:
        await store.commit(WriteBatch(folds=folds))
    return len(folds)


async def compact_due(
    store: Store, min_tail: int, per_round: int = 200, max_rounds: int = 50
) -> int:
    """Fold records whose tail reached `min_tail`, in bounded rounds."""
    total = 0
    for _ in range(max_rounds):
        keys = await store.records_to_compact(min_tail, per_round)
        total += await compact(store, keys) if keys else 0
        if len(keys) < per_round:
            break
    return total


async def run_periodically(store: Store, min_tail: int, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            folded = await compact_due(store, min_tail)
            await store.prune(time.time())
            if folded:
                log.info("compacted %d records", folded)
        except Exception:  # noqa: BLE001 - a failed round is retried next interval
            log.exception("compaction round failed")
