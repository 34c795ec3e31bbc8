"""What a job's rollout says (Rollout, AbortOn, Schedule, Continuous) and the arithmetic of its
decisions: how many held children to release now, whether to abort. No database here: the store
(store/rollouts.py) reads the state, asks these functions, and writes the outcome in one transaction.

Every field is checked by `parse` with an error naming it (`Rollout.Waves[2]: ...`); the parsed
plan is stored as JSON beside the job and read back with `from_json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agent.protocol import JobStatus, format_time, parse_time

from .cron import CronError, Window, window

MAX_PER_MINUTE = 1_000_000
MAX_SOAK_SECONDS = 30 * 24 * 3600
ABORT_STATUSES = ("FAILED", "TIMED_OUT", "REJECTED", "ANY")
ANY_FAILURE = (JobStatus.FAILED.value, JobStatus.TIMED_OUT.value, JobStatus.REJECTED.value)
# Children that ran to an end (what AbortOn's percentages are of); an operator's cancel is not one.
RAN = (JobStatus.SUCCEEDED.value, *ANY_FAILURE, JobStatus.INTERRUPTED.value)
END_BEHAVIORS = ("LEAVE", "CANCEL")
ROLLOUT_FIELDS = ("Rollout", "AbortOn", "Schedule", "Continuous")


class PlanError(ValueError):
    """A bad rollout field: `where` names it (e.g. Rollout.Waves[2])."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Criterion:
    status: str  # FAILED, TIMED_OUT, REJECTED or ANY
    threshold_percent: float
    min_finished: int

    def met(self, counts: dict[str, int]) -> str | None:
        """Why the rollout must abort, or None."""
        finished = sum(counts.get(s, 0) for s in RAN)
        statuses = ANY_FAILURE if self.status == "ANY" else (self.status,)
        matching = sum(counts.get(s, 0) for s in statuses)
        if finished == 0 or finished < self.min_finished or matching * 100 < self.threshold_percent * finished:
            return None
        what = "failed, timed out or were rejected" if self.status == "ANY" else f"ended {self.status}"
        return (f"{matching} of {finished} finished devices {what} ({matching * 100 / finished:.0f}%, "
                f"AbortOn {self.status} at {self.threshold_percent:g}% after {self.min_finished})")


@dataclass(frozen=True)
class MaintenanceWindow:
    cron: str
    duration_minutes: int
    time_zone: str


@dataclass(frozen=True)
class Plan:
    max_per_minute: int | None = None
    growth_factor: float | None = None  # the rate is multiplied by this ...
    growth_after: int | None = None  # ... each time this many more children succeeded
    waves: tuple[float, ...] = ()
    wave_success_percent: float = 100.0
    soak_seconds: int = 0
    abort_on: tuple[Criterion, ...] = ()
    start_time: str | None = None  # ISO 8601 (UTC)
    end_time: str | None = None
    end_behavior: str = "LEAVE"
    windows: tuple[MaintenanceWindow, ...] = ()
    continuous: bool = False

    @property
    def holds(self) -> bool:
        """Children start SCHEDULED: something decides when they go (a rate, waves or a schedule)."""
        return bool(self.max_per_minute or self.waves or self.start_time or self.end_time or self.windows)

    @property
    def kind(self) -> str | None:
        return "Waves" if self.waves else "MaxPerMinute" if self.max_per_minute else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Plan:
        raw = json.loads(text)
        raw["waves"] = tuple(raw["waves"])
        raw["abort_on"] = tuple(Criterion(**c) for c in raw["abort_on"])
        raw["windows"] = tuple(MaintenanceWindow(**w) for w in raw["windows"])
        return Plan(**raw)

    # --- decisions ------------------------------------------------------------------------

    def wave_targets(self, total: int) -> list[int]:
        """How many children are released once each wave is: ceil(percent of the total)."""
        return [math.ceil(p * total / 100) for p in self.waves]

    def open_windows(self) -> list[Window]:
        return [window(w.cron, w.duration_minutes, w.time_zone) for w in self.windows]

    def waiting_reason(self, current: datetime) -> str | None:
        """Why nothing may be released now (the schedule), or None."""
        start = _naive(self.start_time)
        if start is not None and current < start:
            return f"schedule: not released before {self.start_time}"
        if self.windows and not any(w.is_open(current) for w in self.open_windows()):
            return "outside maintenance window"
        return None

    def ended(self, current: datetime) -> bool:
        end = _naive(self.end_time)
        return end is not None and current >= end

    def _wave_reasons(self, count: int, waiting: str | None) -> list[str]:
        """Each child's wave, in Seq order: the children up to a wave's target are in it."""
        targets, reasons = self.wave_targets(count), []
        for k, target in enumerate(targets):
            reason = waiting if k == 0 and waiting else f"rollout: wave {k + 1} of {len(targets)} not released"
            reasons += [reason] * (target - len(reasons))
        return reasons

    def hold_reasons(self, count: int, current: datetime) -> list[str]:
        """The reason each of `count` new children (in Seq order) is held at submission."""
        waiting = self.waiting_reason(current)
        if self.waves:
            return self._wave_reasons(count, waiting)
        if self.max_per_minute:
            return [waiting or f"rollout: waiting for its turn at {self.max_per_minute} a minute"] * count
        return [waiting or "schedule: not released yet"] * count


@dataclass
class Progress:
    """A rollout's stored state (the rollout row), as the decisions read and change it."""

    wave: int = 0  # waves opened so far
    wave_ready_at: datetime | None = None  # when the last opened wave reached WaveSuccessPercent
    wave_base: int = 0  # children released before the last opened wave
    wave_succeeded: int = 0  # children of the last opened wave that succeeded (read by the store)
    released: int = 0
    rate: float | None = None
    rate_successes: int = 0  # successes counted when the rate last grew
    window_start: datetime | None = None  # the current minute of the rate limit
    window_released: int = 0
    notes: list[str] = field(default_factory=list)


def allowed(plan: Plan, state: Progress, counts: dict[str, int], current: datetime) -> int:
    """How many more children may be released now; updates state (waves opened, the rate's minute)."""
    if plan.waiting_reason(current) is not None:
        return 0
    total = sum(counts.values())
    if plan.waves:
        return _wave_allowance(plan, state, counts, total, current)
    if plan.max_per_minute:
        return _rate_allowance(plan, state, counts, current)
    return total


def _wave_allowance(plan: Plan, state: Progress, counts: dict[str, int], total: int, current: datetime) -> int:
    """The next wave opens once every child of the last one is released, WaveSuccessPercent of
    them succeeded, and SoakSeconds passed since that was first seen."""
    targets = plan.wave_targets(total)
    if state.wave == 0:
        _open_wave(state)
    elif state.wave < len(targets) and state.released >= targets[state.wave - 1]:
        size = state.released - state.wave_base
        if state.wave_succeeded * 100 < plan.wave_success_percent * size:
            state.wave_ready_at = None
        elif state.wave_ready_at is None:
            state.wave_ready_at = current
        if state.wave_ready_at is not None and current >= state.wave_ready_at + timedelta(seconds=plan.soak_seconds):
            _open_wave(state)
    target = total if state.wave >= len(targets) else targets[state.wave - 1]
    return max(0, target - state.released)


def _open_wave(state: Progress) -> None:
    state.wave, state.wave_ready_at, state.wave_base, state.wave_succeeded = state.wave + 1, None, state.released, 0


def _rate_allowance(plan: Plan, state: Progress, counts: dict[str, int], current: datetime) -> int:
    if state.rate is None:
        state.rate = float(plan.max_per_minute or 0)
    succeeded = counts.get(JobStatus.SUCCEEDED.value, 0)
    if plan.growth_factor and plan.growth_after and succeeded - state.rate_successes >= plan.growth_after:
        state.rate = min(state.rate * plan.growth_factor, MAX_PER_MINUTE)
        state.rate_successes = succeeded
    if state.window_start is None or current - state.window_start >= timedelta(minutes=1):
        state.window_start, state.window_released = current, 0
    return max(0, int(state.rate) - state.window_released)


def abort_reason(plan: Plan, counts: dict[str, int]) -> str | None:
    for criterion in plan.abort_on:
        why = criterion.met(counts)
        if why is not None:
            return f"rollout aborted: {why}"
    return None


def _naive(text: str | None) -> datetime | None:
    parsed = parse_time(text)
    return None if parsed is None else parsed.replace(tzinfo=None)


# --- parsing the request ----------------------------------------------------------------------


def parse(body: dict[str, Any], target_field: str) -> Plan | None:
    """The plan of a job body's rollout fields; None when it has none. Raises PlanError."""
    if all(body.get(name) is None for name in ROLLOUT_FIELDS):
        return None
    rollout = _object(body.get("Rollout"), "Rollout")
    schedule = _object(body.get("Schedule"), "Schedule")
    continuous = body.get("Continuous")
    if continuous is not None and not isinstance(continuous, bool):
        raise PlanError("Continuous", "must be true or false")
    if continuous and target_field == "DeviceId":
        raise PlanError("Continuous", "is for a DeviceGroup or TagId job: one device never joins later")
    return Plan(**_rollout(rollout), abort_on=_abort_on(body.get("AbortOn")), **_schedule(schedule),
                continuous=bool(continuous))


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(where, "must be an object")
    return value


def _only(value: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    for key in value:
        if key not in known:
            raise PlanError(f"{where}.{key}", f"unknown field; known: {', '.join(known)}")


def _number(value: Any, where: str, low: float, high: float, whole: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise PlanError(where, "must be a whole number" if whole else "must be a number")
    if not low <= value <= high:
        raise PlanError(where, f"must be from {low:g} to {high:g}")
    return value


def _rollout(rollout: dict[str, Any]) -> dict[str, Any]:
    _only(rollout, "Rollout", ("MaxPerMinute", "Growth", "Waves", "WaveSuccessPercent", "SoakSeconds"))
    rate, waves = rollout.get("MaxPerMinute"), rollout.get("Waves")
    if rollout and (rate is None) == (waves is None):
        raise PlanError("Rollout", "give either MaxPerMinute or Waves")
    if rate is not None:
        for key in ("WaveSuccessPercent", "SoakSeconds"):
            if key in rollout:
                raise PlanError(f"Rollout.{key}", "is for Waves")
        return {"max_per_minute": _number(rate, "Rollout.MaxPerMinute", 1, MAX_PER_MINUTE, whole=True),
                **_growth(_object(rollout.get("Growth"), "Rollout.Growth"))}
    if "Growth" in rollout:
        raise PlanError("Rollout.Growth", "is for MaxPerMinute")
    if waves is None:
        return {}
    return {"waves": _waves(waves),
            "wave_success_percent": _number(rollout.get("WaveSuccessPercent", 100), "Rollout.WaveSuccessPercent",
                                            0, 100),
            "soak_seconds": _number(rollout.get("SoakSeconds", 0), "Rollout.SoakSeconds", 0, MAX_SOAK_SECONDS,
                                    whole=True)}


def _growth(growth: dict[str, Any]) -> dict[str, Any]:
    if not growth:
        return {}
    _only(growth, "Rollout.Growth", ("Factor", "AfterSucceeded"))
    for key in ("Factor", "AfterSucceeded"):
        if key not in growth:
            raise PlanError(f"Rollout.Growth.{key}", "missing")
    return {"growth_factor": float(_number(growth["Factor"], "Rollout.Growth.Factor", 1.01, 100)),
            "growth_after": _number(growth["AfterSucceeded"], "Rollout.Growth.AfterSucceeded", 1, 10**9, whole=True)}


def _waves(waves: Any) -> tuple[float, ...]:
    if not isinstance(waves, list) or not 1 <= len(waves) <= 100:
        raise PlanError("Rollout.Waves", "must be a list of 1 to 100 percentages")
    previous = 0.0
    for i, percent in enumerate(waves):
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not previous < percent <= 100:
            raise PlanError(f"Rollout.Waves[{i}]", "must be increasing percentages ending at 100")
        previous = percent
    if previous != 100:
        raise PlanError(f"Rollout.Waves[{len(waves) - 1}]", "must be increasing percentages ending at 100")
    return tuple(float(p) for p in waves)


def _abort_on(value: Any) -> tuple[Criterion, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= 10:
        raise PlanError("AbortOn", "must be a list of 1 to 10 criteria")
    return tuple(_criterion(_object(c, f"AbortOn[{i}]"), f"AbortOn[{i}]") for i, c in enumerate(value))


def _criterion(c: dict[str, Any], where: str) -> Criterion:
    _only(c, where, ("Status", "ThresholdPercent", "MinFinished"))
    if c.get("Status") not in ABORT_STATUSES:
        raise PlanError(f"{where}.Status", f"must be one of {', '.join(ABORT_STATUSES)}")
    if "ThresholdPercent" not in c:
        raise PlanError(f"{where}.ThresholdPercent", "missing")
    return Criterion(c["Status"], float(_number(c["ThresholdPercent"], f"{where}.ThresholdPercent", 0.01, 100)),
                     _number(c.get("MinFinished", 1), f"{where}.MinFinished", 1, 10**9, whole=True))


def _schedule(schedule: dict[str, Any]) -> dict[str, Any]:
    _only(schedule, "Schedule", ("StartTime", "EndTime", "EndBehavior", "MaintenanceWindows"))
    start, end = _time(schedule, "StartTime"), _time(schedule, "EndTime")
    if start and end and end <= start:
        raise PlanError("Schedule.EndTime", "must be after StartTime")
    behavior = schedule.get("EndBehavior", "LEAVE")
    if behavior not in END_BEHAVIORS:
        raise PlanError("Schedule.EndBehavior", f"must be one of {', '.join(END_BEHAVIORS)}")
    if "EndBehavior" in schedule and end is None:
        raise PlanError("Schedule.EndBehavior", "needs an EndTime")
    return {"start_time": format_time(start), "end_time": format_time(end), "end_behavior": behavior,
            "windows": _windows(schedule.get("MaintenanceWindows"))}


def _time(schedule: dict[str, Any], key: str) -> datetime | None:
    value = schedule.get(key)
    if value is None:
        return None
    parsed = parse_time(value)
    if parsed is None:
        raise PlanError(f"Schedule.{key}", "must be an ISO 8601 time, like 2026-03-14T02:00:00Z")
    return parsed


def _windows(value: Any) -> tuple[MaintenanceWindow, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= 20:
        raise PlanError("Schedule.MaintenanceWindows", "must be a list of 1 to 20 windows")
    return tuple(_window(_object(w, f"Schedule.MaintenanceWindows[{i}]"), f"Schedule.MaintenanceWindows[{i}]")
                 for i, w in enumerate(value))


def _window(w: dict[str, Any], where: str) -> MaintenanceWindow:
    _only(w, where, ("Cron", "DurationMinutes", "TimeZone"))
    cron, minutes, tz = w.get("Cron"), w.get("DurationMinutes"), w.get("TimeZone", "UTC")
    if not isinstance(cron, str):
        raise PlanError(f"{where}.Cron", "must be a cron expression, like '0 2 * * *'")
    if not isinstance(tz, str):
        raise PlanError(f"{where}.TimeZone", "must be an IANA time zone name, like Europe/Berlin")
    minutes = _number(minutes, f"{where}.DurationMinutes", 1, 7 * 24 * 60, whole=True)
    for key, check in (("Cron", lambda: window(cron, 1, "UTC")), ("TimeZone", lambda: window("* * * * *", 1, tz))):
        try:
            check()
        except CronError as e:
            raise PlanError(f"{where}.{key}", str(e)) from e
    return MaintenanceWindow(cron, minutes, tz)
