"""Garbage-collector policy of a serving process: full collections that stay short.

CPython's full (generation-2) collection walks every tracked object while the event loop
waits. A server's old generation is mostly objects that live as long as the process
(modules, routes, the app) and the records of the live-record cache: walking them found
nothing to free, and cost every tenant's requests 60-400 ms at a time. So:

1. **Freeze after start-up.** Everything alive once the app is up is moved to the
   permanent generation (`gc.freeze`), which collections never walk.
2. **Freeze what survives a full collection.** Right after one, every tracked object has
   just been proved reachable and the younger generations are empty, so freezing then
   freezes no garbage. The next full collection walks only what was promoted since.
   A frozen object still dies by reference counting as soon as nothing refers to it:
   an evicted cached record is freed that way (a record holds no reference cycle;
   tests/test_gc_tuning.py keeps it so).
3. **Bounded.** A frozen object that later becomes part of an unreachable reference
   cycle is not reclaimed until it is unfrozen. When the frozen generation has grown to
   `growth` times its size after the last *deep* collection, one deep collection
   (unfreeze, collect everything, freeze again) reclaims such cycles: a pause as long
   as an untuned full collection, at most once per doubling of the heap.
4. **Fewer young collections.** The generation-0 threshold is raised from 700, so fewer
   short-lived objects (a request in flight) are caught alive, promoted and frozen.

`fieldsync serve` applies it (`--gc-tune off` leaves Python's defaults); apps built in a
test process are left alone. `gc.callbacks` may run in any thread (the collector runs in
whichever thread allocated); a deep collection is handed to the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

FULL = 2


@dataclass(frozen=True, slots=True)
class GcSettings:
    young_threshold: int = 10_000  # generation-0 collections: Python's default is 700
    growth: float = 2.0  # a deep collection when the frozen generation has grown this much
    min_deep_objects: int = 200_000  # ... and holds at least this many objects


class GcTuning:
    """The policy, installed on the running loop; `uninstall` restores what it changed."""

    def __init__(self, settings: GcSettings = GcSettings()) -> None:
        self.settings = settings
        self.full_collections = 0
        self.deep_collections = 0
        self.deep_frozen = 0  # frozen objects after the last deep collection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deep_scheduled = False
        self._thresholds: tuple[int, int, int] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Freeze what is alive now and keep freezing after every full collection."""
        if self._loop is not None:
            return
        self._loop = loop
        self._thresholds = gc.get_threshold()
        _, middle, old = self._thresholds
        gc.set_threshold(self.settings.young_threshold, middle, old)
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.deep_frozen = gc.get_freeze_count()
        gc.callbacks.append(self._on_gc)
        log.info(
            "gc: froze %d start-up objects in %.0f ms; generation-0 threshold %d",
            self.deep_frozen,
            (time.perf_counter() - started) * 1000,
            self.settings.young_threshold,
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
        if phase != "stop" or info["generation"] != FULL:
            return
        self.full_collections += 1
        gc.freeze()  # everything tracked was just found reachable; younger generations are empty
        if not self._deep_scheduled and gc.get_freeze_count() > self.deep_limit():
            loop = self._loop
            if loop is not None and not loop.is_closed():
                self._deep_scheduled = True
                loop.call_soon_threadsafe(self.deep_collect)

    def deep_limit(self) -> int:
        return max(int(self.deep_frozen * self.settings.growth), self.settings.min_deep_objects)

    def deep_collect(self) -> None:
        """Collect everything, frozen objects too, then freeze the survivors again."""
        self._deep_scheduled = False
        if self._loop is None:
            return
        before = gc.get_freeze_count()
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()  # freezes in _on_gc
        self.deep_frozen = gc.get_freeze_count()
        self.deep_collections += 1
        log.info(
            "gc: deep collection of %d frozen objects in %.0f ms; %d remain",
            before,
            (time.perf_counter() - started) * 1000,
            self.deep_frozen,
        )


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
