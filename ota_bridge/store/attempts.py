"""Attempts and rollbacks of child jobs: Retries and OnFailure (docs/rollouts-attempts.md).

An attempt that ends FAILED or TIMED_OUT (by the device's report, or the service's timeout of a
silent device) is retried when the job's Retries allow: its result is kept as an AttemptResult
row, and the child goes back to SCHEDULED (a service-only transition of TRANSITIONS) with the
next attempt number, a release_at of now plus the delay on the service's clock, and a Reason
saying so; the release loop (store/rollouts.py) makes it QUEUED when due. The child keeps its Seq,
so the device's later jobs keep waiting behind it. Only the last attempt makes the child final.

A child of a job with OnFailure has a partner, its rollback child: made in the same transaction,
right after it (so its Seq is next and below any later job of the device), SCHEDULED with no
release time. When the partner ends failed (after its retries), the rollback child is released
(QUEUED) and runs next; when the partner ends any other way, it ends CANCELED, "not needed".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import peewee as pw

from agent.protocol import FINAL_STATUSES, JobStatus, can_transition, format_time

from .. import clock
from ..models import AttemptResult, ChildJob, Job, now
from . import arg, chunks, finalize, pieces, prepared_rows, release_children

if TYPE_CHECKING:
    from .updates import Update

ROLLBACK_WAITS = "runs if child job {} fails"
# A partner ending so releases its rollback child; any other end makes it "not needed".
ROLLBACK_ON = frozenset({JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.INTERRUPTED})
SCHEDULED = JobStatus.SCHEDULED.value


@dataclass(frozen=True)
class Policy:
    """What a job says about retries and rollbacks."""

    retry_max: int
    delay_seconds: int
    retry_on: frozenset[str]
    has_rollback: bool


class Attempts:
    """Retries and rollbacks, inside the caller's transaction; each job's Policy is read once."""

    def __init__(self) -> None:
        self._policies: dict[str, Policy] = {}

    def policy(self, parent_id: str) -> Policy:
        if parent_id not in self._policies:
            row = next(iter(prepared_rows("job_policy", _policy, parent_id)), None) or (0, 0, "", None)
            self._policies[parent_id] = Policy(row[0], row[1], frozenset(filter(None, row[2].split(","))),
                                               row[3] is not None)
        return self._policies[parent_id]

    def retried(self, child: ChildJob, update: Update) -> bool:
        """A device ended an attempt: start the child's retry (True), or leave it to end (False)."""
        outcome = {"start_time": update.start_time or child.start_time, "end_time": update.end_time or now(),
                   "exit_code": update.exit_code, "stdout": update.stdout, "stderr": update.stderr,
                   "stdout_truncated": update.stdout_truncated, "stderr_truncated": update.stderr_truncated,
                   "reason": update.reason}
        return self._retry(child, update.status, outcome)

    def retried_by_service(self, child: ChildJob, status: JobStatus, reason: str) -> bool:
        """The service ended an attempt (a silent device's timeout): as retried()."""
        outcome = {"start_time": child.start_time, "end_time": now(), "exit_code": child.exit_code,
                   "stdout": child.stdout, "stderr": child.stderr, "stdout_truncated": child.stdout_truncated,
                   "stderr_truncated": child.stderr_truncated, "reason": reason}
        return self._retry(child, status, outcome)

    def _retry(self, child: ChildJob, status: JobStatus, outcome: dict[str, Any]) -> bool:
        policy = self.policy(child.parent_id)
        if (child.on_failure_of is not None or status.value not in policy.retry_on
                or child.attempt > policy.retry_max
                or not can_transition(JobStatus(child.status), JobStatus.SCHEDULED)):
            return False
        AttemptResult.insert(child=child.seq, number=child.attempt, status=status.value, **outcome).execute()
        number = child.attempt + 1
        release_at = clock.now() + timedelta(seconds=policy.delay_seconds)
        (ChildJob.update(status=SCHEDULED, attempt=number, release_at=release_at, updated=now(),
                         reason=f"retry {number - 1} of {policy.retry_max} (attempt {number}) at "
                                f"{format_time(release_at)}",
                         start_time=None, end_time=None, exit_code=None, stdout="", stderr="",
                         stdout_truncated=False, stderr_truncated=False, finalized_by_service=False)
         .where(ChildJob.seq == child.seq).execute())
        child.attempt = number
        return True

    def ended(self, child: ChildJob, status: JobStatus) -> None:
        """The child is final: release its rollback child if it failed, else end that one "not needed"."""
        if child.on_failure_of is not None or not self.policy(child.parent_id).has_rollback:
            return
        rollbacks = list(ChildJob.select(ChildJob.seq, ChildJob.device_id)
                         .where(ChildJob.device_id == child.device_id, ChildJob.status == SCHEDULED,
                                ChildJob.on_failure_of == child.job_id).tuples())
        if status in ROLLBACK_ON:
            release_children(rollbacks)
        elif rollbacks:
            finalize(JobStatus.CANCELED, f"not needed: child job {child.job_id} ended {status.value}",
                     ChildJob.seq.in_([seq for seq, _ in rollbacks]))


def _policy(_: int) -> pw.Query:
    return (Job.select(Job.retry_max, Job.retry_delay_seconds, Job.retry_on, Job.on_failure_command)
            .where(Job.job_id == arg(0)).tuples())


def end_silent(seqs: list[int], status: JobStatus, reason: str) -> None:
    """The service ends these children's attempts (the device went silent): each is retried, or
    made final (finalized by the service) with its rollback settled."""
    book = Attempts()
    children = [c for chunk in chunks(seqs) for c in ChildJob.select().where(ChildJob.seq.in_(chunk))]
    final = [c for c in children if not book.retried_by_service(c, status, reason)]
    for chunk in chunks([c.seq for c in final]):
        finalize(status, reason, ChildJob.seq.in_(chunk))
    for child in final:
        book.ended(child, status)


def settle_stray_rollbacks() -> list[str]:
    """Settle the rollback children still SCHEDULED whose partner is final: one that a path which
    does not know rollbacks (a rollout's abort, say) ended. Returns the devices whose queues moved.
    A safety net, run with the timeouts: a rollback child left SCHEDULED would hold its device."""
    rollback = ChildJob.alias()
    partners = list(ChildJob.select().join(rollback, on=(rollback.on_failure_of == ChildJob.job_id))
                    .where(rollback.status == SCHEDULED, ChildJob.status.in_([s.value for s in FINAL_STATUSES])))
    book = Attempts()
    for partner in partners:
        book.ended(partner, JobStatus(partner.status))
    return sorted({p.device_id for p in partners})


def insert_with_rollbacks(parent_id: str, device_ids: list[str], held: list[str] | None = None) -> None:
    """Per device, a child (QUEUED, or with `held` SCHEDULED with held[i] as its reason: a rollout's)
    and its SCHEDULED rollback child, in that order (consecutive Seqs)."""
    created = now()
    reasons = iter(held or [])
    status = JobStatus.QUEUED if held is None else JobStatus.SCHEDULED
    for piece in pieces(device_ids, largest=128):
        rows = []
        for device_id in piece:
            partner = str(uuid.uuid4())
            rows.append(_row(partner, parent_id, device_id, status, created, next(reasons, None), None))
            rows.append(_row(str(uuid.uuid4()), parent_id, device_id, JobStatus.SCHEDULED, created,
                             ROLLBACK_WAITS.format(partner), partner))
        ChildJob.insert_many(rows).execute()


def _row(job_id: str, parent_id: str, device_id: str, status: JobStatus, created: object, reason: str | None,
         on_failure_of: str | None) -> dict[str, Any]:
    """Every row names the same columns: a multi-row INSERT takes its columns from the first."""
    return {"job_id": job_id, "parent": parent_id, "device_id": device_id, "status": status.value, "stdout": "",
            "stderr": "", "updated": created, "reason": reason, "on_failure_of": on_failure_of}


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
            earlier.setdefault(row.child_seq, []).append(row)
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
