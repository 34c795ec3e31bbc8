"""Webhooks: the registered URLs, the outbox of POSTs to make, and the cursor over jobs that ended.

A sender (ota_bridge/webhooks.py) calls `enqueue_ended` to turn the jobs that ended since the
cursor into deliveries, one per webhook, in the same transaction that moves the cursor, so each
ending is enqueued once however many instances share the database. It then takes due deliveries
with `take_due` (a lease: their next attempt moves on) and reports each with `delivered`,
`retry_later` or `give_up`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import peewee as pw

from agent.protocol import FINAL_STATUSES, format_time

from .. import credentials
from ..errors import WebhookNotFound
from ..models import ChildJob, Job, Webhook, WebhookCursor, WebhookDelivery, db, now
from . import PENDING, chunks, write_transaction, writes_no_jobs
from .jobs import derive_status

CURSOR = "ended"
FINAL = [s.value for s in FINAL_STATUSES]
CHILD_EVENT, PARENT_EVENT = "childjob.ended", "job.ended"
FAILED_KEPT_DAYS = 7  # a receiver away for good must not grow the outbox for ever


@dataclass(frozen=True)
class WebhookView:
    webhook_id: str
    url: str
    created: datetime
    pending: int  # deliveries still to make
    failed: int  # deliveries given up on
    last_error: str | None


@dataclass(frozen=True)
class Delivery:
    delivery_id: int
    url: str
    secret: str
    body: str
    attempts: int  # made before this one


# --- the registry -------------------------------------------------------------------------


def create_webhook(url: str) -> tuple[WebhookView, str]:
    """A new webhook and its secret (shown to the caller once)."""
    secret = credentials.new_secret()
    hook = Webhook.create(webhook_id=str(uuid.uuid4()), url=url, secret=secret)
    return WebhookView(hook.webhook_id, hook.url, hook.created, 0, 0, None), secret


def list_webhooks() -> list[WebhookView]:
    counts: dict[tuple[str, bool], int] = {}
    rows = (WebhookDelivery.select(WebhookDelivery.webhook, WebhookDelivery.failed, pw.fn.COUNT(WebhookDelivery.id))
            .group_by(WebhookDelivery.webhook, WebhookDelivery.failed).tuples())
    for hook_id, failed, n in rows:
        counts[(hook_id, bool(failed))] = n
    errors = {}
    for row in (WebhookDelivery.select(WebhookDelivery.webhook, WebhookDelivery.last_error)
                .where(WebhookDelivery.last_error.is_null(False)).order_by(WebhookDelivery.id).tuples()):
        errors[row[0]] = row[1]  # the newest delivery's error wins
    return [WebhookView(h.webhook_id, h.url, h.created, counts.get((h.webhook_id, False), 0),
                        counts.get((h.webhook_id, True), 0), errors.get(h.webhook_id))
            for h in Webhook.select().order_by(Webhook.created, Webhook.webhook_id)]


def delete_webhook(webhook_id: str) -> None:
    """Forget a webhook and its undelivered POSTs."""
    with write_transaction():
        WebhookDelivery.delete().where(WebhookDelivery.webhook == webhook_id).execute()
        if not Webhook.delete().where(Webhook.webhook_id == webhook_id).execute():
            raise WebhookNotFound(webhook_id)


# --- from jobs that ended to deliveries ---------------------------------------------------


@writes_no_jobs
def enqueue_ended(settle_seconds: float, limit: int = 500) -> int:
    """Enqueue a POST per webhook for each child job that ended since the cursor, and for each
    parent job it ended; move the cursor past them. Only jobs that ended settle_seconds ago or
    more are read, so that a transaction another instance has not committed yet is not skipped.
    Returns how many deliveries were enqueued."""
    until = now() - timedelta(seconds=settle_seconds)
    if not _anything_ended(until):  # most polls: no write lock taken
        return 0
    with write_transaction():
        cursor = _cursor(until)
        hooks = [h.webhook_id for h in Webhook.select(Webhook.webhook_id)]
        ended = _ended(cursor, until, limit, whole=bool(hooks))
        if not ended:
            return 0
        bodies = _events(ended) if hooks else []
        rows = [{"webhook": hook, "body": body} for body in bodies for hook in hooks]
        for start in range(0, len(rows), 200):
            WebhookDelivery.insert_many(rows[start:start + 200]).execute()
        last = ended[-1]
        WebhookCursor.update(end_time=last.end_time, seq=last.seq).where(WebhookCursor.name == CURSOR).execute()
        return len(rows)


def _ended(cursor: WebhookCursor | None, until: datetime, limit: int, whole: bool) -> list[Any]:
    """The next `limit` jobs that ended after the cursor, in the cursor's order: whole rows when
    there are webhooks to tell, else only each one's (end_time, seq), all that moves the cursor
    (a model object per ended job cost the service more than a job's status messages did)."""
    columns = () if whole else (ChildJob.end_time, ChildJob.seq)
    query = (ChildJob.select(*columns).where(_after(cursor, until)).order_by(ChildJob.end_time, ChildJob.seq)
             .limit(limit))
    return list(query if whole else query.namedtuples())


def _after(cursor: WebhookCursor | None, until: datetime) -> pw.Expression:
    """Ended by `until`, and after the cursor."""
    ended = ChildJob.end_time.is_null(False) & (ChildJob.end_time <= until)
    if cursor is None:
        return ended
    return ended & ((ChildJob.end_time > cursor.end_time)
                    | ((ChildJob.end_time == cursor.end_time) & (ChildJob.seq > cursor.seq)))


def _anything_ended(until: datetime) -> bool:
    """A read without locks: is there a job to enqueue, or no cursor yet?"""
    cursor = WebhookCursor.get_or_none(WebhookCursor.name == CURSOR)
    return cursor is None or ChildJob.select().where(_after(cursor, until)).exists()


def _cursor(start: datetime) -> WebhookCursor:
    """The cursor, locked against other instances; made at `start` the first time (no history is sent)."""
    def locked() -> WebhookCursor | None:
        query = WebhookCursor.select().where(WebhookCursor.name == CURSOR)
        if not isinstance(db.obj, pw.SqliteDatabase):  # SQLite's IMMEDIATE transaction already excludes writers
            query = query.for_update()
        return query.first()

    found = locked()
    if found is None:
        WebhookCursor.insert(name=CURSOR, end_time=start, seq=0).on_conflict_ignore().execute()
        found = locked()
    return found


def _events(ended: list[ChildJob]) -> list[str]:
    bodies = [json.dumps(_child_event(child)) for child in ended]
    last_here = {child.parent_id: child for child in ended}  # per parent, the last of its children here
    counts = _counts(list(last_here))
    done = [p for p in last_here if not counts[p].keys() & set(PENDING)]
    last = _last_to_end(done)
    jobs = {job.job_id: job for chunk in chunks(done) for job in Job.select().where(Job.job_id.in_(chunk))}
    for parent_id in done:  # a parent ends with the last of its children to end: sent once
        if last.get(parent_id) == last_here[parent_id].seq and parent_id in jobs:
            bodies.append(json.dumps(_parent_event(jobs[parent_id], counts[parent_id],
                                                   last_here[parent_id].end_time)))
    return bodies


def _counts(parent_ids: list[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {p: {} for p in parent_ids}
    for chunk in chunks(parent_ids):
        rows = (ChildJob.select(ChildJob.parent, ChildJob.status, pw.fn.COUNT(ChildJob.seq))
                .where(ChildJob.parent.in_(chunk), ChildJob.on_failure_of.is_null())  # rollbacks apart, as the API
                .group_by(ChildJob.parent, ChildJob.status).tuples())
        for parent_id, status, n in rows:
            counts[parent_id][status] = n
    return counts


def _last_to_end(parent_ids: list[str]) -> dict[str, int]:
    """Per parent, the seq of the child that ended last (by end time, then seq)."""
    other = ChildJob.alias()
    latest = other.select(pw.fn.MAX(other.end_time)).where(other.parent == ChildJob.parent)
    last: dict[str, int] = {}
    for chunk in chunks(parent_ids):
        rows = (ChildJob.select(ChildJob.parent, pw.fn.MAX(ChildJob.seq))
                .where(ChildJob.parent.in_(chunk), ChildJob.end_time == latest).group_by(ChildJob.parent).tuples())
        last.update(dict(rows))
    return last


def _child_event(child: ChildJob) -> dict[str, Any]:
    return {"Event": CHILD_EVENT, "JobId": child.job_id, "ParentJobId": child.parent_id,
            "DeviceId": child.device_id, "Status": child.status, "ExitCode": child.exit_code,
            "Reason": child.reason, "StartTime": _time(child.start_time), "EndTime": _time(child.end_time)}


def _parent_event(job: Job, counts: dict[str, int], end_time: datetime) -> dict[str, Any]:
    return {"Event": PARENT_EVENT, "JobId": job.job_id, "JobName": job.name, "WorkflowId": job.workflow_id,
            job.target_field: job.target_value, "Status": derive_status(counts).value,
            "Counts": {**counts, "Total": sum(counts.values())}, "EndTime": _time(end_time)}


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


# --- the outbox ---------------------------------------------------------------------------


@writes_no_jobs
def take_due(limit: int, lease_seconds: float) -> list[Delivery]:
    """Deliveries due now, leased: no other sender takes them for lease_seconds."""
    current = now()
    due = WebhookDelivery.failed == False, WebhookDelivery.next_attempt <= current  # noqa: E712
    if not WebhookDelivery.select().where(*due).exists():  # most polls: no write lock taken
        return []
    with write_transaction():
        query = (WebhookDelivery.select().where(*due).order_by(WebhookDelivery.next_attempt, WebhookDelivery.id)
                 .limit(limit))
        if not isinstance(db.obj, pw.SqliteDatabase):  # other instances skip what this one takes
            query = query.for_update("FOR UPDATE SKIP LOCKED")
        rows = list(query)
        if not rows:
            return []
        (WebhookDelivery.update(next_attempt=current + timedelta(seconds=lease_seconds))
         .where(WebhookDelivery.id.in_([r.id for r in rows])).execute())
        hooks = {h.webhook_id: h for h in Webhook.select().where(Webhook.webhook_id.in_({r.webhook_id for r in rows}))}
    return [Delivery(r.id, hooks[r.webhook_id].url, hooks[r.webhook_id].secret, r.body, r.attempts) for r in rows
            if r.webhook_id in hooks]


@writes_no_jobs
def delivered(delivery_id: int) -> None:
    WebhookDelivery.delete().where(WebhookDelivery.id == delivery_id).execute()


@writes_no_jobs
def retry_later(delivery_id: int, error: str, delay_seconds: float) -> None:
    (WebhookDelivery.update(attempts=WebhookDelivery.attempts + 1, last_error=error[:300],
                            next_attempt=now() + timedelta(seconds=delay_seconds))
     .where(WebhookDelivery.id == delivery_id).execute())


@writes_no_jobs
def give_up(delivery_id: int, error: str) -> None:
    """Keep the delivery as failed, to be seen; forget those failed FAILED_KEPT_DAYS ago."""
    with write_transaction():
        (WebhookDelivery.update(attempts=WebhookDelivery.attempts + 1, last_error=error[:300], failed=True)
         .where(WebhookDelivery.id == delivery_id).execute())
        (WebhookDelivery.delete().where(WebhookDelivery.failed == True,  # noqa: E712
                                        WebhookDelivery.created < now() - timedelta(days=FAILED_KEPT_DAYS))
         .execute())
