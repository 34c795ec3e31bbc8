"""The dispatcher moves a device's head along the queue it remembers, without reading it, only
while the store proves that queue current; what it publishes so is what a read would give."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import peewee as pw

from agent.protocol import QUEUE_LIST_LIMIT, JobStatus, Key, Topics, decode, encode
from ota_bridge.device_messages import head_message, queue_message
from ota_bridge.dispatch import Dispatcher
from ota_bridge.models import now
from ota_bridge.mqtt_link import Incoming
from ota_bridge.store import Store, audit, devices, jobs, queues, webhooks, workflows
from ota_bridge.store.audit import AuditRecord
from ota_bridge.store.job_options import NO_OPTIONS, JobOptions, Retries

TOPICS = Topics()


class FakeLink:
    """What the dispatcher hands the broker, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        self.sent.append((topic, payload))

    async def room(self, limit: int | None = None) -> None:
        return None

    def ack(self, message: Incoming) -> None:
        return None

    def heads(self, device_id: str) -> list[dict]:
        return [decode(p, 1 << 20) for t, p in self.sent if t == TOPICS.job(device_id)]

    def last(self, topic: str) -> bytes:
        return [p for t, p in self.sent if t == topic][-1]


def _queued(db: Store, count: int, first: JobOptions = NO_OPTIONS) -> list[tuple[str, str]]:
    """`count` jobs queued on device d0 (the first with these options): (parent job id, child job
    id) of each, in order."""
    db.call_sync(devices.register_device, "d0", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    parents = [db.call_sync(jobs.submit_job, f"j{i}", wf.workflow_id, "DeviceId", "d0", None,
                            options=first if i == 0 else NO_OPTIONS)[0].job_id for i in range(count)]
    return [(p, db.call_sync(jobs.child_jobs, p)[0].job_id) for p in parents]


def _report(job_id: str, status: JobStatus) -> Incoming:
    payload = encode({Key.JOB_ID: job_id, Key.STATUS: status.value, Key.EXIT_CODE: 0 if status.is_final else None})
    return Incoming(TOPICS.status("d0"), payload, False, 0, 0)


async def _until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _run(db: Store, steps: Callable[[Dispatcher, FakeLink], Awaitable[None]]) -> None:
    """Run steps against a dispatcher whose publisher runs and has published d0's first head."""

    async def scenario() -> None:
        link = FakeLink()
        dispatcher = Dispatcher(db, TOPICS)
        dispatcher.attach(link)  # type: ignore[arg-type]
        publisher = asyncio.get_running_loop().create_task(dispatcher.run_publisher())
        try:
            dispatcher.mark(["d0"])
            await _until(lambda: link.heads("d0"), "the first head")
            await steps(dispatcher, link)
        finally:
            publisher.cancel()

    asyncio.run(scenario())


def _without_issue_time(head: bytes | dict) -> dict:
    fields = decode(head, 1 << 20) if isinstance(head, bytes) else dict(head)
    fields.pop(Key.ISSUED_AT)
    return fields


def test_a_final_moves_the_head_along_the_remembered_queue_as_a_read_would(db: Store) -> None:
    children = [c for _, c in _queued(db, QUEUE_LIST_LIMIT + 3)]  # more than the list shows: the list keeps its length
    sqlite = isinstance(db.database, pw.SqliteDatabase)  # elsewhere every call counts as a change

    async def steps(dispatcher: Dispatcher, link: FakeLink) -> None:
        for i, done in enumerate(children[:3]):
            await dispatcher._handle([_report(done, JobStatus.IN_PROGRESS)])
            await db.call(devices.all_device_ids)  # a call that changes nothing: on SQLite the epoch stays
            await dispatcher._handle([_report(done, JobStatus.SUCCEEDED)])
            assert "d0" not in dispatcher._dirty or not sqlite  # published from memory, no read needed
            await _until(lambda i=i: link.heads("d0")[-1][Key.JOB_ID] == children[i + 1], "the next head")
            (read,) = await db.call(queues.device_queues, ["d0"])
            assert _without_issue_time(link.heads("d0")[-1]) == _without_issue_time(
                head_message("d0", read.head, read.floor, now()))
            assert link.last(TOPICS.queue("d0")) == queue_message(read)
        assert [h[Key.JOB_ID] for h in link.heads("d0")] == children[:4]

    _run(db, steps)


def test_an_audit_row_or_a_webhook_write_leaves_the_remembered_queue_current(db: Store) -> None:
    """Every POST writes an audit row after its submission read the queues, and the webhook sender
    writes its cursor: neither touches a queue, so a final after them still moves along from memory."""
    children = [c for _, c in _queued(db, 3)]
    entry = AuditRecord("admin", "admin", "127.0.0.1", "POST", "/v1/job", None, 200, "ok")

    async def steps(dispatcher: Dispatcher, link: FakeLink) -> None:
        await dispatcher._handle([_report(children[0], JobStatus.IN_PROGRESS)])
        await db.call(audit.record, entry)
        await db.call(webhooks.enqueue_ended, 0)
        await dispatcher._handle([_report(children[0], JobStatus.SUCCEEDED)])
        assert "d0" not in dispatcher._dirty  # published from memory, no read needed
        assert link.heads("d0")[-1][Key.JOB_ID] == children[1]
        (read,) = await db.call(queues.device_queues, ["d0"])
        assert link.last(TOPICS.queue("d0")) == queue_message(read)
        assert db.call_sync(audit.list_entries, 10, 0)[0][0].record == entry

    _run(db, steps)


def test_a_write_the_dispatcher_was_not_told_of_makes_it_read_the_queue(db: Store) -> None:
    """A cancel committed but not yet marked (its API call has not come back): the final after it
    must not publish the canceled job from memory."""
    queued = _queued(db, 3)
    children = [c for _, c in queued]

    async def steps(dispatcher: Dispatcher, link: FakeLink) -> None:
        await dispatcher._handle([_report(children[0], JobStatus.IN_PROGRESS)])
        await db.call(jobs.cancel_job, queued[1][0])  # nobody calls dispatcher.mark
        await dispatcher._handle([_report(children[0], JobStatus.SUCCEEDED)])
        await _until(lambda: link.heads("d0")[-1].get(Key.JOB_ID) == children[2], "the third job's head")
        assert children[1] not in [h.get(Key.JOB_ID) for h in link.heads("d0")]

    _run(db, steps)


def test_the_last_final_publishes_the_idle_head_with_the_highest_seq_as_floor(db: Store) -> None:
    ((_, child),) = _queued(db, 1)

    async def steps(dispatcher: Dispatcher, link: FakeLink) -> None:
        await dispatcher._handle([_report(child, JobStatus.IN_PROGRESS), _report(child, JobStatus.FAILED)])
        assert "d0" not in dispatcher._dirty
        (read,) = await db.call(queues.device_queues, ["d0"])
        assert read.head is None and link.heads("d0")[-1] == {
            Key.DEVICE_ID: "d0", Key.FLOOR: read.floor, Key.ISSUED_AT: link.heads("d0")[-1][Key.ISSUED_AT]}
        assert link.last(TOPICS.queue("d0")) == b""

    _run(db, steps)


def test_a_final_that_starts_a_retry_keeps_the_head_on_the_retried_job(db: Store) -> None:
    """The update's own outcome (FAILED) is not what the store did (a retry, SCHEDULED): the next job
    must wait behind the retried one, so the queue is read, not moved along."""
    queued = _queued(db, 2, JobOptions(retries=Retries(max=1, delay_seconds=3600)))
    children = [c for _, c in queued]

    async def steps(dispatcher: Dispatcher, link: FakeLink) -> None:
        await dispatcher._handle([_report(children[0], JobStatus.IN_PROGRESS)])
        await dispatcher._handle([_report(children[0], JobStatus.FAILED)])
        await _until(lambda: Key.JOB_ID not in link.heads("d0")[-1], "the idle head (the retry is held)")
        (read,) = await db.call(queues.device_queues, ["d0"])
        assert read.entries[0].job_id == children[0] and link.heads("d0")[-1][Key.FLOOR] == read.floor
        assert children[1] not in [h.get(Key.JOB_ID) for h in link.heads("d0")]

    _run(db, steps)
