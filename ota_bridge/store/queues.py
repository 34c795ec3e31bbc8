"""Device queues: each device's pending jobs, head first, as the dispatcher publishes them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

import peewee as pw

from agent.protocol import QUEUE_LIST_LIMIT

from ..models import ChildJob, Job
from . import PENDING, chunks


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
    for chunk in chunks(device_ids):
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
