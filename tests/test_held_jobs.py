"""Held (SCHEDULED) jobs on a real SQLite file: the state table, their place in the queue, release."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest

from agent.protocol import DEVICE_REPORTABLE, PENDING_STATUSES, SERVICE_ONLY, TRANSITIONS, JobStatus, Key
from ota_bridge import models
from ota_bridge.device_messages import queue_message
from ota_bridge.models import ChildJob, now
from ota_bridge.rollout_plan import parse
from ota_bridge.store import Store, devices, jobs, queues, workflows, write_transaction
from ota_bridge.store import rollouts as held
from ota_bridge.store.jobs import derive_status
from ota_bridge.store.updates import Update, record_device_messages
from tests.support.databases import database_url


def test_scheduled_is_held_by_the_service_only() -> None:
    assert TRANSITIONS[JobStatus.SCHEDULED] == {JobStatus.QUEUED, JobStatus.CANCELED}
    assert JobStatus.SCHEDULED not in DEVICE_REPORTABLE
    assert not JobStatus.SCHEDULED.is_final
    # a retry (store/attempts.py) is the only way back into SCHEDULED, and only the service takes it
    assert {s for s, targets in TRANSITIONS.items() if JobStatus.SCHEDULED in targets} == PENDING_STATUSES
    assert SERVICE_ONLY == {(s, JobStatus.SCHEDULED) for s in PENDING_STATUSES}


def test_a_scheduled_child_counts_as_pending_in_its_parent() -> None:
    assert derive_status({"SCHEDULED": 3}) is JobStatus.QUEUED
    assert derive_status({"SCHEDULED": 1, "SUCCEEDED": 1}) is JobStatus.IN_PROGRESS


def _hold(seq: int, reason: str, release_at: object = None) -> None:
    with write_transaction():
        ChildJob.update(status=JobStatus.SCHEDULED.value, reason=reason, release_at=release_at).where(
            ChildJob.seq == seq).execute()


def _two_jobs(db: Store) -> tuple[ChildJob, ChildJob]:
    db.call_sync(devices.register_device, "d1", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    first, _ = db.call_sync(jobs.submit_job, "first", wf.workflow_id, "DeviceId", "d1", None)
    second, _ = db.call_sync(jobs.submit_job, "second", wf.workflow_id, "DeviceId", "d1", None)
    return tuple(db.call_sync(jobs.child_jobs, job.job_id)[0] for job in (first, second))  # type: ignore[return-value]


def test_a_held_job_keeps_its_place_and_the_queue_shows_why(db: Store) -> None:
    first, second = _two_jobs(db)
    db.call_sync(_hold, first.seq, "rollout: wave 2 of 4 not released")
    [queue] = db.call_sync(queues.device_queues, ["d1"])
    assert queue.head is None  # the idle head: nothing to run
    assert queue.floor == first.seq - 1
    message = json.loads(queue_message(queue))
    assert [(j[Key.STATUS], j.get(Key.REASON)) for j in message[Key.JOBS]] == [
        ("SCHEDULED", "rollout: wave 2 of 4 not released"), ("QUEUED", None)]
    # The later job waits: a report about it is not the device's current job.
    outcomes = db.call_sync(record_device_messages, [Update("d1", second.job_id, JobStatus.IN_PROGRESS)], [])
    assert outcomes.dropped and "not the device's current job" in outcomes.dropped[0][1]
    outcomes = db.call_sync(record_device_messages, [Update("d1", first.job_id, JobStatus.CANCELED)], [])
    assert "held by the service" in outcomes.dropped[0][1]


def test_a_held_job_is_released_when_due_and_canceled_like_a_queued_one(db: Store) -> None:
    first, second = _two_jobs(db)
    later = now() + timedelta(minutes=5)
    db.call_sync(_hold, first.seq, "retry in 5 minutes", later)
    assert db.call_sync(held.release_due, now()) == []
    assert db.call_sync(held.release_due, later) == ["d1"]
    assert db.call_sync(held.release_due, later) == []  # released once
    [queue] = db.call_sync(queues.device_queues, ["d1"])
    assert queue.head is not None and queue.head.job_id == first.job_id
    db.call_sync(_hold, second.seq, "held")
    assert db.call_sync(jobs.cancel_job, second.parent_id) == ["d1"]
    assert db.call_sync(jobs.get_child, second.job_id).status == "CANCELED"


def test_a_rollout_submission_builds_the_queues_a_read_would_give(db: Store) -> None:
    """The held children's queues come from the submission (Dispatcher.mark_read), not a read:
    only for devices whose one pending job is the new child, and equal to what a read gives."""
    for device_id in ("d1", "d2", "d3"):
        db.call_sync(devices.register_device, device_id, "g", [])
    wf = db.call_sync(workflows.create_workflow, "wf", "echo hi", None, False)
    db.call_sync(jobs.submit_job, "earlier", wf.workflow_id, "DeviceId", "d2", None)  # d2 has a job before
    plan = parse({"Rollout": {"Waves": [50, 100]}}, "DeviceGroup")
    assert plan is not None
    submitted = db.call_sync(held.submit_with_queues, "waves", wf.workflow_id, "DeviceGroup", "g", None, plan)
    assert submitted.device_ids == ["d1", "d2", "d3"]
    assert [q.device_id for q in submitted.queues] == ["d1", "d3"]
    read = db.call_sync(queues.device_queues, ["d1", "d3"])
    for built, fresh in zip(submitted.queues, read, strict=True):
        assert built.head is None and built.total == 1
        assert (built.head, built.floor, built.total) == (fresh.head, fresh.floor, fresh.total)
        assert queue_message(built) == queue_message(fresh)
        assert json.loads(queue_message(built))[Key.JOBS][0][Key.REASON].startswith("rollout: wave")


def test_the_built_queues_leave_out_every_device_with_a_pending_job(db: Store) -> None:
    """More jobs pending than target devices (the submission then asks per device, not from the
    pending jobs' devices): still only the devices without one get a built queue, equal to a read."""
    for device_id in ("d1", "d2", "d3", "other"):
        db.call_sync(devices.register_device, device_id, "g" if device_id != "other" else None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "echo hi", None, False)
    for device_id in ("other", "other", "other", "other", "d3"):
        db.call_sync(jobs.submit_job, "earlier", wf.workflow_id, "DeviceId", device_id, None)
    plan = parse({"Rollout": {"MaxPerMinute": 1}}, "DeviceGroup")
    assert plan is not None
    submitted = db.call_sync(held.submit_with_queues, "rate", wf.workflow_id, "DeviceGroup", "g", None, plan)
    assert [q.device_id for q in submitted.queues] == ["d1", "d2"]
    for built, fresh in zip(submitted.queues, db.call_sync(queues.device_queues, ["d1", "d2"]), strict=True):
        assert (built.head, built.floor, built.total) == (fresh.head, fresh.floor, fresh.total)
        assert queue_message(built) == queue_message(fresh)


def test_a_database_from_before_release_at_gets_the_column_and_its_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).close()
    with sqlite3.connect(tmp_path / "old.db") as old:  # as a database made before release_at was
        old.execute("DROP INDEX child_job_status_release_at")
        old.execute("ALTER TABLE child_job DROP COLUMN release_at")
    store = Store(url)
    try:
        assert store.call_sync(lambda: "release_at" in {c.name for c in models.db.get_columns("child_job")})
        assert "child_job_status_release_at" in store.call_sync(
            lambda: {i.name for i in models.db.get_indexes("child_job")})
        assert store.call_sync(held.release_due, now()) == []
    finally:
        store.close()


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with database_url("postgres", tmp_path) as found:
        yield found


def _child_indexes(store: Store) -> set[str]:
    return store.call_sync(lambda: {i.name for i in models.db.get_indexes("child_job")})


@pytest.mark.postgres
def test_a_postgres_database_with_the_earlier_indexes_gets_those_a_release_costs_less_with(postgres_url: str) -> None:
    """PostgreSQL writes a released child's new version into every index it meets the predicate of:
    an older database's full (end_time, seq) index and the one on parent_id are replaced at open by
    the partial child_job_ended (a child not yet ended is not in it) and (parent_id, status) alone;
    jobs still run and end, and the webhooks' read of the jobs that ended can use the new index."""
    store = Store(postgres_url)
    try:
        assert {"child_job_ended", "child_job_parent_id_status"} <= _child_indexes(store)
        assert not {"child_job_parent_id", "child_job_end_time_seq"} & _child_indexes(store)

        def as_before() -> None:  # the indexes as an earlier version made them
            models.db.execute_sql('DROP INDEX "child_job_ended"')
            models.db.execute_sql('CREATE INDEX "child_job_parent_id" ON "child_job" ("parent_id")')
            models.db.execute_sql('CREATE INDEX "child_job_end_time_seq" ON "child_job" ("end_time", "seq")')
        store.call_sync(as_before)
    finally:
        store.close()
    store = Store(postgres_url)
    try:
        indexes = _child_indexes(store)
        assert "child_job_ended" in indexes
        assert not {"child_job_parent_id", "child_job_end_time_seq"} & indexes
        store.call_sync(devices.register_device, "d1", None, [])
        wf = store.call_sync(workflows.create_workflow, "wf", "echo hi", None, False)
        job, _ = store.call_sync(jobs.submit_job, "one", wf.workflow_id, "DeviceId", "d1", None)
        [head] = store.call_sync(queues.device_queues, ["d1"])
        assert head.head is not None
        store.call_sync(record_device_messages, [Update("d1", head.head.job_id, JobStatus.SUCCEEDED)], [])
        assert store.call_sync(jobs.get_job, job.job_id).counts == {JobStatus.SUCCEEDED.value: 1}
        assert "child_job_ended" in store.call_sync(_webhooks_plan)
    finally:
        store.close()


def _webhooks_plan() -> str:
    """PostgreSQL's plan of the webhooks' read of the jobs that ended (sequential scans off: the
    table is small), as text."""
    with models.db.atomic():
        models.db.execute_sql("SET LOCAL enable_seqscan = off")
        rows = models.db.execute_sql(
            'EXPLAIN SELECT * FROM "child_job" WHERE "end_time" IS NOT NULL AND "end_time" <= %s AND '
            '("end_time" > %s OR ("end_time" = %s AND "seq" > %s)) ORDER BY "end_time", "seq" LIMIT 100',
            ("2026-01-02", "2026-01-01", "2026-01-01", 5)).fetchall()
    return " ".join(row[0] for row in rows)


def test_a_sqlite_database_keeps_the_full_indexes_no_release_writes(tmp_path: Path) -> None:
    """SQLite writes into the indexes of the columns an UPDATE changes only: it keeps its index on
    parent_id and the full (end_time, seq), made at open if missing, and the webhooks' read of the
    jobs that ended is served by the latter without a sort."""
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    store = Store(url)
    try:
        indexes = _child_indexes(store)
        assert {"child_job_parent_id", "child_job_end_time_seq"} <= indexes and "child_job_ended" not in indexes
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "plan.db") as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM child_job WHERE end_time IS NOT NULL AND end_time <= ? AND "
            "(end_time > ? OR (end_time = ? AND seq > ?)) ORDER BY end_time, seq LIMIT 100",
            ("2026-01-02", "2026-01-01", "2026-01-01", 5)).fetchall()
    details = " ".join(str(row[-1]) for row in plan)
    assert "child_job_end_time_seq" in details and "TEMP B-TREE" not in details, details


def test_a_release_builds_the_queues_a_read_would_give(db: Store) -> None:
    """A rollout's decision gives the queues of the devices whose only pending job is the child it
    released (the Releaser publishes them as they are): equal to a read, the child their head."""
    for device_id in ("d1", "d2", "d3", "d4"):
        db.call_sync(devices.register_device, device_id, "g", [])
    wf = db.call_sync(workflows.create_workflow, "wf", "echo hi", None, False)
    plan = parse({"Rollout": {"Waves": [50, 100]}}, "DeviceGroup")
    assert plan is not None
    job, _ = db.call_sync(held.submit_job, "waves", wf.workflow_id, "DeviceGroup", "g", None, plan)
    db.call_sync(jobs.submit_job, "later", wf.workflow_id, "DeviceId", "d2", None)  # waits behind d2's child
    decided = db.call_sync(held.advance, job.job_id, now())
    assert decided.device_ids == ["d1", "d2"]
    assert [q.device_id for q in decided.queues] == ["d1"]
    [built], [fresh] = decided.queues, db.call_sync(queues.device_queues, ["d1"])
    assert built.head is not None and built.head.status == JobStatus.QUEUED.value
    assert (built.head, built.floor, built.total) == (fresh.head, fresh.floor, fresh.total)
    assert queue_message(built) == queue_message(fresh)


def _waves_job(db: Store, waves: list[int], devices_: int = 4) -> str:
    for i in range(1, devices_ + 1):
        db.call_sync(devices.register_device, f"d{i}", "g", [])
    wf = db.call_sync(workflows.create_workflow, "wf", "echo hi", None, False)
    plan = parse({"Rollout": {"Waves": waves}}, "DeviceGroup")
    assert plan is not None
    job, _ = db.call_sync(held.submit_job, "waves", wf.workflow_id, "DeviceGroup", "g", None, plan)
    return job.job_id


def _assert_read_alike(db: Store, built: list[queues.DeviceQueue]) -> None:
    fresh = db.call_sync(queues.device_queues, [q.device_id for q in built])
    for b, f in zip(built, fresh, strict=True):
        assert (b.device_id, b.head, b.floor, b.total) == (f.device_id, f.head, f.floor, f.total)
        assert queue_message(b) == queue_message(f)


def test_a_release_of_a_jobs_only_pending_children_builds_every_queue(db: Store) -> None:
    """Every job not yet final is the rollout's own child (one set-based read, no probe per child):
    every device released gets its queue built, equal to a read; the next release too."""
    job_id = _waves_job(db, [50, 100])
    first = db.call_sync(held.advance, job_id, now())
    assert first.device_ids == ["d1", "d2"]
    assert [q.device_id for q in first.queues] == ["d1", "d2"]
    _assert_read_alike(db, first.queues)
    done = [Update(q.device_id, q.head.job_id, JobStatus.SUCCEEDED) for q in first.queues if q.head]
    db.call_sync(record_device_messages, done, [])
    second = db.call_sync(held.advance, job_id, now())
    assert second.device_ids == ["d3", "d4"]
    assert [q.device_id for q in second.queues] == ["d3", "d4"]
    _assert_read_alike(db, second.queues)


def test_another_jobs_pending_child_anywhere_makes_the_release_probe_each_device(db: Store) -> None:
    """A job not yet final on a device that is not released this time: the set-based read cannot
    tell, so every released device is probed: all still alone, all built."""
    job_id = _waves_job(db, [50, 100])
    wf = db.call_sync(workflows.create_workflow, "other", "echo hi", None, False)
    db.call_sync(jobs.submit_job, "elsewhere", wf.workflow_id, "DeviceId", "d4", None)
    decided = db.call_sync(held.advance, job_id, now())
    assert decided.device_ids == ["d1", "d2"]
    assert [q.device_id for q in decided.queues] == ["d1", "d2"]
    _assert_read_alike(db, decided.queues)


def test_a_small_release_probes_and_leaves_out_a_busy_device(db: Store) -> None:
    """A release of few of the job's pending children probes each (no read of every pending job):
    a device with another job waiting behind its child is left to the publisher's read."""
    job_id = _waves_job(db, [10, 100], devices_=10)
    wf = db.call_sync(workflows.create_workflow, "other", "echo hi", None, False)
    db.call_sync(jobs.submit_job, "later", wf.workflow_id, "DeviceId", "d1", None)
    decided = db.call_sync(held.advance, job_id, now())
    assert decided.device_ids == ["d1"]
    assert decided.queues == []
