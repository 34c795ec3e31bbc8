"""Device queues: each device's pending jobs, head first, and their floor, as the dispatcher publishes them.

The floor of a queue is a Seq at or below which every job of the device is final (done,
canceled or deleted): the Seq before the head's, or, with nothing pending, the highest Seq the
database ever handed out. Agents never run a job at or below a floor they have verified, so a
canceled or deleted job's signed head cannot be replayed to them. The store's single thread
makes the floor exact: no job is added between reading the queue and reading the counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

import peewee as pw

from agent.protocol import QUEUE_LIST_LIMIT

from ..models import ChildJob, Device, Job, db
from . import PENDING, args, chunks, padded, prepared, prepared_rows


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
    floor: int = 0  # every job of the device at or below it is final

    @property
    def head(self) -> QueueEntry | None:
        return self.entries[0] if self.entries else None


def device_queues(device_ids: list[str]) -> list[DeviceQueue]:
    """The pending queue of each device, head first, and its floor: one query for the lot, and
    one more for the Seq counter when a device has nothing pending."""
    found: dict[str, list[QueueEntry]] = {d: [] for d in device_ids}
    totals: dict[str, int] = {}
    for chunk in chunks(device_ids):
        for device_id, total, *entry in _queue_rows(chunk):
            found[device_id].append(QueueEntry(*entry))
            totals[device_id] = total
    idle_floor = highest_seq_ever() if len(totals) < len(device_ids) else 0
    return [DeviceQueue(d, tuple(found[d]), totals.get(d, 0), found[d][0].seq - 1 if found[d] else idle_floor)
            for d in device_ids]


def highest_seq_ever() -> int:
    """The highest Seq handed out so far, the jobs deleted since included (0: none yet)."""
    ((highest,),) = prepared("highest_seq", lambda _: ChildJob.select(pw.fn.MAX(ChildJob.seq)).tuples())
    highest = highest or 0
    table = ChildJob._meta.table_name
    if isinstance(db.obj, pw.SqliteDatabase):  # AUTOINCREMENT keeps its counter in sqlite_sequence
        if db.execute_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
            row = db.execute_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        else:  # a table made before AUTOINCREMENT: it reuses numbers anyway
            row = None
    else:
        row = db.execute_sql("SELECT pg_sequence_last_value(pg_get_serial_sequence(%s, 'seq')::regclass)",
                             (table,)).fetchone()
    return max(highest, int(row[0]) if row and row[0] is not None else 0)


def _queue_rows(device_ids: list[str]) -> Iterable[tuple[Any, ...]]:
    """(device, pending count, QueueEntry fields...) for the first QUEUE_LIST_LIMIT pending jobs of each."""
    return prepared_rows("queue_rows", _queue_query, *padded(device_ids))


def _queue_query(count: int) -> pw.Query:
    ranked = (ChildJob.select(
        ChildJob.device_id, ChildJob.job_id, ChildJob.parent, ChildJob.seq, ChildJob.status,
        pw.fn.ROW_NUMBER().over(partition_by=[ChildJob.device_id], order_by=[ChildJob.seq]).alias("position"),
        pw.fn.COUNT(ChildJob.seq).over(partition_by=[ChildJob.device_id]).alias("total"))
        .where(ChildJob.device_id.in_(args(count)), ChildJob.status.in_(PENDING)).alias("ranked"))
    return (Job.select(ranked.c.device_id, ranked.c.total, ranked.c.job_id, Job.job_id, Job.name, Job.command,
                       Job.timeout_seconds, Job.success_on_restart, ranked.c.seq, ranked.c.status, Job.created)
            .join(ranked, on=(ranked.c.parent_id == Job.job_id))
            .where(ranked.c.position <= QUEUE_LIST_LIMIT)
            .order_by(ranked.c.device_id, ranked.c.seq).tuples())


def has_history() -> bool:
    """Whether the database has devices or has ever had jobs (so agents already trust a key)."""
    return Device.select().exists() or highest_seq_ever() > 0
