"""WAL checkpoints in the background, off the commit path.

SQLite checkpoints a WAL file (copies its pages into the database file and fsyncs it) in
the connection whose commit pushed the WAL past `wal_autocheckpoint` pages: with the
default of 1000, about every second under steady writes, every request waiting on that
commit waited for the checkpoint too (group commits of 30-40 ms instead of 2-4 ms, and
the noisy-neighbour bench's quiet-tenant p99 from about 28 ms to 50-130 ms).

Here a connection of its own, on a thread of its own, runs a PASSIVE checkpoint at most
every `every_s` once something was committed since the last one. PASSIVE never blocks
the writer or the readers: it copies what no reader still needs and leaves the rest for
the next run. The writer keeps an automatic checkpoint at `BACKSTOP_PAGES` only as a
bound: should these checkpoints fall behind (a long read holding old pages, a failing
disk), the WAL still cannot grow without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from .sqlite_thread import ConnectionThread

log = logging.getLogger(__name__)

BACKSTOP_PAGES = 10_000
"""The writer's own `wal_autocheckpoint` (about 40 MB of WAL with 4 KiB pages)."""
EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """What `PRAGMA wal_checkpoint(PASSIVE)` reports."""

    busy: bool  # it could not start (another checkpoint was running)
    wal_frames: int  # frames in the WAL
    checkpointed: int  # of them, now in the database file

    @property
    def complete(self) -> bool:
        return not self.busy and self.checkpointed == self.wal_frames


class Checkpointer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], every_s: float = EVERY_S):
        self._connect = connect
        self.every_s = every_s
        self._thread = ConnectionThread("fieldsync-sqlite-checkpoint")
        self._written = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        self.failures = 0
        self.last: CheckpointResult | None = None

    async def open(self) -> None:
        await self._thread.open(self._connect)
        self._task = asyncio.create_task(self._run(), name="fieldsync-sqlite-checkpoint")

    def written(self) -> None:
        """Something was committed: checkpoint it at the next run."""
        self._written.set()

    async def checkpoint(self) -> CheckpointResult:
        """One PASSIVE checkpoint, now."""
        busy, frames, done = await self._thread.run(_checkpoint)
        self.runs += 1
        self.last = CheckpointResult(bool(busy), frames, done)
        return self.last

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._thread.close()

    async def _run(self) -> None:
        while True:
            await self._written.wait()
            self._written.clear()
            try:
                await self.checkpoint()
            except sqlite3.Error as exc:  # the writer's backstop still bounds the WAL
                self.failures += 1
                log.warning("background WAL checkpoint failed: %s", exc)
            await asyncio.sleep(self.every_s)


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(row[0]), int(row[1]), int(row[2])
