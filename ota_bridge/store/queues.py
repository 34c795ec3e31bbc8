"""Device queues: each device's pending jobs, head first, and their floor, as the dispatcher publishes them.

A held (SCHEDULED) job keeps its place: while it is the first job not yet final, the device's
head is the idle head (nothing to run) and every later job waits behind it; the pending list
shows it with its Reason.

The floor of a queue is a Seq at or below which every job of the device is final (done,
canceled or deleted): the Seq before the head's, or, with nothing pending, the highest Seq the
database ever handed out. Agents never run a job at or below a floor they have verified, so a
canceled or deleted job's signed head cannot be replayed to them. The store's single thread
makes the floor exact: no job is added between reading the queue and reading the counter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Iterable

import peewee as pw

from agent.protocol import QUEUE_LIST_LIMIT, JobStatus

from ..models import ChildJob, Device, Job, db
from . import PENDING, args, chunks, epoch, padded, prepared_rows, reports_queue_changes
from .artifacts import ArtifactRef, job_artifacts


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
    reason: str | None = None  # why a SCHEDULED job is held
    attempt: int = 1  # the attempt the head asks for (Retries: store/attempts.py)
    rollback: bool = False  # an OnFailure child: it runs the rollback workflow's command, without artifacts
    artifacts: tuple[ArtifactRef, ...] = ()  # filled in for a queue's head only (the head carries them)

    @property
    def held(self) -> bool:
        return self.status == JobStatus.SCHEDULED.value


@dataclass(frozen=True)
class DeviceQueue:
    device_id: str
    entries: tuple[QueueEntry, ...]  # the first jobs not yet final (the window read), in order
    total: int
    floor: int = 0  # every job of the device at or below it is final
    epoch: int = -1  # the store's epoch when it was read (-1: unknown); see store.epoch

    @property
    def head(self) -> QueueEntry | None:
        """The job the device must run next: none while the first one is held (SCHEDULED)."""
        return self.entries[0] if self.entries and not self.entries[0].held else None


@reports_queue_changes
def device_queues(device_ids: list[str], window: int = QUEUE_LIST_LIMIT) -> list[DeviceQueue]:
    """The pending queue of each device, its first `window` jobs head first, and its floor: one
    query for the lot, and one more for the Seq counter when a device has nothing pending.

    The head's artifacts are read; with a window longer than the list, every entry's (a dispatcher
    that remembers the queue moves the head along it without reading it again)."""
    found: dict[str, list[QueueEntry]] = {d: [] for d in device_ids}
    totals: dict[str, int] = {}
    for chunk in chunks(device_ids):
        for device_id, total, *entry in _queue_rows(chunk, window):
            found[device_id].append(_entry(*entry))
            totals[device_id] = total
    idle_floor = highest_seq_ever() if len(totals) < len(device_ids) else 0
    every = window > QUEUE_LIST_LIMIT
    _add_artifacts(found, every)
    read_at = epoch()  # -1 for a queue whose later entries lack their artifacts: it is not moved along
    return [DeviceQueue(d, tuple(found[d]), totals.get(d, 0), found[d][0].seq - 1 if found[d] else idle_floor,
                        read_at if every or len(found[d]) <= 1 else -1) for d in device_ids]


def _entry(job_id: str, parent_id: str, name: str, command: str, timeout: int, success_on_restart: Any,
           seq: int, status: str, submitted: datetime, reason: str | None, attempt: int, rollback: Any) -> QueueEntry:
    """A QueueEntry from a row; SQLite gives 0 or 1 for the booleans (a CASE, an IS NOT NULL)."""
    return QueueEntry(job_id, parent_id, name, command, timeout, bool(success_on_restart), seq, status, submitted,
                      reason, attempt, bool(rollback))


def _add_artifacts(found: dict[str, list[QueueEntry]], every: bool) -> None:
    """Fill in the artifacts of each head, or of every entry (a rollback child's command has none)."""
    shown = [entries if every else entries[:1] for entries in found.values()]
    refs = job_artifacts(e.parent_id for entries in shown for e in entries if not e.rollback)
    if not refs:
        return
    for entries in shown:
        for i, e in enumerate(entries):
            if not e.rollback and e.parent_id in refs:
                entries[i] = replace(e, artifacts=refs[e.parent_id])


def highest_seq_ever() -> int:
    """The highest Seq handed out so far, the jobs deleted since included (0: none yet)."""
    ((highest,),) = prepared_rows("highest_seq", lambda _: ChildJob.select(pw.fn.MAX(ChildJob.seq)).tuples())
    highest = highest or 0
    table = ChildJob._meta.table_name
    if isinstance(db.obj, pw.SqliteDatabase):  # AUTOINCREMENT keeps its counter in sqlite_sequence
        if _sqlite_sequence_exists():
            row = db.execute_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        else:  # a table made before AUTOINCREMENT: it reuses numbers anyway
            row = None
    else:
        row = db.execute_sql("SELECT pg_sequence_last_value(pg_get_serial_sequence(%s, 'seq')::regclass)",
                             (table,)).fetchone()
    return max(highest, int(row[0]) if row and row[0] is not None else 0)


_sequence_seen: set[str] = set()  # SQLite files known to have sqlite_sequence (it is never dropped)


def _sqlite_sequence_exists() -> bool:
    """Whether the SQLite file has sqlite_sequence (made with the first AUTOINCREMENT table): asked
    once per file, since the device updates ask for the highest Seq with every final."""
    where = db.obj.database
    if where not in _sequence_seen:
        if not db.execute_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
            return False
        _sequence_seen.add(where)
    return True


def _queue_rows(device_ids: list[str], window: int) -> Iterable[tuple[Any, ...]]:
    """(device, pending count, QueueEntry fields...) for the first `window` pending jobs of each."""
    return prepared_rows(f"queue_rows/{window}", lambda count: _queue_query(count, window), *padded(device_ids))


def _queue_query(count: int, window: int) -> pw.Query:
    ranked = (ChildJob.select(
        ChildJob.device_id, ChildJob.job_id, ChildJob.parent, ChildJob.seq, ChildJob.status, ChildJob.reason,
        ChildJob.attempt, ChildJob.on_failure_of,
        pw.fn.ROW_NUMBER().over(partition_by=[ChildJob.device_id], order_by=[ChildJob.seq]).alias("position"),
        pw.fn.COUNT(ChildJob.seq).over(partition_by=[ChildJob.device_id]).alias("total"))
        .where(ChildJob.device_id.in_(args(count)), ChildJob.status.in_(PENDING)).alias("ranked"))
    own = ranked.c.on_failure_of.is_null()  # else a rollback child (OnFailure): it runs the rollback workflow
    return (Job.select(ranked.c.device_id, ranked.c.total, ranked.c.job_id, Job.job_id, Job.name,
                       pw.Case(None, [(own, Job.command)], Job.on_failure_command),
                       pw.Case(None, [(own, Job.timeout_seconds)], Job.on_failure_timeout_seconds),
                       pw.Case(None, [(own, Job.success_on_restart)], Job.on_failure_success_on_restart),
                       ranked.c.seq, ranked.c.status, Job.created, ranked.c.reason, ranked.c.attempt,
                       ranked.c.on_failure_of.is_null(False))
            .join(ranked, on=(ranked.c.parent_id == Job.job_id))
            .where(ranked.c.position <= window)
            .order_by(ranked.c.device_id, ranked.c.seq).tuples())


def has_history() -> bool:
    """Whether the database has devices or has ever had jobs (so agents already trust a key)."""
    return Device.select().exists() or highest_seq_ever() > 0
