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
import math
import time
from collections import OrderedDict
from collections.abc import Callable

SLICE_S = 0.001  # about 3 merged items; another tenant waits behind one slice, not a push
LONG_SLICE_S = 0.004  # a tenant under its share: most of its pushes merge in one go
USAGE_HALF_LIFE_S = 2.0


class Slices:
    """One request's time slices; `busy_s` sums them (`stop` ends one without a yield,
    `start` begins the next after awaiting something else)."""

    def __init__(self, budget_s: float = SLICE_S) -> None:
        self._budget = budget_s
        self._start = time.perf_counter()
        self.busy_s = 0.0

    async def pause(self) -> bool:
        """Hand the loop back if this slice is used up; True if it was."""
        now = time.perf_counter()
        if now - self._start < self._budget:
            return False
        self.busy_s += now - self._start
        await asyncio.sleep(0)
        self._start = time.perf_counter()
        return True

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.busy_s += time.perf_counter() - self._start


class SliceBudgets:
    """How long each tenant's slices are, by how much merging it did lately.

    Every tenant's work yields between slices, and a yield puts what is left at the back
    of the loop's queue, behind every other tenant's slices and requests. A tenant that
    merged less than an equal share of the recent merge time (decayed with a half-life of
    `half_life_s`) among the tenants merging lately gets `long_s` slices: a light tenant's
    push then usually merges without waiting behind a heavy one's. A tenant at or over its
    share, and a tenant merging alone, gets `short_s`: at most that long does anyone else
    wait behind it. O(1) a push: usages all decay at one rate, so their sum is kept as one
    number, and "merging lately" means charged within `ACTIVE_HALF_LIVES` half-lives.
    """

    ACTIVE_HALF_LIVES = 5  # a usage left at 3%

    def __init__(
        self,
        short_s: float = SLICE_S,
        long_s: float = LONG_SLICE_S,
        half_life_s: float = USAGE_HALF_LIFE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.short_s, self.long_s = short_s, max(short_s, long_s)
        self._decay = math.log(2) / half_life_s
        self._window = half_life_s * self.ACTIVE_HALF_LIVES
        self._clock = clock
        self._used: OrderedDict[str, tuple[float, float]] = OrderedDict()  # oldest first
        self._total, self._total_at = 0.0, clock()

    def budget(self, tenant: str) -> float:
        now = self._clock()
        self._forget_idle(now)
        if len(self._used) - (tenant in self._used) == 0:
            return self.short_s  # nobody else merged lately: nobody waits behind it
        if tenant not in self._used:
            return self.long_s  # it merged nothing lately: under any share
        share = self._decayed_total(now) / len(self._used)
        return self.long_s if self._decayed(tenant, now) < share else self.short_s

    def charge(self, tenant: str, seconds: float) -> None:
        now = self._clock()
        self._total = self._decayed_total(now) + seconds
        self._total_at = now
        self._used[tenant] = (self._decayed(tenant, now) + seconds, now)
        self._used.move_to_end(tenant)

    def _decayed(self, tenant: str, now: float) -> float:
        seconds, at = self._used.get(tenant, (0.0, now))
        return seconds * math.exp(-self._decay * (now - at))

    def _decayed_total(self, now: float) -> float:
        return self._total * math.exp(-self._decay * (now - self._total_at))

    def _forget_idle(self, now: float) -> None:
        """Drop tenants idle for the window, and what is left of their usage from the sum
        (else every tenant that stopped would keep inflating the share a little)."""
        while self._used:
            tenant, (_, at) = next(iter(self._used.items()))
            if now - at < self._window:
                return
            self._total = max(0.0, self._decayed_total(now) - self._decayed(tenant, now))
            self._total_at = now
            del self._used[tenant]
