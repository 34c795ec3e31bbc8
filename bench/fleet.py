"""What both benchmarks share: the repo on sys.path, a fleet of registered devices, a stopwatch.

Import this module before anything from the repo: it puts the repo root on sys.path, so the
scripts run as `.venv/bin/python bench/NAME.py` from any directory.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.processes import Api  # noqa: E402 - needs the path above

GROUP = "bench"
REGISTER_THREADS = 4


def device_ids(count: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(count)]


def register_fleet(api: Api, count: int, group: str = GROUP) -> float:
    """Register `count` devices in one group, a few requests at a time; returns the seconds it took."""
    start = time.perf_counter()
    with ThreadPoolExecutor(REGISTER_THREADS) as pool:
        list(pool.map(lambda device_id: api.device(device_id, group), device_ids(count)))
    return time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeat))


def result(name: str, figure: float, unit: str, raw: float | None = None, ratio: float | None = None,
           goal: str | None = None, **extra: Any) -> None:
    """Print the one machine-readable line per figure that bench/run reads: `RESULT {json}`.

    `raw` is the limit measured in the same run (in `raw_unit`, given in `extra`, when it differs
    from `unit`); `goal` is "figure|ratio OP NUMBER" (OP one of < <= > >=), e.g. "ratio <= 1.5".
    """
    record = {"name": name, "figure": figure, "unit": unit, "raw": raw, "ratio": ratio, "goal": goal, **extra}
    print("RESULT " + json.dumps(record), flush=True)
