"""Attempts and rollbacks of child jobs: Retries and OnFailure (docs/rollouts-attempts.md).

A child of a job with OnFailure has a partner, its rollback child: made in the same transaction,
right after it (so its Seq is next and below any later job of the device), SCHEDULED with no
release time. When the partner ends failed (after its retries), the rollback child is released
(QUEUED) and runs next; when the partner ends any other way, it ends CANCELED, "not needed".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import peewee as pw

from agent.protocol import JobStatus

from ..models import AttemptResult, ChildJob, now
from . import chunks, pieces

ROLLBACK_WAITS = "runs if child job {} fails"


def insert_with_rollbacks(parent_id: str, device_ids: list[str]) -> None:
    """Per device, a QUEUED child and its SCHEDULED rollback child, in that order (consecutive Seqs)."""
    created = now()
    for piece in pieces(device_ids, largest=128):
        rows = []
        for device_id in piece:
            partner = str(uuid.uuid4())
            rows.append(_row(partner, parent_id, device_id, JobStatus.QUEUED, created))
            rows.append(_row(str(uuid.uuid4()), parent_id, device_id, JobStatus.SCHEDULED, created,
                             reason=ROLLBACK_WAITS.format(partner), on_failure_of=partner))
        ChildJob.insert_many(rows).execute()


def _row(job_id: str, parent_id: str, device_id: str, status: JobStatus, created: object, **extra: object) -> dict:
    return {"job_id": job_id, "parent": parent_id, "device_id": device_id, "status": status.value, "stdout": "",
            "stderr": "", "updated": created, **extra}


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildView:
    """A child job as the API shows it: its earlier attempts, and its rollback child's id if it has one."""

    child: ChildJob
    earlier: tuple[AttemptResult, ...] = ()
    rollback_job_id: str | None = None


def child_views(children: list[ChildJob]) -> list[ChildView]:
    """The children (their parent joined) with their earlier attempts and rollback links."""
    retried = [c.seq for c in children if c.attempt > 1]
    earlier: dict[int, list[AttemptResult]] = {}
    for chunk in chunks(retried):
        for row in AttemptResult.select().where(AttemptResult.child.in_(chunk)).order_by(AttemptResult.number):
            earlier.setdefault(row.child_id, []).append(row)
    rollbacks = _rollback_ids([c for c in children if c.parent.on_failure_command is not None
                               and c.on_failure_of is None])
    return [ChildView(c, tuple(earlier.get(c.seq, ())), rollbacks.get(c.job_id)) for c in children]


def _rollback_ids(partners: list[ChildJob]) -> dict[str, str]:
    """Partner child job id -> its rollback child's id."""
    found: dict[str, str] = {}
    parents = sorted({c.parent_id for c in partners})
    for chunk in chunks([c.job_id for c in partners]):
        query = (ChildJob.select(ChildJob.on_failure_of, ChildJob.job_id)
                 .where(ChildJob.parent.in_(parents), ChildJob.on_failure_of.in_(chunk)).tuples())
        found.update(dict(query))
    return found


def rollback_counts(job_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per job with OnFailure: its rollback children per state."""
    counts: dict[str, dict[str, int]] = {}
    for chunk in chunks(job_ids):
        rows = (ChildJob.select(ChildJob.parent, ChildJob.status, pw.fn.COUNT(ChildJob.seq))
                .where(ChildJob.parent.in_(chunk), ChildJob.on_failure_of.is_null(False))
                .group_by(ChildJob.parent, ChildJob.status).tuples())
        for parent, status, n in rows:
            counts.setdefault(parent, {})[status] = n
    return {job_id: counts.get(job_id, {}) for job_id in job_ids}
