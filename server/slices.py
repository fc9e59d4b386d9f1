"""Time slices for long CPU work on the event loop.

One event loop serves every tenant. A push of many items merged in one go holds the
loop for all of it (about 0.3 ms an item, so 300 ms for 1,000 items), and every other
tenant's request waits behind it. Work that loops over items calls `Slices.pause`
between them: past the budget it hands the loop back, and requests that arrived in the
meantime run before the rest of it. (The pipeline lets one request per tenant do such
work at a time, so the slices are shared out by tenant, not by request.)
"""

from __future__ import annotations

import asyncio
import time

SLICE_S = 0.001  # about 3 merged items; another tenant waits behind one slice, not a push


class Slices:
    def __init__(self, budget_s: float = SLICE_S) -> None:
        self._budget = budget_s
        self._start = time.perf_counter()

    async def pause(self) -> bool:
        """Hand the loop back if this slice is used up; True if it was."""
        if time.perf_counter() - self._start < self._budget:
            return False
        await asyncio.sleep(0)
        self._start = time.perf_counter()
        return True
