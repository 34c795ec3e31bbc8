"""Maintenance windows: a five-field cron expression, a duration and a time zone (stdlib zoneinfo).

`minute hour day-of-month month day-of-week`, each `*`, a number, a range `a-b`, a step `*/n` or
`a-b/n`, or a comma-separated list of those. Day of week 0-7 (0 and 7 are Sunday). As in cron, a
day matches when both day fields match, or when either does if both are restricted. A window is
open from each minute the expression matches (wall time in its zone) for its duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_WINDOW_MINUTES = 7 * 24 * 60
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


class CronError(ValueError):
    """A cron expression, duration or time zone that cannot be used; the message says why."""


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # the day-of-month field is `*`
    any_weekday: bool

    def matches(self, wall: datetime) -> bool:
        if wall.minute not in self.minutes or wall.hour not in self.hours or wall.month not in self.months:
            return False
        day_ok, weekday_ok = wall.day in self.days, (wall.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return day_ok and weekday_ok
        return day_ok or weekday_ok


def parse_cron(expression: str) -> Cron:
    parts = expression.split()
    if len(parts) != 5:
        raise CronError(f"{expression!r} has {len(parts)} fields; a cron expression has 5: "
                        "minute hour day-of-month month day-of-week")
    values = [_field(part, name, low, high) for part, (name, low, high) in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in values[4])
    return Cron(values[0], values[1], values[2], values[3], weekdays, parts[2] == "*", parts[4] == "*")


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    found: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = _number(step_text, name) if step_text else 1
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first_text, _, last_text = span.partition("-")
            first, last = _number(first_text, name), _number(last_text, name)
        else:
            first = last = _number(span, name)
            last = high if step_text else last
        if not low <= first <= last <= high or step < 1:
            raise CronError(f"{name} {item!r} is outside {low}-{high} or not increasing")
        found.update(range(first, last + 1, step))
    return frozenset(found)


def _number(text: str, name: str) -> int:
    if not text.isdigit():
        raise CronError(f"{name} {text!r} is not a number")
    return int(text)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as e:
        raise CronError(f"{name!r} is not a time zone this machine knows (IANA names like Europe/Berlin)") from e


@dataclass(frozen=True)
class Window:
    cron: Cron
    minutes: int  # how long the window stays open after each match
    tz: ZoneInfo

    def is_open(self, when: datetime) -> bool:
        """Whether `when` (naive UTC) falls in a window: a match at most `minutes` - 1 minutes before it."""
        start = when.replace(second=0, microsecond=0, tzinfo=timezone.utc)
        return any(self.cron.matches((start - timedelta(minutes=back)).astimezone(self.tz))
                   for back in range(self.minutes))


def window(expression: str, minutes: int, tz_name: str) -> Window:
    if not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise CronError(f"a window lasts 1 to {MAX_WINDOW_MINUTES} minutes, not {minutes}")
    return Window(parse_cron(expression), minutes, zone(tz_name))
