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
from . import PENDING, write_transaction
from .jobs import derive_status

CURSOR = "ended"
FINAL = [s.value for s in FINAL_STATUSES]
CHILD_EVENT, PARENT_EVENT = "childjob.ended", "job.ended"


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


def enqueue_ended(settle_seconds: float, limit: int = 500) -> int:
    """Enqueue a POST per webhook for each child job that ended since the cursor, and for each
    parent job it ended; move the cursor past them. Only jobs that ended settle_seconds ago or
    more are read, so that a transaction another instance has not committed yet is not skipped.
    Returns how many deliveries were enqueued."""
    until = now() - timedelta(seconds=settle_seconds)
    with write_transaction():
        cursor = _cursor(until)
        ended = list(ChildJob.select().where(
            ChildJob.end_time.is_null(False), ChildJob.end_time <= until,
            (ChildJob.end_time > cursor.end_time) | ((ChildJob.end_time == cursor.end_time)
                                                     & (ChildJob.seq > cursor.seq)))
            .order_by(ChildJob.end_time, ChildJob.seq).limit(limit))
        if not ended:
            return 0
        hooks = [h.webhook_id for h in Webhook.select(Webhook.webhook_id)]
        bodies = _events(ended) if hooks else []
        rows = [{"webhook": hook, "body": body} for body in bodies for hook in hooks]
        for start in range(0, len(rows), 200):
            WebhookDelivery.insert_many(rows[start:start + 200]).execute()
        last = ended[-1]
        WebhookCursor.update(end_time=last.end_time, seq=last.seq).where(WebhookCursor.name == CURSOR).execute()
        return len(rows)


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
    parents = {child.parent_id: child for child in ended}  # per parent, the last of its children here
    for parent_id, child in parents.items():
        counts = _counts(parent_id)
        if not counts.keys() & set(PENDING) and _last_to_end(parent_id) == child.seq:
            bodies.append(json.dumps(_parent_event(Job.get_by_id(parent_id), counts, child.end_time)))
    return bodies


def _counts(parent_id: str) -> dict[str, int]:
    rows = (ChildJob.select(ChildJob.status, pw.fn.COUNT(ChildJob.seq)).where(ChildJob.parent == parent_id)
            .group_by(ChildJob.status).tuples())
    return {status: n for status, n in rows if n}


def _last_to_end(parent_id: str) -> int | None:
    last = (ChildJob.select(ChildJob.seq).where(ChildJob.parent == parent_id)
            .order_by(ChildJob.end_time.desc(), ChildJob.seq.desc()).first())
    return last.seq if last else None


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


def take_due(limit: int, lease_seconds: float) -> list[Delivery]:
    """Deliveries due now, leased: no other sender takes them for lease_seconds."""
    current = now()
    with write_transaction():
        rows = list(WebhookDelivery.select(WebhookDelivery, Webhook).join(Webhook)
                    .where(WebhookDelivery.failed == False, WebhookDelivery.next_attempt <= current)  # noqa: E712
                    .order_by(WebhookDelivery.next_attempt, WebhookDelivery.id).limit(limit))
        if rows:
            (WebhookDelivery.update(next_attempt=current + timedelta(seconds=lease_seconds))
             .where(WebhookDelivery.id.in_([r.id for r in rows])).execute())
    return [Delivery(r.id, r.webhook.url, r.webhook.secret, r.body, r.attempts) for r in rows]


def delivered(delivery_id: int) -> None:
    WebhookDelivery.delete().where(WebhookDelivery.id == delivery_id).execute()


def retry_later(delivery_id: int, error: str, delay_seconds: float) -> None:
    (WebhookDelivery.update(attempts=WebhookDelivery.attempts + 1, last_error=error[:300],
                            next_attempt=now() + timedelta(seconds=delay_seconds))
     .where(WebhookDelivery.id == delivery_id).execute())


def give_up(delivery_id: int, error: str) -> None:
    (WebhookDelivery.update(attempts=WebhookDelivery.attempts + 1, last_error=error[:300], failed=True)
     .where(WebhookDelivery.id == delivery_id).execute())
