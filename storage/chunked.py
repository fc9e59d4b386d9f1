"""Row conversion that hands the event loop back now and then.

A pull page of 5,000 log rows takes about 13 ms to turn into entries (measured), all of it
on the event loop that every tenant's requests share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

R = TypeVar("R")
T = TypeVar("T")

ROWS_PER_TURN = 500  # about 1.3 ms of conversion


async def converted(rows: Sequence[R], convert: Callable[[R], T]) -> list[T]:
    """`convert` of every row, in order, pausing after every ROWS_PER_TURN rows."""
    out: list[T] = []
    for start in range(0, len(rows), ROWS_PER_TURN):
        if start:
            await asyncio.sleep(0)
        out.extend(convert(r) for r in rows[start : start + ROWS_PER_TURN])
    return out
