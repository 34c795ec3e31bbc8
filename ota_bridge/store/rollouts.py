"""Held jobs and their release: SCHEDULED children become QUEUED, one transaction per batch;
rollouts (waves, rates, aborts, schedules), their pause and continuous jobs.

A release is a conditional UPDATE (`... WHERE status = 'SCHEDULED'`), so two instances that
release the same child at once release it once: the second finds it QUEUED and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Sequence

import peewee as pw

from agent.protocol import JobStatus

from .. import clock
from ..errors import JobNotFound, NoRollout
from ..models import ChildJob, Device, DeviceTag, Job, Rollout, db, now
from ..rollout_plan import Plan, Progress, abort_reason, allowed
from . import (
    PENDING,
    arg,
    attempts,
    chunks,
    devices,
    finalize,
    idempotent,
    jobs,
    prepared,
    prepared_rows,
    release_children,
    write_transaction,
)
from .artifacts import job_artifacts
from .job_options import NO_OPTIONS, JobOptions
from .queues import DeviceQueue, QueueEntry

RELEASE_BATCH = 500  # children per release transaction of release_due
ROLLOUT_BATCH = 5000  # children per decision of a rollout (one transaction: one UPDATE by Seq range)
SCHEDULED = JobStatus.SCHEDULED.value


@idempotent
def release_due(current: datetime, limit: int = RELEASE_BATCH) -> list[str]:
    """Release the held children whose release_at is at or before `current` (the service's clock),
    the oldest first, at most `limit`; returns the devices whose queues changed."""
    with write_transaction():
        due = (ChildJob.select(ChildJob.seq, ChildJob.device_id)
               .where(ChildJob.status == SCHEDULED, ChildJob.release_at.is_null(False),
                      ChildJob.release_at <= current)
               .order_by(ChildJob.seq).limit(limit).tuples())
        return release_children(list(due))


# --- rollouts -------------------------------------------------------------------------------------
# A job with a Rollout or Schedule starts with every child SCHEDULED (release_at NULL: only the
# rollout releases it). Each round of the release loop decides, per active rollout, in one
# transaction that locks the rollout's row (PostgreSQL: FOR UPDATE, so instances decide one after
# another): abort if an AbortOn criterion is met, end at the schedule's EndTime, else release as
# many children, in Seq order, as the waves or the rate allow now.


def submit_job(name: str | None, workflow_id: str, target_field: str, target_value: str,
               timeout_seconds: int | None, plan: Plan,
               options: JobOptions = NO_OPTIONS) -> tuple[Job, list[str]]:
    """jobs.submit_job with a rollout: its children held if the plan decides when they go, and its
    rollout row, in one transaction."""
    submitted = _submit(name, workflow_id, target_field, target_value, timeout_seconds, plan, options, False)
    return submitted.job, submitted.device_ids


@dataclass(frozen=True)
class Submitted:
    job: Job
    device_ids: list[str]  # every target device: their queues changed
    queues: list[DeviceQueue]  # those known without a read: devices whose only pending job is the new child


def submit_with_queues(name: str | None, workflow_id: str, target_field: str, target_value: str,
                       timeout_seconds: int | None, plan: Plan, options: JobOptions = NO_OPTIONS) -> Submitted:
    """submit_job, and in the same transaction the queues of the devices whose only pending job is
    the new held child, built from what the submission knows, not read: the dispatcher publishes
    them as they are (Dispatcher.mark_read)."""
    return _submit(name, workflow_id, target_field, target_value, timeout_seconds, plan, options, True)


def _submit(name: str | None, workflow_id: str, target_field: str, target_value: str, timeout_seconds: int | None,
            plan: Plan, options: JobOptions, with_queues: bool) -> Submitted:
    with write_transaction():
        job, device_ids = jobs.new_job(name, workflow_id, target_field, target_value, timeout_seconds,
                                       may_be_empty=plan.continuous, options=options)
        reasons = plan.hold_reasons(len(device_ids), clock.now()) if plan.holds else None
        # Which devices already have a job not yet final: read before the children are added, so
        # that the new ones need not be told apart from the others.
        lone = (with_queues and reasons is not None and bool(device_ids) and job.on_failure_command is None)
        busy = _busy_devices(device_ids) if lone else set()
        child_ids = jobs.add_children(job, device_ids, reasons)
        Rollout.create(job=job.job_id, plan=plan.to_json(), continuous=plan.continuous,
                       rate=plan.max_per_minute and float(plan.max_per_minute))
        known = _lone_held_queues(job, device_ids, child_ids, reasons or [], busy) if lone else []
    return Submitted(job, device_ids, known)


def _busy_devices(device_ids: list[str]) -> set[str]:
    """Of these devices, those with a job not yet final. Read from the pending jobs' devices, one
    index range, while there are no more pending jobs than devices here; else one probe per device."""
    query = ChildJob.select(ChildJob.device_id).where(ChildJob.status.in_(PENDING)).limit(len(device_ids) + 1)
    pending = db.execute_sql(*query.sql()).fetchall()
    if len(pending) <= len(device_ids):
        return {d for (d,) in pending} & set(device_ids)
    busy: set[str] = set()
    for chunk in chunks(device_ids):
        probe = ChildJob.select(ChildJob.device_id).where(ChildJob.device_id.in_(chunk), ChildJob.status.in_(PENDING))
        busy.update(d for (d,) in db.execute_sql(*probe.distinct().sql()).fetchall())
    return busy


def _lone_held_queues(job: Job, device_ids: list[str], child_ids: list[str], reasons: list[str],
                      busy: set[str]) -> list[DeviceQueue]:
    """What queues.device_queues would read for the devices whose one pending job is this job's
    new held child (those not `busy` before it): that child alone, SCHEDULED with its reason; the
    floor is the Seq before it. Its Seq comes from the (parent, status) index: the job's children
    got increasing Seqs in device_ids' order (jobs.insert_children)."""
    query = (ChildJob.select(ChildJob.seq).where(ChildJob.parent == job.job_id, ChildJob.status == SCHEDULED)
             .order_by(ChildJob.seq))
    seqs = [seq for (seq,) in db.execute_sql(*query.sql()).fetchall()]
    if len(seqs) != len(device_ids):  # cannot be: every child of a new held job is SCHEDULED
        raise RuntimeError(f"job {job.job_id}: {len(seqs)} held children for {len(device_ids)} devices")
    artifacts = job_artifacts([job.job_id]).get(job.job_id, ())
    entry = QueueEntry("", job.job_id, job.name, job.command, job.timeout_seconds, bool(job.success_on_restart), 0,
                       SCHEDULED, job.created, None, 1, False, artifacts)
    rows = zip(device_ids, child_ids, seqs, reasons, strict=True)
    return _copies(DeviceQueue("", (), 1), entry, [row for row in rows if row[0] not in busy])


def _copies(queue: DeviceQueue, entry: QueueEntry, rows: list[tuple[str, str, int, str | None]]) -> list[DeviceQueue]:
    """Per (device id, child job id, Seq, reason), a copy of the template queue holding a copy of
    the template entry with those, its floor the Seq before. dataclasses.replace for these frozen
    dataclasses (no __post_init__), without their generated __init__, which sets each field
    through object.__setattr__ (13 for a QueueEntry), nor keyword arguments: about four times as
    fast, for 10,000 devices a third of the submission's own work. The copies are as frozen."""
    new = object.__new__
    queue_fields, entry_fields = queue.__dict__, entry.__dict__
    copies = []
    for device_id, job_id, seq, reason in rows:
        held = new(QueueEntry)
        fields = held.__dict__
        fields.update(entry_fields)
        fields["job_id"], fields["seq"], fields["reason"] = job_id, seq, reason
        copy = new(DeviceQueue)
        fields = copy.__dict__
        fields.update(queue_fields)
        fields["device_id"], fields["entries"], fields["floor"] = device_id, (held,), seq - 1
        copies.append(copy)
    return copies


def active_rollouts() -> list[str]:
    """The jobs whose rollout still has decisions to make."""
    return [job_id for (job_id,) in Rollout.select(Rollout.job).where(Rollout.active == True).tuples()]  # noqa: E712


@dataclass(frozen=True)
class Round:
    device_ids: list[str]  # queues that changed
    more: bool  # more children could go now: decide again at once (a batch was full)
    # of those, the queues known without a read: devices whose only pending job is the child released
    queues: list[DeviceQueue] = field(default_factory=list)


def advance(job_id: str, current: datetime) -> Round:
    """One decision of one rollout on the service's clock, in one transaction."""
    with write_transaction():
        row = _locked(job_id)
        if row is None or not row.active:
            return Round([], False)
        plan = Plan.from_json(row.plan)
        rollbacks = _has_rollbacks(job_id)
        counts = _counts(job_id, rollbacks)
        row.checked_at = current
        why = abort_reason(plan, counts)
        if why is not None:
            return Round(_abort(row, why), False)
        if plan.ended(current):
            return Round(_end(row, plan), False)
        children = [] if row.paused else _release(row, plan, rollbacks, counts, current)
        if not plan.continuous and not any(counts.get(s, 0) for s in PENDING) and not children:
            row.active = False
        row.save()
        return Round(sorted({c[1] for c in children}), len(children) == ROLLOUT_BATCH,
                     _released_queues(job_id, children))


def _own(job_id: str) -> tuple[Any, ...]:
    """The children a rollout counts and releases: its job's, but its rollback children (OnFailure,
    store/attempts.py): those are held for their partner's end, not for the rollout."""
    return (ChildJob.parent == job_id, ChildJob.on_failure_of.is_null())


def _held(job_id: str) -> tuple[Any, ...]:
    """Its children held by the rollout itself: SCHEDULED without a release time."""
    return (*_own(job_id), ChildJob.status == SCHEDULED, ChildJob.release_at.is_null())


# The decisions' queries, prepared once (store.prepared), their job id arg(0). A job without
# OnFailure has no rollback children to leave out (`rollbacks` False): its counts then need only the
# (parent, status) index, no read of each child's row.

def _mine(rollbacks: bool) -> tuple[Any, ...]:
    """_own, for a prepared query."""
    return (ChildJob.parent == arg(0), ChildJob.on_failure_of.is_null()) if rollbacks else (ChildJob.parent == arg(0),)


def _held_now(rollbacks: bool) -> tuple[Any, ...]:
    """_held, for a prepared query."""
    return (*_mine(rollbacks), ChildJob.status == SCHEDULED, ChildJob.release_at.is_null())


def _locked(job_id: str) -> Rollout | None:
    def build(_: int) -> pw.Query:
        query = Rollout.select().where(Rollout.job == arg(0))
        # SQLite's write lock is the whole database already; PostgreSQL: instances decide one after another
        return query if isinstance(db.obj, pw.SqliteDatabase) else query.for_update()
    return next(iter(prepared("rollout_row", build, job_id)), None)


def _has_rollbacks(job_id: str) -> bool:
    rows = prepared_rows("job_on_failure", lambda _: Job.select(Job.on_failure_command).where(Job.job_id == arg(0))
                         .tuples(), job_id)
    return bool(rows) and rows[0][0] is not None


def _counts(job_id: str, rollbacks: bool) -> dict[str, int]:
    return dict(prepared_rows(f"rollout_counts/{rollbacks}", lambda _: (
        ChildJob.select(ChildJob.status, pw.fn.COUNT(ChildJob.seq)).where(*_mine(rollbacks))
        .group_by(ChildJob.status).tuples()), job_id))


def _release(row: Rollout, plan: Plan, rollbacks: bool, counts: dict[str, int],
             current: datetime) -> list[Released]:
    """Release what the plan allows now; returns the children released."""
    progress = _progress(row, rollbacks)
    wave = progress.wave
    wanted = allowed(plan, progress, counts, current)
    if progress.wave != wave:  # a new wave opened: its children are those it releases from now on
        row.wave_from_seq = None
    pending = sum(counts.get(s, 0) for s in PENDING)
    children = _release_first(row.job_id, rollbacks, min(wanted, counts.get(SCHEDULED, 0), ROLLOUT_BATCH), pending)
    if plan.waves and children and row.wave_from_seq is None:
        row.wave_from_seq = children[0][0]
    progress.released += len(children)
    progress.window_released += len(children)
    _keep(row, progress)
    return children


Released = tuple[int, str, str, int, Any]  # a child released: Seq, device id, job id, attempt, alone


def _release_first(job_id: str, rollbacks: bool, count: int, pending: int) -> list[Released]:
    """The job's first `count` children held by its rollout, in Seq order, become QUEUED: one
    UPDATE by Seq range (no list of ids). Returns them, each with whether it is its device's only
    job not yet final (`alone`: then its queue is known without a read). `pending`: how many of
    the job's own children the decision counted not yet final."""
    if count <= 0:
        return []
    if count * ROWS_PER_PROBE >= pending and _only_own_pending(job_id, pending + 1):
        # every job not yet final is one of this job's own children, at most one a device: each is alone
        children = [(*c, True) for c in prepared_rows(f"rollout_held_lone/{rollbacks}", lambda _: (
            ChildJob.select(ChildJob.seq, ChildJob.device_id, ChildJob.job_id, ChildJob.attempt)
            .where(*_held_now(rollbacks)).order_by(ChildJob.seq).limit(arg(1)).tuples()), job_id, count)]
    else:
        children = prepared_rows(f"rollout_held/{rollbacks}", lambda _: (
            ChildJob.select(ChildJob.seq, ChildJob.device_id, ChildJob.job_id, ChildJob.attempt, _alone())
            .where(*_held_now(rollbacks)).order_by(ChildJob.seq).limit(arg(1)).tuples()), job_id, count)
    if children:
        prepared(f"rollout_release/{rollbacks}", lambda _: (
            ChildJob.update({ChildJob.status: JobStatus.QUEUED.value, ChildJob.reason: None, ChildJob.updated: arg(3)})
            .where(*_held_now(rollbacks), ChildJob.seq.between(arg(1), arg(2)))),
            job_id, children[0][0], children[-1][0], now())
    return children


# A child's probe (_alone: four descents of the device's queue index, a heap fetch) costs what
# reading about nine rows of the scan of every job not yet final costs (_only_own_pending;
# PostgreSQL, 10,000 devices: ~6 us a probe, ~0.7 us a row). The decision scans when it releases
# at least 1/ROWS_PER_PROBE of its job's pending children: 4, not 9, as a scan that finds another
# job's child is wasted (the probes follow).
ROWS_PER_PROBE = 4


def _only_own_pending(job_id: str, limit: int) -> bool:
    """Whether every child job not yet final, of any job, is this job's own (not a rollback child):
    one set-based read of the jobs not yet final, at most `limit` of them, instead of one probe of
    the device's queue per child released. A job has one child a device (its rollback children
    aside), so then each of its children is its device's only job not yet final. Both counts come
    from one statement, so from one snapshot; False if `limit` rows were read (there may be more)."""
    def build(_: int) -> pw.Query:
        rows = (ChildJob.select(ChildJob.parent, ChildJob.on_failure_of).where(ChildJob.status.in_(PENDING))
                .limit(arg(1)).alias("pending"))
        own = pw.Case(None, [((rows.c.parent_id == arg(0)) & rows.c.on_failure_of.is_null(), 1)], 0)
        return pw.Select([rows], [pw.fn.COUNT(pw.SQL("*")), pw.fn.SUM(own)]).bind(db).tuples()
    ((read, own),) = prepared_rows("only_own_pending", build, job_id, limit)
    return read < limit and read == (own or 0)


def _alone() -> pw.Node:
    """Whether a child is its device's only job not yet final: four probes of the device's queue index."""
    other = ChildJob.alias("other")
    return ~pw.fn.EXISTS(other.select(pw.SQL("1")).where(
        other.device_id == ChildJob.device_id, other.status.in_(PENDING), other.seq != ChildJob.seq))


def _released_queues(job_id: str, children: list[Released]) -> list[DeviceQueue]:
    """What queues.device_queues would read for the devices whose only pending job is the child just
    released: that child alone, QUEUED, the head; the floor is the Seq before it. A child on its
    first attempt only (a rollout releases no other: a retry waits for its own time)."""
    lone = [(device, job_id, seq, None) for seq, device, job_id, attempt, alone in children if alone and attempt == 1]
    if not lone:
        return []
    job = next(iter(prepared("job", lambda _: Job.select().where(Job.job_id == arg(0)), job_id)))
    artifacts = job_artifacts([job.job_id]).get(job.job_id, ())
    entry = QueueEntry("", job.job_id, job.name, job.command, job.timeout_seconds, bool(job.success_on_restart), 0,
                       JobStatus.QUEUED.value, job.created, None, 1, False, artifacts)
    return _copies(DeviceQueue("", (), 1), entry, lone)


def _keep(row: Rollout, progress: Progress) -> None:
    (row.wave, row.wave_ready_at, row.wave_base, row.released, row.rate, row.rate_successes, row.window_start,
     row.window_released) = (progress.wave, progress.wave_ready_at, progress.wave_base, progress.released,
                             progress.rate, progress.rate_successes, progress.window_start, progress.window_released)


def _progress(row: Rollout, rollbacks: bool) -> Progress:
    """The row's state, and how many children of its last wave succeeded (one count, waves only)."""
    succeeded = 0
    if row.wave_from_seq is not None:
        ((succeeded,),) = prepared_rows(f"wave_succeeded/{rollbacks}", lambda _: (
            ChildJob.select(pw.fn.COUNT(ChildJob.seq))
            .where(*_mine(rollbacks), ChildJob.status == JobStatus.SUCCEEDED.value, ChildJob.seq >= arg(1))
            .tuples()), row.job_id, row.wave_from_seq)
    return Progress(row.wave, row.wave_ready_at, row.wave_base, succeeded, row.released, row.rate,
                    row.rate_successes, row.window_start, row.window_released)


def _abort(row: Rollout, why: str) -> list[str]:
    """End every child not yet released or still QUEUED: CANCELED with the reason. A rollback child
    (OnFailure) waits for its partner: ended "not needed" if that was canceled here, run if it fails."""
    where = (*_own(row.job_id), ChildJob.status.in_([SCHEDULED, JobStatus.QUEUED.value]))
    devices = sorted({d for (d,) in ChildJob.select(ChildJob.device_id).where(*where).tuples()})
    finalize(JobStatus.CANCELED, why, *where)
    devices = sorted({*devices, *attempts.settle_stray_rollbacks()})  # those canceled need no rollback
    row.active, row.aborted, row.abort_reason = False, True, why
    row.save()
    return devices


def _end(row: Rollout, plan: Plan) -> list[str]:
    """The schedule's EndTime came: CANCEL ends the children still held; LEAVE leaves them held."""
    where = _held(row.job_id)
    devices = sorted({d for (d,) in ChildJob.select(ChildJob.device_id).where(*where).tuples()})
    if plan.end_behavior == "CANCEL":
        finalize(JobStatus.CANCELED, f"schedule: ended at {plan.end_time}", *where)
        devices = sorted({*devices, *attempts.settle_stray_rollbacks()})
    else:
        ChildJob.update(reason=f"schedule: ended at {plan.end_time}; not released").where(*where).execute()
    row.active = False
    row.save()
    return devices


PAUSED = "rollout paused; "  # put before a held child's reason while its rollout is paused


def set_paused(job_id: str, paused: bool) -> list[str]:
    """Pause or resume a job's rollout: a paused one releases nothing (released children go on).
    Its held children's reasons say so; returns their devices (their queue lists change)."""
    with write_transaction():
        row = _locked(job_id)
        if row is None:
            if not Job.select().where(Job.job_id == job_id).exists():
                raise JobNotFound(job_id)
            raise NoRollout(job_id)
        if row.paused == paused:
            return []
        row.paused = paused
        row.save()
        held = _held(job_id)
        devices = sorted({d for (d,) in ChildJob.select(ChildJob.device_id).where(*held).tuples()})
        if paused:
            ChildJob.update(reason=pw.Value(PAUSED).concat(pw.fn.COALESCE(ChildJob.reason, ""))).where(*held).execute()
        else:
            (ChildJob.update(reason=pw.fn.SUBSTR(ChildJob.reason, len(PAUSED) + 1))
             .where(*held, ChildJob.reason.startswith(PAUSED)).execute())
        return devices


# --- continuous jobs ------------------------------------------------------------------------------


def register_devices(new: Sequence[devices.NewDevice]) -> list[devices.DeviceView]:
    """devices.register_devices, and a child of every continuous job the new devices belong to."""
    with write_transaction():
        views = devices.register_devices(new)
        join_continuous([d.device_id for d in new])
    return views


def update_device(device_id: str, group: Any, tags: Iterable[str] | None, enabled: bool | None,
                  unset: object) -> tuple[devices.DeviceView, list[str]]:
    """devices.update_device, and a child of every continuous job the device now belongs to;
    returns the device and whether its queue changed ([device_id] or [])."""
    with write_transaction():
        view = devices.update_device(device_id, group, tags, enabled, unset)
        changed = join_continuous([device_id]) if group is not unset or tags is not None else []
    return view, changed


def join_continuous(device_ids: list[str]) -> list[str]:
    """Inside the caller's transaction: each device that belongs to an active continuous job's
    target and has no child of it yet gets one, appended to its queue (held, if the job's
    rollout decides when). Returns the devices that got a job."""
    joined: set[str] = set()
    rows = list(Rollout.select(Rollout, Job).join(Job).where(Rollout.continuous == True,  # noqa: E712
                                                             Rollout.active == True))  # noqa: E712
    for row in rows:
        new = _newcomers(row.job, device_ids)
        if new:
            plan = Plan.from_json(row.plan)
            held = [JOINED_LATER] * len(new) if plan.holds else None
            jobs.add_children(row.job, new, held)
            joined.update(new)
    return sorted(joined)


JOINED_LATER = "rollout: joined the target after the start; not released yet"


def _newcomers(job: Job, device_ids: list[str]) -> list[str]:
    found: list[str] = []
    for chunk in chunks(device_ids):
        if job.target_field == "DeviceGroup":
            members = Device.select(Device.device_id).where(Device.device_id.in_(chunk),
                                                            Device.group == job.target_value)
        else:
            members = DeviceTag.select(DeviceTag.device).where(DeviceTag.device.in_(chunk),
                                                               DeviceTag.tag == job.target_value)
        have = ChildJob.select(ChildJob.device_id).where(ChildJob.parent == job.job_id, ChildJob.device_id.in_(chunk))
        taken = {d for (d,) in have.tuples()}
        found += sorted(d for (d,) in members.tuples() if d not in taken)
    return found
