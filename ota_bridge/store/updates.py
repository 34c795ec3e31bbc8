"""Device updates: job reports checked against the transition table and applied, with presence."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import peewee as pw

from agent.protocol import JobStatus, can_transition

from ..models import ChildJob, Device, now
from . import (
    PENDING,
    arg,
    args,
    chunks,
    epoch,
    idempotent,
    only_these_may_end,
    padded,
    prepared,
    prepared_rows,
    reports_queue_changes,
    write_transaction,
)
from .attempts import Attempts
from .devices import set_presence
from .queues import highest_seq_ever


@dataclass(frozen=True)
class Update:
    """One job update from a device, validated at the MQTT boundary."""

    device_id: str
    job_id: str
    status: JobStatus
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    start_time: datetime | None = None
    end_time: datetime | None = None
    reason: str | None = None
    attempt: int | None = None  # which attempt of the job the report is about; None: not said (1)
    progress: tuple[int, int] | None = None  # DOWNLOADING: (bytes so far, bytes in all)


@dataclass
class UpdateOutcomes:
    applied: list[Update] = field(default_factory=list)
    late: list[Update] = field(default_factory=list)  # results kept beside a state the service set
    dropped: list[tuple[Update, str]] = field(default_factory=list)  # (update, why)
    # What a caller that remembers device queues needs to move them along without reading them:
    # the devices whose queue changed more than by their applied updates (a retry, a rollback child),
    # the highest Seq ever when a job went final (an emptied queue's floor), and the store's epoch.
    reshaped: set[str] = field(default_factory=set)
    highest_seq: int = 0
    epoch: int = -1
    first_seen: list[str] = field(default_factory=list)  # devices heard online for the first time ever

    @property
    def devices(self) -> list[str]:
        return sorted({u.device_id for u in self.applied})


@idempotent
@reports_queue_changes
def record_device_messages(updates: list[Update], presence: list[tuple[str, bool, datetime | None]]) -> UpdateOutcomes:
    """Apply device updates and presence in one transaction; each update idempotently."""
    outcomes = UpdateOutcomes(epoch=epoch())
    with write_transaction():
        view = _BatchView(updates, outcomes.reshaped)
        for update in updates:
            why = _apply_one(update, view)
            if why is None:
                outcomes.applied.append(update)
            elif why == LATE:
                outcomes.late.append(update)
            else:
                outcomes.dropped.append((update, why))
        outcomes.first_seen = set_presence(presence, {u.device_id for u in updates})
        if any(u.status.is_final for u in outcomes.applied):
            outcomes.highest_seq = highest_seq_ever()
        _tell_what_may_have_ended(outcomes, view)
    return outcomes


def _tell_what_may_have_ended(outcomes: UpdateOutcomes, view: _BatchView) -> None:
    """Tell the Store which jobs this batch may have made final, so that a held GET of another job
    is not woken for it: the children that went final and those of their parents left with no child
    pending (rollback children apart, as the API counts). A batch that retried a job or touched a
    rollback (reshaped) says nothing: any job may have ended."""
    if outcomes.reshaped:
        return
    ended = [view.children[u.job_id] for u in outcomes.applied if u.status.is_final]
    parents = sorted({child.parent_id for child in ended})
    busy = {p for chunk in chunks(parents) for (p,) in prepared_rows("busy_parents", _busy, *padded(chunk))}
    only_these_may_end([*(child.job_id for child in ended), *(p for p in parents if p not in busy)])


class _BatchView:
    """What a batch of updates reads: fetched once per batch, kept current as updates apply."""

    def __init__(self, updates: list[Update], reshaped: set[str]) -> None:
        self.reshaped = reshaped  # devices whose queue changed more than their head's status
        self.children: dict[str, ChildJob] = {}
        self.enabled: set[str] = set()  # of the children's devices, those enabled
        self._heads: dict[str, int | None] = {}  # of the children's devices, each one's head as read
        for chunk in chunks(sorted({u.job_id for u in updates})):
            for row in prepared_rows("batch_children", _children, *padded(chunk)):
                child = _child_model(row)
                self.children[child.job_id] = child
                if row[_ENABLED]:
                    self.enabled.add(child.device_id)
                self._heads[child.device_id] = row[_HEAD]
        self.attempts = Attempts()  # retries and rollbacks, with the jobs' policies read once per batch

    def head(self, device_id: str) -> int | None:
        """The seq of the device's current job: its first job not yet final."""
        if device_id not in self._heads:
            self._heads[device_id] = next(iter(prepared_rows("batch_heads", _heads, device_id)), (device_id, None))[1]
        return self._heads[device_id]

    def applied(self, child: ChildJob, status: JobStatus) -> None:
        child.status = status.value
        if status.is_final:
            self._heads.pop(child.device_id, None)


# What applying an update reads of a child (updates and attempts use no other field): fewer
# columns for peewee to convert (the outputs, the times, ...), which costs more than the query.
_CHILD_READ = (ChildJob.seq, ChildJob.job_id, ChildJob.parent, ChildJob.device_id, ChildJob.status, ChildJob.attempt,
               ChildJob.finalized_by_service, ChildJob.on_failure_of, ChildJob.start_time, ChildJob.reason)


_CHILD_NAMES = tuple(f.name for f in _CHILD_READ)
_ENABLED, _HEAD = len(_CHILD_READ), len(_CHILD_READ) + 1  # the columns _children adds after the child's
_OTHER = ChildJob.alias()


def _children(count: int) -> pw.Query:
    """The children the batch names, each with whether its device is enabled and its device's head
    (the Seq of its first job not yet final): one statement for what took three (an update is
    about its child's own device, or it is dropped before either is asked)."""
    enabled = Device.select(Device.device_id).where(Device.device_id == ChildJob.device_id,
                                                    Device.enabled == True)  # noqa: E712
    head = _OTHER.select(pw.fn.MIN(_OTHER.seq)).where(_OTHER.device_id == ChildJob.device_id,
                                                     _OTHER.status.in_(PENDING))
    return ChildJob.select(*_CHILD_READ, pw.fn.EXISTS(enabled), head).where(ChildJob.job_id.in_(args(count)))


def _child_model(row: tuple[Any, ...]) -> ChildJob:
    """A converted row of _children as a ChildJob holding those fields: what peewee's cursor wrapper
    makes, without matching the columns to fields again and setting each through its accessor (for a
    batch, that cost more than its queries)."""
    child = ChildJob.__new__(ChildJob)
    child.__data__, child._dirty, child.__rel__ = dict(zip(_CHILD_NAMES, row[:_ENABLED], strict=True)), set(), {}
    return child


def _heads(count: int) -> pw.Query:
    """(device, seq of its first job not yet final) of each device with one."""
    return (ChildJob.select(ChildJob.device_id, pw.fn.MIN(ChildJob.seq))
            .where(ChildJob.device_id.in_(args(count)), ChildJob.status.in_(PENDING))
            .group_by(ChildJob.device_id).tuples())


def _busy(count: int) -> pw.Query:
    """Those of the parents with a child not yet final (rollback children apart)."""
    return (ChildJob.select(ChildJob.parent).distinct()
            .where(ChildJob.parent.in_(args(count)), ChildJob.status.in_(PENDING), ChildJob.on_failure_of.is_null())
            .tuples())


def _apply_one(update: Update, view: _BatchView) -> str | None:
    """Apply one update; returns why it was dropped, LATE, or None when applied."""
    child = view.children.get(update.job_id)
    if child is None:
        return "no such job"
    if child.device_id != update.device_id:
        return f"the job belongs to device {child.device_id!r}"
    if update.device_id not in view.enabled:
        return "the device is disabled or deleted"
    if not _current_attempt(update, child):
        return f"it is about attempt {update.attempt or 1}, and the job is at attempt {child.attempt}"
    current = JobStatus(child.status)
    if current.is_final and child.finalized_by_service and update.status.is_final:
        _apply_late(child, update)
        child.finalized_by_service = False
        return LATE
    if current.is_final:
        return f"the job is already {current.value}"
    if current is JobStatus.SCHEDULED:  # never sent to the device: only the service moves it
        return "the job is held by the service (SCHEDULED)"
    if view.head(update.device_id) != child.seq:
        return "the job is not the device's current job"
    if not can_transition(current, update.status):
        return f"{current.value} cannot become {update.status.value}"
    if update.status.is_final and view.attempts.retried(child, update):
        view.applied(child, JobStatus.SCHEDULED)
        view.reshaped.add(child.device_id)
        return None
    _write_update(child, update)
    view.applied(child, update.status)
    if update.status.is_final:
        if child.on_failure_of is None and view.attempts.policy(child.parent_id).has_rollback:
            view.reshaped.add(child.device_id)  # its rollback child is released or ends
        view.attempts.ended(child, update.status)
    return None


LATE = "late"


def _current_attempt(update: Update, child: ChildJob) -> bool:
    """Whether the report is about the child's current attempt. A REJECTED that names no attempt is:
    an agent that knows only v2 heads cannot verify the v3 head of a retry, and says so without one."""
    if update.attempt is None and update.status is JobStatus.REJECTED:
        return True
    return (update.attempt or 1) == child.attempt


def _apply_late(child: ChildJob, update: Update) -> None:
    """Keep the device's own result of a job the service already made final; the state stays."""
    ChildJob.update({
        ChildJob.exit_code: update.exit_code, ChildJob.stdout: update.stdout, ChildJob.stderr: update.stderr,
        ChildJob.stdout_truncated: update.stdout_truncated, ChildJob.stderr_truncated: update.stderr_truncated,
        ChildJob.start_time: update.start_time or child.start_time, ChildJob.finalized_by_service: False,
        ChildJob.reason: f"{child.reason}; the device reported {update.status.value} later"
                         + (f": {update.reason}" if update.reason else ""),
        ChildJob.updated: now(),
    }).where(ChildJob.seq == child.seq).execute()


FINAL_COLUMNS = (ChildJob.end_time, ChildJob.exit_code, ChildJob.stdout, ChildJob.stderr, ChildJob.stdout_truncated,
                 ChildJob.stderr_truncated, ChildJob.reason)


def _write_update(child: ChildJob, update: Update) -> None:
    columns = [ChildJob.status, ChildJob.updated]
    values: list[Any] = [update.status.value, now()]
    if update.progress is not None:
        columns += [ChildJob.download_bytes, ChildJob.download_total]
        values += list(update.progress)
    if update.start_time is not None:
        columns.append(ChildJob.start_time)
        values.append(update.start_time)
    if update.status.is_final:
        columns += FINAL_COLUMNS
        values += [update.end_time or now(), update.exit_code, update.stdout, update.stderr, update.stdout_truncated,
                   update.stderr_truncated, update.reason]
    shape = f"write_update/{update.progress is not None}/{update.start_time is not None}/{update.status.is_final}"
    prepared(shape, lambda count: ChildJob.update({c: arg(i) for i, c in enumerate(columns)})
             .where(ChildJob.seq == arg(count - 1)), *values, child.seq)
