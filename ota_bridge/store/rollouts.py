"""Held jobs and their release: SCHEDULED children become QUEUED, one transaction per batch.

A release is a conditional UPDATE (`... WHERE status = 'SCHEDULED'`), so two instances that
release the same child at once release it once: the second finds it QUEUED and changes nothing.
"""

from __future__ import annotations

from datetime import datetime

from agent.protocol import JobStatus

from ..models import ChildJob, now
from . import chunks, idempotent, write_transaction

RELEASE_BATCH = 500  # children per release transaction
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


def release_children(children: list[tuple[int, str]]) -> list[str]:
    """Inside the caller's transaction: these (seq, device id) children, if still SCHEDULED, become
    QUEUED; returns their devices, sorted."""
    for chunk in chunks([seq for seq, _ in children]):
        (ChildJob.update(status=JobStatus.QUEUED.value, reason=None, release_at=None, updated=now())
         .where(ChildJob.seq.in_(chunk), ChildJob.status == SCHEDULED).execute())
    return sorted({device for _, device in children})
