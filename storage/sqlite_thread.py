"""A sqlite3 connection that lives on its own thread; each call is one hop to that thread.

aiosqlite (the reads) sends every statement, and every fetch, to its thread as a hop of
its own. A group commit is BEGIN, at least two statements and COMMIT, and on a busy
event loop every hop waits for the loop and the GIL: 0.7 ms median per hop with the
process on one core, about 1 ms with outliers of seconds on two (measured against a
loop busy in 0.3 ms slices), against 0.06 ms idle. Every request in the group paid for
every hop. Here the whole transaction is one function run on the thread: one hop,
whatever it writes. (Reads use aiosqlite's `execute_fetchall`: one hop each too.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .base import StorageUnavailable

T = TypeVar("T")


class ConnectionThread:
    def __init__(self, name: str) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Open the connection on the thread (sqlite3 ties it to the thread that made it)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._executor, connect)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` on the connection's thread."""
        if self._executor is None or self._conn is None:
            raise StorageUnavailable("the store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._conn, *args)

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)
