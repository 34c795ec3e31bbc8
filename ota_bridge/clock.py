"""The service's clock for what it decides by time: rollout rates and soak times, schedules,
maintenance windows and release delays (ChildJob.release_at).

Real UTC time, unless the service runs with the test-only `--test-clock FILE` (hidden, like
`--failpoints`): then the time is the ISO 8601 time written in that file, frozen until a test
writes another one; a missing or empty file reads as real time. Every time-based release decision
reads `now()` and nothing else, so a test moves those decisions forward by writing the file.
Row bookkeeping (`updated`, `end_time`) keeps the real clock (models.now).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from agent.protocol import parse_time, utc_now

log = logging.getLogger(__name__)

_file: Path | None = None


def use_file(path: Path | None) -> None:
    """Read the time from this file from now on (None: the real clock)."""
    global _file
    _file = path


def now() -> datetime:
    """The service's time, naive UTC like every stored time."""
    return _aware_now().replace(tzinfo=None)


def _aware_now() -> datetime:
    if _file is None:
        return utc_now()
    try:
        text = _file.read_text().strip()
    except FileNotFoundError:
        return utc_now()
    if not text:
        return utc_now()
    parsed = parse_time(text)
    if parsed is None:
        log.error("the test clock file %s holds %r, not an ISO 8601 time; using the real clock", _file, text[:40])
        return utc_now()
    return parsed
