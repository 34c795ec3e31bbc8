"""gc_pauses.Collector in this process: what it freezes, that frozen garbage is freed by a thaw,
and that it counts collections. Each test unfreezes (Collector.stop) whatever it froze."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from typing import Any, Iterator

import pytest

from ota_bridge.gc_pauses import Collector


class Node:
    """A container object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me: Any = self


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@contextlib.contextmanager
def started(loop: asyncio.AbstractEventLoop, **limits: Any) -> Iterator[Collector]:
    """A started Collector, stopped (everything unfrozen) whatever the test did."""
    collector = Collector(loop, **limits)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


def run_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks gc_pauses scheduled from its gc hook (after_full_collection)."""
    loop.run_until_complete(asyncio.sleep(0))


def test_start_freezes_what_lives_and_stop_gives_it_back(loop: asyncio.AbstractEventLoop) -> None:
    with started(loop) as collector:
        assert gc.get_freeze_count() > 10_000  # this process's modules, functions, classes
        assert collector.stats.freezes == 1
        assert abs(collector.stats.frozen - gc.get_freeze_count()) < 100  # counted as frozen, not walked
    assert gc.get_freeze_count() == 0


def test_collections_are_counted_and_timed(loop: asyncio.AbstractEventLoop) -> None:
    with started(loop) as collector:
        gc.collect(0)
        gc.collect()
        run_pending(loop)
        assert collector.stats.collections[0] >= 1 and collector.stats.collections[2] >= 1
        assert collector.stats.seconds[2] > 0 and collector.stats.longest > 0


def test_a_full_collection_with_many_survivors_freezes_them(loop: asyncio.AbstractEventLoop) -> None:
    with started(loop, freeze_above=5_000, thaw_growth=100) as collector:
        frozen = gc.get_freeze_count()
        kept = [Node() for _ in range(10_000)]
        gc.collect()
        run_pending(loop)
        assert collector.stats.freezes == 2 and collector.stats.thaws == 0
        assert gc.get_freeze_count() >= frozen + len(kept)
        assert len(gc.get_objects(generation=2)) < 5_000  # the rest left the collected generation


def test_cycles_that_died_frozen_are_freed_when_the_frozen_heap_doubled(loop: asyncio.AbstractEventLoop) -> None:
    with started(loop, freeze_above=5_000, thaw_growth=2, thaw_seconds=0) as collector:
        start = gc.get_freeze_count()
        doomed = [Node() for _ in range(10_000)]
        gc.collect()
        run_pending(loop)  # frozen while alive: not yet double the start-up heap
        assert collector.stats.freezes == 2 and collector.stats.thaws == 0
        canary = weakref.ref(doomed[0])
        del doomed  # now cyclic garbage inside the frozen heap: no collection can reach it
        gc.collect()
        assert canary() is not None
        grown = [Node() for _ in range(start)]  # the heap doubles: the next full collection thaws
        gc.collect()
        run_pending(loop)
        assert collector.stats.thaws == 1
        assert canary() is None
        assert collector.stats.thawed_garbage >= 10_000
        assert gc.get_freeze_count() >= len(grown)  # the survivors frozen again
        assert abs(collector.stats.frozen - gc.get_freeze_count()) < 100  # counted without walking them


def test_no_thaw_within_the_hour_of_the_last_one(loop: asyncio.AbstractEventLoop) -> None:
    with started(loop, freeze_above=5_000, thaw_growth=2) as collector:
        kept = [Node() for _ in range(gc.get_freeze_count() * 2)]  # the frozen heap more than doubles
        gc.collect()
        run_pending(loop)
        assert collector.stats.thaws == 0 and collector.stats.freezes == 2
        assert gc.get_freeze_count() > len(kept)  # frozen instead: no full collection over the whole heap
