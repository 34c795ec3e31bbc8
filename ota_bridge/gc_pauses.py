"""Keep Python's full garbage collections short at fleet size, and count what the collector costs.

A full (generation 2) collection walks every container object the process holds. With 10,000
devices on the embedded broker that is millions of objects (sessions, their streams, tasks and
timers) and 2-2.5 s of CPU, during which the one event loop (API, heads, the broker) stands
still; CPython starts one whenever the long-lived objects grew by a quarter, so they keep coming
at a steady fleet size. The objects that live as long as the service (imports, settings, the
sessions of connected devices) need not be walked again and again: `gc.freeze()` moves every
object the collector tracks into a permanent generation it never walks.

When: once at start-up (after a full collection, so no garbage is frozen), and after a full
collection that left at least FREEZE_ABOVE objects in the collected generation (the survivors
of a connect storm: freezing right after a full collection freezes next to no garbage). So a full
collection walks only what became long-lived since the last freeze: 30-150 ms at 10,000 devices.

Frozen objects are still freed by reference counting; only garbage held in reference cycles
among them waits. To keep that bounded, once the frozen heap has doubled since the last thaw the
collector thaws it (`gc.unfreeze()`, one full collection, freeze again), at most once every
THAW_SECONDS: frozen garbage stays below the live heap plus what died in cycles within the hour,
and that one long collection (as long as a full one without freezing) comes at most hourly and only
after the heap doubled. Measured at 10,000 devices, thaws after each doubling of a connect storm
freed no object at all (the sessions' objects were live), hence the hour. Every collection's time and each thaw's
objects freed are counted (`Collector.stats`, served at /metrics).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

FREEZE_ABOVE = 50_000  # objects left in generation 2 by a full collection: at least this many are frozen
THAW_GROWTH = 2.0  # the frozen heap this many times its size after the last thaw: collect it once
THAW_SECONDS = 3600.0  # but at most this often: a connect storm's doublings are live sessions, not garbage


@dataclass
class GcStats:
    """What the collector cost since start-up, and what was frozen (served at /metrics)."""

    collections: list[int] = field(default_factory=lambda: [0, 0, 0])  # per generation
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # wall time, per generation
    longest: float = 0.0  # the longest single collection, seconds
    frozen: int = 0  # objects frozen, counted as they were (gc.get_freeze_count walks them all); those freed since
    # by reference counting are not subtracted, so it runs high and a thaw comes early, not late
    freezes: int = 0
    thaws: int = 0
    thawed_garbage: int = 0  # objects the thaws' collections freed: garbage that waited while frozen


class Collector:
    """Times every collection (gc.callbacks) and freezes the long-lived heap (see the module's doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, freeze_above: int = FREEZE_ABOVE,
                 thaw_growth: float = THAW_GROWTH, thaw_seconds: float = THAW_SECONDS) -> None:
        self.loop, self.freeze_above = loop, freeze_above
        self.thaw_growth, self.thaw_seconds = thaw_growth, thaw_seconds
        self.stats = GcStats()
        self._started = 0.0
        self._thawed_at = 0  # frozen objects right after the last thaw (or the start-up freeze)
        self._thawed_when = time.monotonic()

    def start(self) -> None:
        """Collect once (start-up's garbage), freeze what is left, and start timing collections."""
        gc.collect()
        self._freeze()
        self._thawed_at = self.stats.frozen
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        """Stop timing and unfreeze: the frozen objects are the collector's again (no garbage left behind)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.unfreeze()
        self.stats.frozen = 0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """Time each collection; after a full one, look whether to freeze (on the loop: not inside gc)."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        took, generation = time.perf_counter() - self._started, info["generation"]
        self.stats.collections[generation] += 1
        self.stats.seconds[generation] += took
        self.stats.longest = max(self.stats.longest, took)
        if generation == 2 and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.after_full_collection)

    def after_full_collection(self) -> None:
        """Freeze the survivors of a full collection once there are many; thaw once the frozen heap doubled."""
        survivors = len(gc.get_objects(generation=2))
        if survivors < self.freeze_above:
            return
        if (self.stats.frozen + survivors >= self.thaw_growth * self._thawed_at
                and time.monotonic() - self._thawed_when >= self.thaw_seconds):
            self._thaw()
        else:
            self._freeze()

    def _freeze(self) -> None:
        """Freeze every generation (O(1): the lists are spliced); count what moved, generation by generation."""
        self.stats.frozen += _unfrozen()
        gc.freeze()
        self.stats.freezes += 1

    def _thaw(self) -> None:
        """One full collection over everything, the frozen heap included, then freeze the survivors."""
        gc.unfreeze()
        self.stats.frozen = 0
        freed = gc.collect()  # timed by _on_gc like any other (its after_full_collection finds little left)
        self.stats.thaws += 1
        self.stats.thawed_garbage += freed
        self._freeze()
        self._thawed_at, self._thawed_when = self.stats.frozen, time.monotonic()
        log.info("garbage collector: thawed the frozen heap, %d objects freed, %d frozen", freed, self._thawed_at)


def _unfrozen() -> int:
    """The objects the collector tracks outside the frozen heap (each generation's list: short once frozen)."""
    return sum(len(gc.get_objects(generation=g)) for g in range(3))
