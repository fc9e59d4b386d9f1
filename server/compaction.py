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
from collections.abc import Iterable

from pycrdt import merge_updates

from storage import Store
from storage.types import Fold, RecordKey, StoredRecord, WriteBatch

from .gate import DocFailed, contained
from .pipeline import Pipeline

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


async def folds_of(stored: Iterable[StoredRecord]) -> list[Fold]:
    """The records' folds, one record at a time, letting requests run in between: a round
    of 200 records held the event loop for a few hundred ms, every tenant's requests too."""
    folds = []
    for record in stored:
        fold = fold_of(record)
        if fold is not None:
            folds.append(fold)
        await asyncio.sleep(0)
    return folds


async def compact(store: Store, keys: list[RecordKey]) -> int:
    """Fold the given records; returns how many were folded."""
    folds = await folds_of((await store.load_records(keys)).values())
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


FOLD_CHUNK = 16
"""Records loaded, folded and committed together by the periodic compaction. A chunk of
200 records of 100 unfolded entries each held the event loop 17 ms just to build the
loaded entries (every tenant's requests wait meanwhile); 16 hold it about 4 ms."""
CHUNK_PAUSE_S = 0.01
"""Idle time between chunks: a round is background work and must not take the loop from
requests for a whole second at a time (a round folds every record that took 64 updates
since the last one: after a busy spell, thousands)."""


async def run_periodically(pipeline: Pipeline, interval_s: float, chunk: int = FOLD_CHUNK) -> None:
    """Fold the records whose tails grew past the threshold, as the pipeline reports them."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await compact_reported(pipeline, chunk)
            await pipeline.store.prune(time.time())
        except Exception:  # noqa: BLE001 - a failed round is retried next interval
            log.exception("compaction round failed")


async def compact_reported(pipeline: Pipeline, chunk: int = FOLD_CHUNK) -> int:
    due = pipeline.compaction_due
    total = 0
    while due:
        keys = [due.pop() for _ in range(min(chunk, len(due)))]
        folds = await folds_of((await pipeline.store.load_records(keys)).values())
        if folds:
            await pipeline.store.commit(WriteBatch(folds=folds))
        for fold in folds:
            pipeline.live.folded(fold.key, len(fold.through))
        total += len(folds)
        if due:
            await asyncio.sleep(CHUNK_PAUSE_S)
    if total:
        log.info("compacted %d records", total)
    return total
