"""Garbage-collector policy of a serving process: no long collection pauses.

CPython's full (generation-2) collection walks every tracked object while the event loop
waits. A server's old generation is mostly objects that live as long as the process
(modules, routes, the app) and the records of the live-record cache: walking them finds
nothing to free, and cost every tenant's requests 60-400 ms at a time. So:

1. **Freeze after start-up.** Everything alive once the app is up is moved to the
   permanent generation (`gc.freeze`), which collections never walk.
2. **Freeze what survives.** After every generation-1 or full collection, the younger
   generations are empty and the old one holds only what that collection just found
   reachable: it is frozen too. The old generation so stays nearly empty, a full
   collection is as short as a young one, and no collection walks more than the
   survivors of ten young ones (a few thousand objects, a few milliseconds).
   A frozen object still dies by reference counting as soon as nothing refers to it:
   an evicted cached record is freed that way (it holds no reference cycle;
   tests/test_gc_tuning.py keeps it so).
3. **Bounded.** A frozen object that later becomes part of an unreachable reference
   cycle (a request in flight when it was frozen, say) is only reclaimed once unfrozen.
   When the frozen generation has doubled since the last *deep* collection and holds
   `min_deep_objects`, or the process's RSS has doubled and reached `min_deep_rss`, one
   deep collection (unfreeze, collect everything, freeze again) reclaims them: a pause as
   long as an untuned full collection, at most once per doubling. Such cycles came to
   under a thousand objects over a whole noisy-neighbour bench run. RSS is read every
   `check_every_s`; frozen objects are counted only every `count_every_s`, because
   counting walks them all and holds the loop meanwhile (13 ms per million objects, and
   20-50 ms stalls every 10 s in the noisy-neighbour bench when they were counted as
   often as RSS is read).

4. **Short young collections.** A generation-1 collection walks what survived the
   generation-0 ones since the last: after 3 of them (`young_per_middle`) instead of
   Python's 10. Over noisy-neighbour bench runs that took generation-1 pauses from p50
   1.5 ms, p99 6.5-6.8 ms, max 6.7-8.8 ms to 0.6, 3.4-3.7 and 4.6-5.0 ms, for the same
   total (200-221 ms against 209-237 ms); the quiet tenant's p99 there moved within the
   run-to-run spread. The generation-0 threshold stays Python's: a larger one lets more
   objects survive into each generation-1 collection (52 ms ones at 10000).

`fieldsync serve` applies it (`--gc-tune off` leaves Python's defaults); apps built in a
test process are left alone. `gc.callbacks` may run in any thread (the collector runs in
whichever thread allocated); the deep collection is handed to the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GcSettings:
    growth: float = 2.0  # a deep collection when frozen objects or RSS grew this much...
    min_deep_objects: int = 1_000_000  # ... and there are at least this many frozen objects
    min_deep_rss: int = 1 << 30  # ... or at least this many bytes resident
    check_every_s: float = 10.0  # how often RSS is read (after a generation-1 collection)
    count_every_s: float = 300.0  # how often frozen objects are counted (walks them all)
    young_per_middle: int = 3  # generation-0 collections per generation-1 one (Python: 10)


class GcTuning:
    """The policy, installed on the running loop; `uninstall` undoes it."""

    def __init__(self, settings: GcSettings = GcSettings()) -> None:
        self.settings = settings
        self.freezes = 0
        self.deep_collections = 0
        self.deep_frozen = 0  # frozen objects after the last deep collection
        self.deep_rss = 0  # RSS after the last deep collection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deep_scheduled = False
        self._checked_at = 0.0
        self._counted_at = 0.0
        self._thresholds: tuple[int, int, int] | None = None  # Python's, while installed

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Freeze what is alive now and keep freezing what survives collections."""
        if self._loop is not None:
            return
        self._loop = loop
        self._thresholds = young, _, old = gc.get_threshold()
        gc.set_threshold(young, self.settings.young_per_middle, old)
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.deep_frozen, self.deep_rss = gc.get_freeze_count(), rss_bytes()
        gc.callbacks.append(self._on_gc)
        log.info(
            "gc: froze %d start-up objects in %.0f ms",
            self.deep_frozen,
            (time.perf_counter() - started) * 1000,
        )

    def uninstall(self) -> None:
        """Stop; frozen objects go back to the old generation (collected as usual again)."""
        if self._loop is None:
            return
        self._loop = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] == 0:
            return
        gc.freeze()  # the younger generations are empty: only survivors are frozen
        self.freezes += 1
        now = time.monotonic()
        if self._deep_scheduled or now - self._checked_at < self.settings.check_every_s:
            return
        self._checked_at = now
        count = now - self._counted_at >= self.settings.count_every_s
        if count:
            self._counted_at = now
        if self.deep_due(count_frozen=count):
            loop = self._loop
            if loop is not None and not loop.is_closed():
                self._deep_scheduled = True
                loop.call_soon_threadsafe(self.deep_collect)

    def deep_limit(self) -> int:
        """Frozen objects past which a deep collection is due."""
        return max(int(self.deep_frozen * self.settings.growth), self.settings.min_deep_objects)

    def deep_due(self, count_frozen: bool = True) -> bool:
        if count_frozen and gc.get_freeze_count() > self.deep_limit():
            return True
        rss_limit = max(int(self.deep_rss * self.settings.growth), self.settings.min_deep_rss)
        return rss_bytes() > rss_limit

    def deep_collect(self) -> None:
        """Collect everything, frozen objects too, then freeze the survivors again."""
        self._deep_scheduled = False
        if self._loop is None:
            return
        before = gc.get_freeze_count()
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()  # freezes in _on_gc
        self.deep_frozen, self.deep_rss = gc.get_freeze_count(), rss_bytes()
        self.deep_collections += 1
        log.info(
            "gc: deep collection of %d frozen objects in %.0f ms; %d remain",
            before,
            (time.perf_counter() - started) * 1000,
            self.deep_frozen,
        )


def rss_bytes() -> int:
    """The process's resident set size (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


GC_TUNING = web.AppKey("gc_tuning", GcTuning)


def tune(app: web.Application, settings: GcSettings = GcSettings()) -> None:
    """Apply the policy once `app` has started (after its own start-up), until it stops."""

    async def tuning(app: web.Application) -> AsyncIterator[None]:
        policy = GcTuning(settings)
        policy.install(asyncio.get_running_loop())
        app[GC_TUNING] = policy
        try:
            yield
        finally:
            policy.uninstall()

    app.cleanup_ctx.append(tuning)
