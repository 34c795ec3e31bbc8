"""Jobs: a parent per submission, a child per target device; reading, canceling, deleting, timing out."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, NamedTuple

import peewee as pw

from agent.protocol import DEFAULT_TIMEOUT_SECONDS, PENDING_STATUSES, JobStatus

from ..errors import DeviceNotFound, EmptyTarget, InvalidRequest, JobNotFound
from ..models import ChildJob, Device, DeviceTag, Job, Rollout, now
from . import (
    PENDING,
    arg,
    args,
    as_models,
    chunks,
    finalize,
    idempotent,
    padded,
    pieces,
    prepared,
    prepared_rows,
    reads_rows,
    snapshot,
    write_transaction,
)
from .artifacts import snapshot_for_job
from .attempts import ChildView, child_views, end_silent, insert_with_rollbacks, rollback_counts, settle_stray_rollbacks
from .devices import device_exists
from .job_options import NO_OPTIONS, JobOptions, job_columns
from .queues import DeviceQueue, device_queues
from .workflows import get_workflow

TARGET_FIELDS = ("DeviceId", "DeviceGroup", "TagId")


# --- submission -----------------------------------------------------------------------------------


# A submission reads the queues of at most this many devices itself (their heads go out without a
# store call of the publisher's); for more the POST is answered first and the publisher reads them in
# batches (the read of 1,000 queues held a POST 0.2-0.7 s at load 10).
READ_WITH_SUBMISSION = 100
Holds = Callable[[int], list[str]]  # the reason each of n new children is held (rollout_plan.Plan.hold_reasons)


def submit_job(name: str | None, workflow_id: str, target_field: str, target_value: str,
               timeout_seconds: int | None, hold: Holds | None = None,
               may_be_empty: bool = False, options: JobOptions = NO_OPTIONS) -> tuple[Job, list[str]]:
    """Create a parent job and one child per target device in one transaction: QUEUED, or with
    `hold` SCHEDULED with its reason (with OnFailure, a rollback child right after each: see
    store/attempts.py). `may_be_empty`: a group or tag without devices yet is no error.

    Returns the parent and the device ids whose queues changed.
    """
    with write_transaction():
        job, device_ids = new_job(name, workflow_id, target_field, target_value, timeout_seconds, may_be_empty,
                                  options)
        add_children(job, device_ids, None if hold is None else hold(len(device_ids)))
    return job, device_ids


def submit_job_with_queues(name: str | None, workflow_id: str, target_field: str, target_value: str,
                           timeout_seconds: int | None, window: int | None,
                           options: JobOptions = NO_OPTIONS) -> tuple[Job, list[str], list[DeviceQueue]]:
    """submit_job, and in the same transaction, for up to READ_WITH_SUBMISSION target devices, their
    queues (their first `window` pending jobs; None: none) read after the children were added: the
    dispatcher publishes them as they are (Dispatcher.mark_read), with no store call of its own
    between the POST and the heads. Returns the parent, the target devices and the queues read."""
    with write_transaction():
        job, device_ids = new_job(name, workflow_id, target_field, target_value, timeout_seconds, False, options)
        add_children(job, device_ids)
        if window is None or len(device_ids) > READ_WITH_SUBMISSION:
            return job, device_ids, []
        return job, device_ids, device_queues(device_ids, window)


def new_job(name: str | None, workflow_id: str, target_field: str, target_value: str, timeout_seconds: int | None,
            may_be_empty: bool = False, options: JobOptions = NO_OPTIONS) -> tuple[Job, list[str]]:
    """Inside the caller's transaction: the parent job, its artifacts' copy and its target devices
    (sorted), before its children (add_children)."""
    workflow = get_workflow(workflow_id)
    columns = job_columns(workflow, options)
    device_ids = _target_devices(target_field, target_value, may_be_empty)
    job = _insert_job(
        job_id=str(uuid.uuid4()), name=name or workflow.name, workflow_id=workflow.workflow_id,
        timeout_seconds=timeout_seconds or workflow.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
        success_on_restart=workflow.success_on_restart, target_field=target_field, target_value=target_value,
        **columns,
    )
    snapshot_for_job(job.job_id, workflow.workflow_id)
    return job, device_ids


_JOB_FIELDS = tuple(Job._meta.sorted_fields)


def _insert_job(**given: Any) -> Job:
    """Job.create as one prepared INSERT of every column (the defaults made here, per row, as
    peewee makes them): peewee building the INSERT cost more than SQLite running it, per POST."""
    values = [given.pop(f.name) if f.name in given else (f.default() if callable(f.default) else f.default)
              for f in _JOB_FIELDS]
    if given:
        raise TypeError(f"no Job column {next(iter(given))!r}")
    prepared("insert_job", _job_insert, *values)
    job = Job(**{f.name: value for f, value in zip(_JOB_FIELDS, values, strict=True)})
    job._dirty.clear()  # as stored
    return job


def _job_insert(_: int) -> pw.Query:
    return Job.insert({field: arg(i) for i, field in enumerate(_JOB_FIELDS)})


CHILD_COLUMNS = (ChildJob.job_id, ChildJob.parent, ChildJob.device_id, ChildJob.status, ChildJob.reason,
                 ChildJob.stdout, ChildJob.stderr, ChildJob.stdout_truncated, ChildJob.stderr_truncated,
                 ChildJob.finalized_by_service, ChildJob.updated)  # every column a new child sets


def add_children(job: Job, device_ids: list[str], held: list[str] | None = None) -> list[str]:
    """The job's children for these devices: with OnFailure each with its rollback child right after
    it (store/attempts.py), else one each (insert_children). Returns the new children's job ids, in
    device_ids' order, when the job has no OnFailure (else [])."""
    if job.on_failure_command is None:
        return insert_children(job.job_id, device_ids, held)
    insert_with_rollbacks(job.job_id, device_ids, held)
    return []


def insert_children(parent_id: str, device_ids: list[str], held: list[str] | None = None) -> list[str]:
    """One child per device, QUEUED, or SCHEDULED with held[i] as its reason, as multi-row INSERTs
    prepared once per row count. In the order given: each gets a higher Seq than every job before
    (and than the children before it in device_ids). Returns their job ids, in that order."""
    created = now()
    status = JobStatus.QUEUED.value if held is None else JobStatus.SCHEDULED.value
    reasons = iter(held or [])
    child_ids = new_ids(len(device_ids))
    start = 0
    for piece in pieces(device_ids):
        values = [v for i, d in enumerate(piece, start) for v in (child_ids[i], parent_id, d, status,
                                                                 next(reasons, None), "", "", False, False, False,
                                                                 created)]
        prepared("insert_children", _children_insert, *values)
        start += len(piece)
    return child_ids


def new_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as text, as str(uuid.uuid4()) makes them, from one read of
    the system's random source: a quarter of its time (uuid4 reads 16 bytes and builds a UUID
    object per id, a sixth of a 10,000-device submission)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # the version, 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # the variant, RFC 4122
    h = raw.hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * count, 32)]


def _children_insert(count: int) -> pw.Query:
    width = len(CHILD_COLUMNS)
    return ChildJob.insert_many([{c: arg(row + i) for i, c in enumerate(CHILD_COLUMNS)}
                                 for row in range(0, count, width)])


_TARGET_QUERIES: dict[str, Callable[[int], pw.Query]] = {  # a group's or a tag's devices, as prepared SELECTs
    "DeviceGroup": lambda _: Device.select(Device.device_id).where(Device.group == arg(0)).tuples(),
    "TagId": lambda _: DeviceTag.select(DeviceTag.device).where(DeviceTag.tag == arg(0)).tuples(),
}


def _target_devices(target_field: str, value: str, may_be_empty: bool = False) -> list[str]:
    if target_field == "DeviceId":
        if not device_exists(value):
            raise DeviceNotFound(value)
        return [value]
    build = _TARGET_QUERIES.get(target_field)
    if build is None:
        raise InvalidRequest(f"unknown target field {target_field!r}")
    device_ids = sorted(d for (d,) in prepared_rows(f"target_{target_field}", build, value))
    if not device_ids and not may_be_empty:
        raise EmptyTarget(target_field, value)
    return device_ids


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSummary:
    job: Job
    counts: dict[str, int]
    start_time: datetime | None
    end_time: datetime | None
    single: ChildJob | None  # the one child of a single-device job
    rollout: Rollout | None = None  # its rollout's state, if it has one
    rollbacks: dict[str, int] | None = None  # OnFailure: the rollback children per state (not in counts)

    @property
    def status(self) -> JobStatus:
        return derive_status(self.counts)


_AS_PARENT_SEES = {s.value: JobStatus.QUEUED if s is JobStatus.SCHEDULED else s for s in JobStatus}


def derive_status(counts: dict[str, int]) -> JobStatus:
    """A parent's status from its children's: see docs/protocol.md, 'Parent status'. A held
    (SCHEDULED) child counts as QUEUED: pending."""
    present = {_AS_PARENT_SEES[s] for s, n in counts.items() if n}
    if not present:
        return JobStatus.CANCELED
    if len(present) == 1:
        return present.pop()
    if present & PENDING_STATUSES:
        return JobStatus.IN_PROGRESS
    if present <= {JobStatus.SUCCEEDED, JobStatus.CANCELED}:
        return JobStatus.CANCELED
    return JobStatus.FAILED


def _job_row(_: int) -> pw.Query:
    """A job, its rollout if it has one, and its one child if it targets a device (not its rollback child)."""
    single = (ChildJob.parent == Job.job_id) & (Job.target_field == "DeviceId") & ChildJob.on_failure_of.is_null()
    return (Job.select(Job, Rollout, ChildJob)
            .join_from(Job, Rollout, pw.JOIN.LEFT_OUTER, on=(Rollout.job == Job.job_id))
            .join_from(Job, ChildJob, pw.JOIN.LEFT_OUTER, on=single)
            .where(Job.job_id == arg(0)))


@reads_rows("job_row", _job_row)
def get_job(rows: list[tuple[Any, ...]], job_id: str) -> JobSummary:
    """One job's summary (the store function is get_job(job_id)). A single-device job without
    OnFailure (most jobs) takes one statement: the job, its rollout and its one child joined; any
    other job's rows are read in one snapshot."""
    if not rows:
        raise JobNotFound(job_id)
    job, rollout, child = as_models(rows[0], Job, Rollout, ChildJob)
    if job.target_field != "DeviceId" or job.on_failure_command is not None:
        return snapshot(_get_job, job_id)
    times = [(child.start_time, child.end_time)] if child is not None else []
    return _summary(job, {child.status: 1} if child is not None else {}, times, child, rollout, None)


class JobRow(NamedTuple):
    """What GET /v1/job/{id} shows of a single-device job without OnFailure, as its one joined row
    gives it (`shown_job`): the job's columns the answer names, its one child's, its rollout's."""
    job_id: str
    name: str
    target_field: str
    target_value: str
    workflow_id: str
    command: str
    parameters: str | None
    timeout_seconds: int
    created: datetime
    retry_max: int
    retry_delay_seconds: int
    retry_on: str
    on_failure_command: str | None
    status: str | None  # the child's; None: no child (the outer join found none)
    start_time: datetime | None
    end_time: datetime | None
    stdout: str | None
    exit_code: int | None
    rollout_job: str | None  # None: no rollout; then the rollout's columns are None too
    plan: str | None
    wave: int | None
    released: int | None
    rate: float | None
    paused: bool | None
    aborted: bool | None
    abort_reason: str | None
    active: bool | None
    continuous: bool | None
    checked_at: datetime | None


def _shown_row(_: int, of: Callable[[pw.Node], pw.Expression] = lambda job_id: job_id == arg(0)) -> pw.Query:
    """_job_row with only the columns a single job's answer shows (JobRow's, in its order): 29 of 54."""
    single = (ChildJob.parent == Job.job_id) & (Job.target_field == "DeviceId") & ChildJob.on_failure_of.is_null()
    columns = [getattr(Job, f) for f in JobRow._fields[:13]] + [getattr(ChildJob, f) for f in JobRow._fields[13:18]]
    columns += [Rollout.job] + [getattr(Rollout, f) for f in JobRow._fields[19:]]
    return (Job.select(*columns)
            .join_from(Job, Rollout, pw.JOIN.LEFT_OUTER, on=(Rollout.job == Job.job_id))
            .join_from(Job, ChildJob, pw.JOIN.LEFT_OUTER, on=single)
            .where(of(Job.job_id)))


def _shown_rows(_: int) -> pw.Query:
    """_shown_row of a list of jobs (PostgreSQL): its first column, job_id, tells whose a row is."""
    return _shown_row(1, lambda job_id: job_id == pw.fn.ANY(arg(0)))


@reads_rows("shown_job", _shown_row, batched=_shown_rows)
def shown_job(rows: list[tuple[Any, ...]], job_id: str) -> JobRow | JobSummary:
    """What GET /v1/job/{id} shows (the store function is shown_job(job_id)): a single-device job
    without OnFailure as its one row, no models made (api.serialize.job_row); any other job as
    get_job's summary, read in one snapshot."""
    if not rows:
        raise JobNotFound(job_id)
    row = JobRow._make(rows[0])
    if row.target_field != "DeviceId" or row.on_failure_command is not None:
        return snapshot(_get_job, job_id)
    return row


def _get_job(job_id: str) -> JobSummary:
    job = next(iter(prepared("job", lambda _: Job.select().where(Job.job_id == arg(0)), job_id)), None)
    if job is None:
        raise JobNotFound(job_id)
    return _summaries([job])[0]


def list_jobs(limit: int, offset: int) -> tuple[list[JobSummary], int]:
    """One page of jobs, newest first, and the total count."""
    page = list(Job.select().order_by(Job.created.desc(), Job.job_id.desc()).limit(limit).offset(offset))
    return _summaries(page), Job.select().count()


def _summaries(jobs: list[Job]) -> list[JobSummary]:
    singles = _single_children([j for j in jobs if j.target_field == "DeviceId"])
    counts, times = _child_counts([j.job_id for j in jobs if j.target_field != "DeviceId"])
    for job_id, child in singles.items():  # a single-device job's one child is all its counts and times
        counts[job_id] = {child.status: 1}
        times[job_id] = [(child.start_time, child.end_time)]
    rollouts = _rollouts([j.job_id for j in jobs])
    rollbacks = rollback_counts([j.job_id for j in jobs if j.on_failure_command is not None])
    return [_summary(j, counts.get(j.job_id, {}), times.get(j.job_id, []), singles.get(j.job_id),
                     rollouts.get(j.job_id), rollbacks.get(j.job_id)) for j in jobs]


def _rollouts(ids: list[str]) -> dict[str, Rollout]:
    found: dict[str, Rollout] = {}
    for chunk in chunks(ids):
        chunk = padded(chunk)
        for row in prepared("rollouts_of", lambda n: Rollout.select().where(Rollout.job.in_(args(n))), *chunk):
            found[row.job_id] = row
    return found


def _child_counts(ids: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, list[Any]]]:
    """Per job: how many children in each state, and (first start, last end) of each state's."""
    counts: dict[str, dict[str, int]] = {}
    times: dict[str, list[Any]] = {}
    for chunk in chunks(ids):
        chunk = padded(chunk)
        rows = prepared("job_counts", lambda n: (
            ChildJob.select(ChildJob.parent, ChildJob.status, pw.fn.COUNT(ChildJob.seq),
                            pw.fn.MIN(ChildJob.start_time), pw.fn.MAX(ChildJob.end_time))
            .where(ChildJob.parent.in_(args(n)), ChildJob.on_failure_of.is_null())
            .group_by(ChildJob.parent, ChildJob.status).tuples()), *chunk)
        for parent, status, n, start, end in rows:
            counts.setdefault(parent, {})[status] = n
            times.setdefault(parent, []).append((start, end))
    return counts, times


def _summary(job: Job, counts: dict[str, int], times: list[Any], single: ChildJob | None,
             rollout: Rollout | None, rollbacks: dict[str, int] | None) -> JobSummary:
    starts = [s for s, _ in times if s is not None]
    ends = [e for _, e in times if e is not None]
    done = derive_status(counts).is_final
    return JobSummary(job, counts, min(starts, default=None), max(ends, default=None) if done else None, single,
                      rollout, rollbacks)


def _single_children(jobs: list[Job]) -> dict[str, ChildJob]:
    found: dict[str, ChildJob] = {}
    for chunk in chunks([j.job_id for j in jobs]):
        chunk = padded(chunk)
        for child in prepared("children_of", lambda n: ChildJob.select().where(
                ChildJob.parent.in_(args(n)), ChildJob.on_failure_of.is_null()), *chunk):
            found[child.parent_id] = child
    return found


def child_jobs(job_id: str) -> list[ChildJob]:
    if not Job.select().where(Job.job_id == job_id).exists():
        raise JobNotFound(job_id)
    query = ChildJob.select(ChildJob, Job).join(Job).where(ChildJob.parent == job_id)
    return list(query.order_by(ChildJob.device_id, ChildJob.seq))


def get_child(job_id: str) -> ChildJob:
    child = ChildJob.select(ChildJob, Job).join(Job).where(ChildJob.job_id == job_id).first()
    if child is None:
        raise JobNotFound(job_id)
    return child


def child_jobs_shown(job_id: str) -> list[ChildView]:
    """A job's children as the API shows them: with their earlier attempts and rollback links."""
    return child_views(child_jobs(job_id))


def child_shown(job_id: str) -> ChildView:
    return child_views([get_child(job_id)])[0]


# --- removing and timing out ----------------------------------------------------------------------


def delete_job(job_id: str) -> list[str]:
    """Delete a job and its children; returns the devices whose queues lost a job."""
    with write_transaction():
        devices = _pending_devices(job_id)
        ChildJob.delete().where(ChildJob.parent == job_id).execute()
        if not Job.delete().where(Job.job_id == job_id).execute():
            raise JobNotFound(job_id)
    return devices


def cancel_job(job_id: str) -> list[str]:
    """Cancel every child not yet final; keeps the record. Returns the devices affected."""
    with write_transaction():
        if not Job.select().where(Job.job_id == job_id).exists():
            raise JobNotFound(job_id)
        devices = _pending_devices(job_id)
        finalize(JobStatus.CANCELED, "canceled by an operator", ChildJob.parent == job_id,
                  ChildJob.status.in_(PENDING))
        Rollout.update(active=False).where(Rollout.job == job_id).execute()  # a continuous job takes no new device
    return devices


@idempotent
def expire_silent_jobs(grace_seconds: float) -> list[str]:
    """Jobs IN_PROGRESS past their timeout plus grace, with no word from the device, become TIMED_OUT
    (or, when the job's Retries allow, go on to their next attempt: store/attempts.py).

    The clock is the service's: how long ago the IN_PROGRESS report was stored. Also settles the
    rollback children a path that knows no rollbacks left waiting (attempts.settle_stray_rollbacks).
    Returns the devices whose queues move on.
    """
    with write_transaction():
        running = (ChildJob.select(ChildJob.seq, ChildJob.device_id, ChildJob.updated, _own_timeout())
                   .join(Job).where(ChildJob.status == JobStatus.IN_PROGRESS.value).tuples())
        current = now()
        expired = [(seq, device) for seq, device, since, timeout in running
                   if (current - since).total_seconds() > timeout + grace_seconds]
        reason = f"the device sent no result within the job's timeout plus {grace_seconds:g} s"
        end_silent([seq for seq, _ in expired], JobStatus.TIMED_OUT, reason)
        settled = settle_stray_rollbacks()
    return sorted({device for _, device in expired} | set(settled))


@idempotent
def restart_silence_clocks() -> int:
    """Give every running job's device a fresh chance to report, from now.

    Called when the service (re)connects to the broker: while the service or the broker was
    down, no device could report, so that time must not count towards a server-side timeout.
    """
    with write_transaction():
        return (ChildJob.update(updated=now())
                .where(ChildJob.status == JobStatus.IN_PROGRESS.value).execute())


def _own_timeout() -> pw.Node:
    """A child's timeout: its job's, or for a rollback child (OnFailure) the rollback workflow's."""
    return pw.Case(None, [(ChildJob.on_failure_of.is_null(), Job.timeout_seconds)], Job.on_failure_timeout_seconds)


def _pending_devices(job_id: str) -> list[str]:
    query = ChildJob.select(ChildJob.device_id).where(ChildJob.parent == job_id, ChildJob.status.in_(PENDING))
    return sorted(d for (d,) in query.tuples())
