"""Everything the service reads or writes in the database, and nowhere else.

The functions here are blocking; `Store.call` runs them on the store's own thread so the event
loop never waits on the database. With SQLite that one thread is also the one writer, so writes
never contend; a write that spans several rows is one transaction, so nothing is half-written.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Callable, Iterable, TypeVar

import peewee as pw

from agent.protocol import (
    DEFAULT_TIMEOUT_SECONDS,
    FINAL_STATUSES,
    PENDING_STATUSES,
    QUEUE_LIST_LIMIT,
    JobStatus,
    can_transition,
)

from . import credentials
from .errors import (
    DeviceExists,
    DeviceNotFound,
    EmptyTarget,
    InvalidRequest,
    JobNotFound,
    NotFound,
    StoreUnavailable,
    WorkflowNotFound,
)
from .models import ApiToken, ChildJob, Device, DeviceTag, Job, Workflow, db, now, open_database

T = TypeVar("T")
PENDING = [s.value for s in PENDING_STATUSES]
TARGET_FIELDS = ("DeviceId", "DeviceGroup", "TagId")
_CHUNK = 500  # rows per INSERT: under SQLite's bound-variable limit for every table here


class Store:
    """The database, opened once, used from one worker thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ota-store")
        self.database: pw.Database = self._executor.submit(open_database, url).result()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) on the store's thread.

        Raises StoreUnavailable when the database cannot be reached or stays locked.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except (pw.OperationalError, pw.InterfaceError) as e:
            raise StoreUnavailable(f"the database is unavailable: {e}") from e

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the store's thread from code that is not on the event loop (the CLI)."""
        return self._executor.submit(partial(fn, *args, **kwargs)).result()

    def close(self) -> None:
        self._executor.submit(self.database.close).result()
        self._executor.shutdown(wait=True)


def _write_transaction() -> Any:
    """A write transaction that takes SQLite's write lock up front (no upgrade deadlocks)."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


# --- API tokens -----------------------------------------------------------------------------


def has_tokens() -> bool:
    return ApiToken.select().exists()


def create_token(name: str) -> str:
    token = credentials.new_secret()
    ApiToken.create(name=name, token_hash=credentials.token_hash(token))
    return token


def check_token(token: str) -> bool:
    return ApiToken.select().where(ApiToken.token_hash == credentials.token_hash(token)).exists()


def token_hashes() -> list[str]:
    return [h for (h,) in ApiToken.select(ApiToken.token_hash).tuples()]


def list_tokens() -> list[ApiToken]:
    return list(ApiToken.select().order_by(ApiToken.created, ApiToken.id))


def revoke_token(name: str) -> int:
    """Revoke every token of that name; returns how many there were."""
    with _write_transaction():
        count = ApiToken.delete().where(ApiToken.name == name).execute()
    if not count:
        raise NotFound("API token", name)
    return count


# --- workflows ------------------------------------------------------------------------------


def create_workflow(name: str, command: str, timeout_seconds: int | None, success_on_restart: bool) -> Workflow:
    return Workflow.create(workflow_id=str(uuid.uuid4()), name=name, command=command,
                           timeout_seconds=timeout_seconds, success_on_restart=success_on_restart)


def get_workflow(workflow_id: str) -> Workflow:
    workflow = Workflow.get_or_none(Workflow.workflow_id == workflow_id)
    if workflow is None:
        raise WorkflowNotFound(workflow_id)
    return workflow


def list_workflows() -> list[Workflow]:
    return list(Workflow.select().order_by(Workflow.created, Workflow.workflow_id))


def delete_workflow(workflow_id: str) -> None:
    """Jobs keep their own copy of the command, so their records are untouched."""
    if not Workflow.delete().where(Workflow.workflow_id == workflow_id).execute():
        raise WorkflowNotFound(workflow_id)


# --- devices --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    device: Device
    tags: tuple[str, ...]
    pending: int


def register_device(device_id: str, group: str | None, tags: Iterable[str]) -> tuple[DeviceView, str]:
    """Register a device; returns it and its MQTT password, which is kept only as a hash."""
    password = credentials.new_secret()
    with _write_transaction():
        if device_exists(device_id):
            raise DeviceExists(device_id)
        Device.create(device_id=device_id, group=group, password_hash=credentials.hash_password(password))
        _set_tags(device_id, tags)
    return get_device(device_id), password


def _set_tags(device_id: str, tags: Iterable[str]) -> None:
    DeviceTag.delete().where(DeviceTag.device == device_id).execute()
    rows = [{"device": device_id, "tag": tag} for tag in dict.fromkeys(tags)]
    if rows:
        DeviceTag.insert_many(rows).execute()


def get_device(device_id: str) -> DeviceView:
    device = Device.get_or_none(Device.device_id == device_id)
    if device is None:
        raise DeviceNotFound(device_id)
    return _device_views([device])[0]


def list_devices(group: str | None = None, tag: str | None = None) -> list[DeviceView]:
    query = Device.select().order_by(Device.device_id)
    if group is not None:
        query = query.where(Device.group == group)
    if tag is not None:
        query = query.where(Device.device_id.in_(DeviceTag.select(DeviceTag.device).where(DeviceTag.tag == tag)))
    return _device_views(list(query))


def _device_views(devices: list[Device]) -> list[DeviceView]:
    ids = [d.device_id for d in devices]
    tags: dict[str, list[str]] = {i: [] for i in ids}
    pending: Counter[str] = Counter()
    for chunk in _chunks(ids):
        for row in DeviceTag.select().where(DeviceTag.device.in_(chunk)).order_by(DeviceTag.tag):
            tags[row.device_id].append(row.tag)
        counts = (ChildJob.select(ChildJob.device_id, pw.fn.COUNT(ChildJob.seq).alias("n"))
                  .where(ChildJob.device_id.in_(chunk), ChildJob.status.in_(PENDING))
                  .group_by(ChildJob.device_id).tuples())
        pending.update(dict(counts))
    return [DeviceView(d, tuple(tags[d.device_id]), pending[d.device_id]) for d in devices]


def update_device(device_id: str, group: Any, tags: Iterable[str] | None, enabled: bool | None,
                  unset: object) -> DeviceView:
    """Change a device's group (None clears it; `unset` leaves it), tags, and whether it may connect."""
    with _write_transaction():
        get_device(device_id)
        if group is not unset:
            Device.update(group=group).where(Device.device_id == device_id).execute()
        if tags is not None:
            _set_tags(device_id, tags)
        if enabled is not None:
            Device.update(enabled=enabled).where(Device.device_id == device_id).execute()
    return get_device(device_id)


def rotate_device_password(device_id: str) -> str:
    """A new MQTT password for the device; the old one stops working at once."""
    password = credentials.new_secret()
    with _write_transaction():
        if not Device.update(password_hash=credentials.hash_password(password)).where(
                Device.device_id == device_id).execute():
            raise DeviceNotFound(device_id)
    return password


def broker_accounts() -> list[tuple[str, str]]:
    """(device id, password hash) of every enabled device, for a broker's password file."""
    query = Device.select(Device.device_id, Device.password_hash).where(Device.enabled == True)  # noqa: E712
    return list(query.order_by(Device.device_id).tuples())


def delete_device(device_id: str) -> None:
    """Forget a device; its jobs still queued are canceled, its finished history stays."""
    with _write_transaction():
        if not Device.delete().where(Device.device_id == device_id).execute():
            raise DeviceNotFound(device_id)
        _finalize(JobStatus.CANCELED, "the device was deleted",
                  ChildJob.device_id == device_id, ChildJob.status.in_(PENDING))


def device_exists(device_id: str) -> bool:
    return Device.select().where(Device.device_id == device_id).exists()


def check_device_password(device_id: str, password: str) -> bool:
    device = Device.get_or_none(Device.device_id == device_id)
    return bool(device and device.enabled and credentials.verify_password(password, device.password_hash))


def _set_presence(updates: list[tuple[str, bool, datetime | None]]) -> None:
    """Record (device_id, online, seen at) per device; a None time keeps LastSeen as it was."""
    for device_id, online, seen in updates:
        values: dict[Any, Any] = {Device.online: online}
        if seen is not None:
            values[Device.last_seen] = seen
        Device.update(values).where(Device.device_id == device_id).execute()


def all_device_ids() -> list[str]:
    return [d for (d,) in Device.select(Device.device_id).order_by(Device.device_id).tuples()]


# --- jobs: submission -----------------------------------------------------------------------


def submit_job(name: str | None, workflow_id: str, target_field: str, target_value: str,
               timeout_seconds: int | None) -> tuple[Job, list[str]]:
    """Create a parent job and one child per target device in one transaction.

    Returns the parent and the device ids whose queues changed.
    """
    with _write_transaction():
        workflow = get_workflow(workflow_id)
        device_ids = _target_devices(target_field, target_value)
        job = Job.create(
            job_id=str(uuid.uuid4()), name=name or workflow.name, workflow_id=workflow.workflow_id,
            command=workflow.command,
            timeout_seconds=timeout_seconds or workflow.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
            success_on_restart=workflow.success_on_restart, target_field=target_field, target_value=target_value,
        )
        rows = [{"job_id": str(uuid.uuid4()), "parent": job.job_id, "device_id": d} for d in device_ids]
        for chunk in _chunks(rows):
            ChildJob.insert_many(chunk).execute()
    return job, device_ids


def _target_devices(target_field: str, value: str) -> list[str]:
    if target_field == "DeviceId":
        if not device_exists(value):
            raise DeviceNotFound(value)
        return [value]
    if target_field == "DeviceGroup":
        query = Device.select(Device.device_id).where(Device.group == value)
    elif target_field == "TagId":
        query = DeviceTag.select(DeviceTag.device).where(DeviceTag.tag == value)
    else:
        raise InvalidRequest(f"unknown target field {target_field!r}")
    device_ids = sorted(d for (d,) in query.tuples())
    if not device_ids:
        raise EmptyTarget(target_field, value)
    return device_ids


# --- jobs: reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSummary:
    job: Job
    counts: dict[str, int]
    start_time: datetime | None
    end_time: datetime | None
    single: ChildJob | None  # the one child of a single-device job

    @property
    def status(self) -> JobStatus:
        return derive_status(self.counts)


def derive_status(counts: dict[str, int]) -> JobStatus:
    """A parent's status from its children's: see docs/protocol.md, 'Parent status'."""
    present = {JobStatus(s) for s, n in counts.items() if n}
    if not present:
        return JobStatus.CANCELED
    if JobStatus.IN_PROGRESS in present or (JobStatus.QUEUED in present and present & FINAL_STATUSES):
        return JobStatus.IN_PROGRESS
    if len(present) == 1:
        return present.pop()
    if present <= {JobStatus.SUCCEEDED, JobStatus.CANCELED}:
        return JobStatus.CANCELED
    return JobStatus.FAILED


def get_job(job_id: str) -> JobSummary:
    job = Job.get_or_none(Job.job_id == job_id)
    if job is None:
        raise JobNotFound(job_id)
    return _summaries([job])[0]


def list_jobs(limit: int, offset: int) -> tuple[list[JobSummary], int]:
    """One page of jobs, newest first, and the total count."""
    page = list(Job.select().order_by(Job.created.desc(), Job.job_id.desc()).limit(limit).offset(offset))
    return _summaries(page), Job.select().count()


def _summaries(jobs: list[Job]) -> list[JobSummary]:
    ids = [j.job_id for j in jobs]
    counts: dict[str, dict[str, int]] = {i: {} for i in ids}
    times: dict[str, list[Any]] = {}
    for chunk in _chunks(ids):
        rows = (ChildJob.select(ChildJob.parent, ChildJob.status, pw.fn.COUNT(ChildJob.seq),
                                pw.fn.MIN(ChildJob.start_time), pw.fn.MAX(ChildJob.end_time))
                .where(ChildJob.parent.in_(chunk)).group_by(ChildJob.parent, ChildJob.status).tuples())
        for parent, status, n, start, end in rows:
            counts[parent][status] = n
            times.setdefault(parent, []).append((start, end))
    singles = _single_children([j for j in jobs if j.target_field == "DeviceId"])
    return [_summary(j, counts[j.job_id], times.get(j.job_id, []), singles.get(j.job_id)) for j in jobs]


def _summary(job: Job, counts: dict[str, int], times: list[Any], single: ChildJob | None) -> JobSummary:
    starts = [s for s, _ in times if s is not None]
    ends = [e for _, e in times if e is not None]
    done = derive_status(counts).is_final
    return JobSummary(job, counts, min(starts, default=None), max(ends, default=None) if done else None, single)


def _single_children(jobs: list[Job]) -> dict[str, ChildJob]:
    found: dict[str, ChildJob] = {}
    for chunk in _chunks([j.job_id for j in jobs]):
        for child in ChildJob.select().where(ChildJob.parent.in_(chunk)):
            found[child.parent_id] = child
    return found


def child_jobs(job_id: str) -> list[ChildJob]:
    if not Job.select().where(Job.job_id == job_id).exists():
        raise JobNotFound(job_id)
    query = ChildJob.select(ChildJob, Job).join(Job).where(ChildJob.parent == job_id)
    return list(query.order_by(ChildJob.device_id))


def get_child(job_id: str) -> ChildJob:
    child = ChildJob.select(ChildJob, Job).join(Job).where(ChildJob.job_id == job_id).first()
    if child is None:
        raise JobNotFound(job_id)
    return child


# --- jobs: removing -------------------------------------------------------------------------


def delete_job(job_id: str) -> list[str]:
    """Delete a job and its children; returns the devices whose queues lost a job."""
    with _write_transaction():
        devices = _pending_devices(job_id)
        ChildJob.delete().where(ChildJob.parent == job_id).execute()
        if not Job.delete().where(Job.job_id == job_id).execute():
            raise JobNotFound(job_id)
    return devices


def cancel_job(job_id: str) -> list[str]:
    """Cancel every child not yet final; keeps the record. Returns the devices affected."""
    with _write_transaction():
        if not Job.select().where(Job.job_id == job_id).exists():
            raise JobNotFound(job_id)
        devices = _pending_devices(job_id)
        _finalize(JobStatus.CANCELED, "canceled by an operator", ChildJob.parent == job_id,
                  ChildJob.status.in_(PENDING))
    return devices


def _finalize(status: JobStatus, reason: str, *where: Any) -> int:
    """The service makes jobs final itself; a device's later report is kept beside (see _apply_late)."""
    return (ChildJob.update(status=status.value, end_time=now(), updated=now(), reason=reason,
                            finalized_by_service=True).where(*where).execute())


def expire_silent_jobs(grace_seconds: float) -> list[str]:
    """Jobs IN_PROGRESS past their timeout plus grace, with no word from the device, become TIMED_OUT.

    The clock is the service's: how long ago the IN_PROGRESS report was stored. Returns the
    devices whose queues move on.
    """
    with _write_transaction():
        running = (ChildJob.select(ChildJob.seq, ChildJob.device_id, ChildJob.updated, Job.timeout_seconds)
                   .join(Job).where(ChildJob.status == JobStatus.IN_PROGRESS.value).tuples())
        current = now()
        expired = [(seq, device) for seq, device, since, timeout in running
                   if (current - since).total_seconds() > timeout + grace_seconds]
        reason = f"the device sent no result within the job's timeout plus {grace_seconds:g} s"
        for chunk in _chunks([seq for seq, _ in expired]):
            _finalize(JobStatus.TIMED_OUT, reason, ChildJob.seq.in_(chunk))
    return sorted({device for _, device in expired})


def restart_silence_clocks() -> int:
    """Give every running job's device a fresh chance to report, from now.

    Called when the service (re)connects to the broker: while the service or the broker was
    down, no device could report, so that time must not count towards a server-side timeout.
    """
    with _write_transaction():
        return (ChildJob.update(updated=now())
                .where(ChildJob.status == JobStatus.IN_PROGRESS.value).execute())


def _pending_devices(job_id: str) -> list[str]:
    query = ChildJob.select(ChildJob.device_id).where(ChildJob.parent == job_id, ChildJob.status.in_(PENDING))
    return sorted(d for (d,) in query.tuples())


# --- device queues --------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueEntry:
    job_id: str
    parent_id: str
    name: str
    command: str
    timeout_seconds: int
    success_on_restart: bool
    seq: int
    status: str
    submitted: datetime


@dataclass(frozen=True)
class DeviceQueue:
    device_id: str
    entries: tuple[QueueEntry, ...]  # the first QUEUE_LIST_LIMIT pending jobs, in order
    total: int

    @property
    def head(self) -> QueueEntry | None:
        return self.entries[0] if self.entries else None


def device_queues(device_ids: list[str]) -> list[DeviceQueue]:
    """The pending queue of each device, head first: one query for the lot."""
    found: dict[str, list[QueueEntry]] = {d: [] for d in device_ids}
    totals: dict[str, int] = {}
    for chunk in _chunks(device_ids):
        for device_id, total, *entry in _queue_rows(chunk):
            found[device_id].append(QueueEntry(*entry))
            totals[device_id] = total
    return [DeviceQueue(d, tuple(found[d]), totals.get(d, 0)) for d in device_ids]


def _queue_rows(device_ids: list[str]) -> Iterable[tuple[Any, ...]]:
    """(device, pending count, QueueEntry fields...) for the first QUEUE_LIST_LIMIT pending jobs of each."""
    ranked = (ChildJob.select(
        ChildJob.device_id, ChildJob.job_id, ChildJob.parent, ChildJob.seq, ChildJob.status,
        pw.fn.ROW_NUMBER().over(partition_by=[ChildJob.device_id], order_by=[ChildJob.seq]).alias("position"),
        pw.fn.COUNT(ChildJob.seq).over(partition_by=[ChildJob.device_id]).alias("total"))
        .where(ChildJob.device_id.in_(device_ids), ChildJob.status.in_(PENDING)).alias("ranked"))
    return (Job.select(ranked.c.device_id, ranked.c.total, ranked.c.job_id, Job.job_id, Job.name, Job.command,
                       Job.timeout_seconds, Job.success_on_restart, ranked.c.seq, ranked.c.status, Job.created)
            .join(ranked, on=(ranked.c.parent_id == Job.job_id))
            .where(ranked.c.position <= QUEUE_LIST_LIMIT)
            .order_by(ranked.c.device_id, ranked.c.seq).tuples())


# --- device updates -------------------------------------------------------------------------


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


@dataclass
class UpdateOutcomes:
    applied: list[Update] = field(default_factory=list)
    late: list[Update] = field(default_factory=list)  # results kept beside a state the service set
    dropped: list[tuple[Update, str]] = field(default_factory=list)  # (update, why)

    @property
    def devices(self) -> list[str]:
        return sorted({u.device_id for u in self.applied})


def record_device_messages(updates: list[Update], presence: list[tuple[str, bool, datetime | None]]) -> UpdateOutcomes:
    """Apply device updates and presence in one transaction; each update idempotently."""
    outcomes = UpdateOutcomes()
    with _write_transaction():
        view = _BatchView(updates)
        for update in updates:
            why = _apply_one(update, view)
            if why is None:
                outcomes.applied.append(update)
            elif why == LATE:
                outcomes.late.append(update)
            else:
                outcomes.dropped.append((update, why))
        _set_presence(presence)
    return outcomes


class _BatchView:
    """What a batch of updates reads: fetched once per batch, kept current as updates apply."""

    def __init__(self, updates: list[Update]) -> None:
        job_ids = sorted({u.job_id for u in updates})
        devices = sorted({u.device_id for u in updates})
        self.children = {c.job_id: c for chunk in _chunks(job_ids)
                         for c in ChildJob.select().where(ChildJob.job_id.in_(chunk))}
        self.enabled = {d for chunk in _chunks(devices) for (d,) in Device.select(Device.device_id).where(
            Device.device_id.in_(chunk), Device.enabled == True).tuples()}  # noqa: E712
        self._heads: dict[str, int | None] = {}

    def head(self, device_id: str) -> int | None:
        """The seq of the device's current job: its first job not yet final."""
        if device_id not in self._heads:
            self._heads[device_id] = (ChildJob.select(pw.fn.MIN(ChildJob.seq))
                                      .where(ChildJob.device_id == device_id, ChildJob.status.in_(PENDING)).scalar())
        return self._heads[device_id]

    def applied(self, child: ChildJob, status: JobStatus) -> None:
        child.status = status.value
        if status.is_final:
            self._heads.pop(child.device_id, None)


def _apply_one(update: Update, view: _BatchView) -> str | None:
    """Apply one update; returns why it was dropped, LATE, or None when applied."""
    child = view.children.get(update.job_id)
    if child is None:
        return "no such job"
    if child.device_id != update.device_id:
        return f"the job belongs to device {child.device_id!r}"
    if update.device_id not in view.enabled:
        return "the device is disabled or deleted"
    current = JobStatus(child.status)
    if current.is_final and child.finalized_by_service and update.status.is_final:
        _apply_late(child, update)
        child.finalized_by_service = False
        return LATE
    if current.is_final:
        return f"the job is already {current.value}"
    if view.head(update.device_id) != child.seq:
        return "the job is not the device's current job"
    if not can_transition(current, update.status):
        return f"{current.value} cannot become {update.status.value}"
    _write_update(child, update)
    view.applied(child, update.status)
    return None


LATE = "late"


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


def _write_update(child: ChildJob, update: Update) -> None:
    values: dict[Any, Any] = {ChildJob.status: update.status.value, ChildJob.updated: now()}
    if update.start_time is not None:
        values[ChildJob.start_time] = update.start_time
    if update.status.is_final:
        values.update({
            ChildJob.end_time: update.end_time or now(), ChildJob.exit_code: update.exit_code,
            ChildJob.stdout: update.stdout, ChildJob.stderr: update.stderr,
            ChildJob.stdout_truncated: update.stdout_truncated, ChildJob.stderr_truncated: update.stderr_truncated,
            ChildJob.reason: update.reason,
        })
    ChildJob.update(values).where(ChildJob.seq == child.seq).execute()


def _chunks(items: list[T], size: int = _CHUNK) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
