"""The store on a real SQLite file: parent status, idempotent updates, queue order, one bulk write."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from datetime import timedelta

import pytest

from agent.protocol import JobStatus
from ota_bridge import credentials
from ota_bridge.api import serialize, views
from ota_bridge.errors import EmptyTarget, WorkflowNotFound
from ota_bridge.models import ChildJob, CredentialChange, Device, Job, Rollout, Workflow, now
from ota_bridge.rollout_plan import parse
from ota_bridge.store import (
    READERS,
    Store,
    devices,
    jobs,
    prepared,
    prepared_rows,
    queues,
    single_statement,
    updates,
    workflows,
    write_transaction,
)
from ota_bridge.store import rollouts as held
from ota_bridge.store.job_options import JobOptions, Retries
from ota_bridge.store.jobs import derive_status, new_ids
from ota_bridge.store.updates import Update


@pytest.mark.parametrize("counts, expected", [
    ({"QUEUED": 2}, JobStatus.QUEUED),
    ({"QUEUED": 1, "IN_PROGRESS": 1}, JobStatus.IN_PROGRESS),
    ({"QUEUED": 1, "SUCCEEDED": 1}, JobStatus.IN_PROGRESS),
    ({"SUCCEEDED": 3}, JobStatus.SUCCEEDED),
    ({"SUCCEEDED": 2, "FAILED": 1}, JobStatus.FAILED),
    ({"SUCCEEDED": 2, "TIMED_OUT": 1}, JobStatus.FAILED),
    ({"SUCCEEDED": 2, "CANCELED": 1}, JobStatus.CANCELED),
    ({"CANCELED": 2}, JobStatus.CANCELED),
    ({}, JobStatus.CANCELED),
])
def test_parent_status_derives_from_children(counts: dict[str, int], expected: JobStatus) -> None:
    assert derive_status(counts) is expected


def group_job(db: Store, n: int, command: str = "true") -> tuple[str, list[str]]:
    for i in range(n):
        db.call_sync(devices.register_device, f"d{i}", "g", ["t"])
    wf = db.call_sync(workflows.create_workflow, "wf", command, None, False)
    job, device_ids = db.call_sync(jobs.submit_job, "job", wf.workflow_id, "DeviceGroup", "g", None)
    return job.job_id, device_ids


def test_group_job_with_many_devices_is_one_transaction(db: Store) -> None:
    job_id, device_ids = group_job(db, 600)
    assert len(device_ids) == 600
    assert len(db.call_sync(jobs.child_jobs, job_id)) == 600


def test_failed_submission_writes_nothing(db: Store) -> None:
    with pytest.raises(WorkflowNotFound):
        db.call_sync(jobs.submit_job, "job", "missing", "DeviceId", "d0", None)
    with pytest.raises(EmptyTarget):
        wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
        db.call_sync(jobs.submit_job, "job", wf.workflow_id, "DeviceGroup", "none", None)
    assert db.call_sync(jobs.list_jobs, 10, 0) == ([], 0)


def test_device_queue_is_in_submission_order_and_head_is_first_pending(db: Store) -> None:
    db.call_sync(devices.register_device, "d0", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    submitted = [db.call_sync(jobs.submit_job, f"j{i}", wf.workflow_id, "DeviceId", "d0", None)[0] for i in range(4)]
    queue = db.call_sync(queues.device_queues, ["d0"])[0]
    assert [e.parent_id for e in queue.entries] == [j.job_id for j in submitted] and queue.total == 4
    children = [db.call_sync(jobs.child_jobs, j.job_id)[0] for j in submitted]
    db.call_sync(updates.record_device_messages, [Update("d0", children[0].job_id, JobStatus.SUCCEEDED)], [])
    assert db.call_sync(queues.device_queues, ["d0"])[0].head.job_id == children[1].job_id


def test_updates_are_idempotent_and_never_go_backwards(db: Store) -> None:
    job_id, _ = group_job(db, 1)
    child = db.call_sync(jobs.child_jobs, job_id)[0].job_id
    done = Update("d0", child, JobStatus.SUCCEEDED, exit_code=0, stdout="first")
    outcome = db.call_sync(updates.record_device_messages, [Update("d0", child, JobStatus.IN_PROGRESS), done], [])
    assert len(outcome.applied) == 2 and outcome.devices == ["d0"]
    again = db.call_sync(updates.record_device_messages, [
        Update("d0", child, JobStatus.IN_PROGRESS),
        Update("d0", child, JobStatus.FAILED, exit_code=1, stdout="second"),
    ], [])
    assert not again.applied and all("already SUCCEEDED" in why for _, why in again.dropped)
    row = db.call_sync(jobs.child_jobs, job_id)[0]
    assert row.status == "SUCCEEDED" and row.stdout == "first"


def test_update_for_another_device_or_not_the_head_is_dropped(db: Store) -> None:
    db.call_sync(devices.register_device, "d0", None, [])
    db.call_sync(devices.register_device, "d1", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    first = db.call_sync(jobs.submit_job, "a", wf.workflow_id, "DeviceId", "d0", None)[0]
    second = db.call_sync(jobs.submit_job, "b", wf.workflow_id, "DeviceId", "d0", None)[0]
    c1 = db.call_sync(jobs.child_jobs, first.job_id)[0].job_id
    c2 = db.call_sync(jobs.child_jobs, second.job_id)[0].job_id
    outcome = db.call_sync(updates.record_device_messages, [
        Update("d1", c1, JobStatus.SUCCEEDED), Update("d0", c2, JobStatus.SUCCEEDED),
        Update("d0", "no-such-job", JobStatus.SUCCEEDED)], [])
    reasons = [why for _, why in outcome.dropped]
    assert not outcome.applied
    assert reasons == ["the job belongs to device 'd0'", "the job is not the device's current job", "no such job"]


def test_device_passwords_are_hashed_in_mosquitto_format(db: Store) -> None:
    _, password = db.call_sync(devices.register_device, "d0", None, [])
    stored = db.call_sync(lambda: Device.get_by_id("d0").password_hash)
    assert stored.startswith("$7$") and password not in stored
    assert credentials.verify_password(password, stored)
    assert db.call_sync(devices.check_device_password, "d0", password)
    assert not db.call_sync(devices.check_device_password, "d0", password + "x")
    assert not db.call_sync(devices.check_device_password, "ghost", password)


def test_a_disabled_rekeyed_or_deleted_device_is_noted_for_the_brokers_recheck(db: Store) -> None:
    for i in range(4):
        db.call_sync(devices.register_device, f"d{i}", None, ["t"])
    start = db.call_sync(devices.last_credential_change)
    db.call_sync(devices.update_device, "d0", "g", ["u"], True, None)  # nothing a login depends on
    assert db.call_sync(devices.credential_changes, start) == []
    db.call_sync(devices.update_device, "d0", None, None, False, None)
    db.call_sync(devices.set_password_hash, "d1", credentials.hash_password("new"))
    db.call_sync(devices.delete_device, "d2")
    db.call_sync(devices.delete_devices, ["d3"])
    changes = db.call_sync(devices.credential_changes, start)
    assert [d for _, d in changes] == ["d0", "d1", "d2", "d3"]
    assert [i for i, _ in changes] == sorted({i for i, _ in changes}) and changes[0][0] > start
    assert db.call_sync(devices.last_credential_change) == changes[-1][0]
    assert db.call_sync(devices.credential_changes, changes[1][0]) == changes[1:]  # from the one seen on
    assert db.call_sync(devices.device_password_hashes, ["d0", "d1", "d2", "ghost"]) == {
        "d1": db.call_sync(devices.password_hash, "d1")}  # d0 disabled, d2 gone


def test_old_credential_changes_go_but_the_newest_stays(db: Store) -> None:
    db.call_sync(devices.register_device, "d0", None, [])
    db.call_sync(devices.set_password_hash, "d0", "x")
    db.call_sync(devices.set_password_hash, "d0", "y")
    newest = db.call_sync(devices.last_credential_change)
    old = now() - devices.CREDENTIAL_CHANGES_KEPT - timedelta(minutes=1)
    db.call_sync(lambda: CredentialChange.update(at=old).execute())
    db.call_sync(devices.set_password_hash, "d0", "z")  # the next note prunes: only itself is left
    assert [i for i, _ in db.call_sync(devices.credential_changes, 0)] == [newest + 1]
    db.call_sync(lambda: CredentialChange.update(at=old).execute())
    db.call_sync(devices.note_credential_changes, [])  # nothing noted: the newest is kept all the same
    assert db.call_sync(devices.last_credential_change) == newest + 1


def test_credential_changes_go_oldest_first_whatever_the_clocks_that_noted_them(db: Store) -> None:
    """A reader that finds the row after the last it saw tells that nothing it missed went."""
    db.call_sync(devices.register_device, "d0", None, [])
    for password_hash in ("a", "b", "c", "d"):
        db.call_sync(devices.set_password_hash, "d0", password_hash)
    ids = [i for i, _ in db.call_sync(devices.credential_changes, 0)]
    old = now() - devices.CREDENTIAL_CHANGES_KEPT - timedelta(minutes=1)
    db.call_sync(lambda: CredentialChange.update(at=old).where(CredentialChange.id == ids[1]).execute())
    db.call_sync(devices.set_password_hash, "d0", "e")  # ids[1]'s clock was behind: ids[0] goes with it
    assert [i for i, _ in db.call_sync(devices.credential_changes, 0)] == [*ids[2:], ids[-1] + 1]


def test_deleting_a_device_cancels_its_pending_jobs(db: Store) -> None:
    job_id, _ = group_job(db, 2)
    db.call_sync(devices.delete_device, "d0")
    by_device = {c.device_id: c.status for c in db.call_sync(jobs.child_jobs, job_id)}
    assert by_device == {"d0": "CANCELED", "d1": "QUEUED"}


def _running_job(db: Store) -> tuple[str, str]:
    job_id, _ = group_job(db, 1)
    child = db.call_sync(jobs.child_jobs, job_id)[0].job_id
    db.call_sync(updates.record_device_messages, [Update("d0", child, JobStatus.IN_PROGRESS)], [])
    return job_id, child


def _age(db: Store, child: str, seconds: float) -> None:
    past = now() - timedelta(seconds=seconds)
    db.call_sync(lambda: ChildJob.update(updated=past).where(ChildJob.job_id == child).execute())


def test_silent_running_jobs_time_out_after_timeout_plus_grace(db: Store) -> None:
    job_id, child = _running_job(db)  # the default timeout: one hour
    assert db.call_sync(jobs.expire_silent_jobs, 60) == []
    _age(db, child, 3600 + 61)
    assert db.call_sync(jobs.expire_silent_jobs, 60) == ["d0"]
    row = db.call_sync(jobs.child_jobs, job_id)[0]
    assert row.status == "TIMED_OUT" and row.finalized_by_service and "no result" in row.reason


def test_reconnecting_restarts_the_silence_clock(db: Store) -> None:
    _, child = _running_job(db)
    _age(db, child, 3600 + 61)
    assert db.call_sync(jobs.restart_silence_clocks) == 1
    assert db.call_sync(jobs.expire_silent_jobs, 60) == []


def test_a_late_result_is_kept_beside_the_state_once(db: Store) -> None:
    job_id, child = _running_job(db)
    _age(db, child, 3600 + 61)
    db.call_sync(jobs.expire_silent_jobs, 60)
    late = Update("d0", child, JobStatus.FAILED, exit_code=2, stdout="out", reason="disk full")
    outcome = db.call_sync(updates.record_device_messages, [late], [])
    assert outcome.late == [late] and not outcome.applied
    row = db.call_sync(jobs.child_jobs, job_id)[0]
    assert (row.status, row.exit_code, row.stdout) == ("TIMED_OUT", 2, "out")
    assert row.reason.endswith("; the device reported FAILED later: disk full")
    again = db.call_sync(updates.record_device_messages, [late], [])
    assert not again.late and "already TIMED_OUT" in again.dropped[0][1]


def test_reports_from_a_disabled_device_are_dropped(db: Store) -> None:
    job_id, _ = group_job(db, 1)
    child = db.call_sync(jobs.child_jobs, job_id)[0].job_id
    db.call_sync(devices.update_device, "d0", None, None, False, None)
    outcome = db.call_sync(updates.record_device_messages, [Update("d0", child, JobStatus.SUCCEEDED)], [])
    assert outcome.dropped[0][1] == "the device is disabled or deleted"


def test_sequence_numbers_are_never_reused_after_deletes(db: Store) -> None:
    db.call_sync(devices.register_device, "d0", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    submitted = [db.call_sync(jobs.submit_job, "j", wf.workflow_id, "DeviceId", "d0", None)[0] for _ in range(3)]
    last_seq = db.call_sync(jobs.child_jobs, submitted[-1].job_id)[0].seq
    for job in submitted[1:]:
        db.call_sync(jobs.delete_job, job.job_id)
    fresh = db.call_sync(jobs.submit_job, "j", wf.workflow_id, "DeviceId", "d0", None)[0]
    assert db.call_sync(jobs.child_jobs, fresh.job_id)[0].seq > last_seq


def test_device_queues_lists_the_first_hundred_and_counts_them_all(db: Store) -> None:
    for device in ("busy", "calm", "idle"):
        db.call_sync(devices.register_device, device, None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    for _ in range(105):
        db.call_sync(jobs.submit_job, "j", wf.workflow_id, "DeviceId", "busy", None)
    for _ in range(2):
        db.call_sync(jobs.submit_job, "j", wf.workflow_id, "DeviceId", "calm", None)
    busy, calm, idle = db.call_sync(queues.device_queues, ["busy", "calm", "idle"])
    assert (len(busy.entries), busy.total) == (100, 105)
    assert [e.seq for e in busy.entries] == sorted(e.seq for e in busy.entries)
    assert (len(calm.entries), calm.total, calm.head.command) == (2, 2, "true")
    assert (idle.entries, idle.total, idle.head) == ((), 0, None)


def test_one_batch_moves_each_device_along_its_own_queue(db: Store) -> None:
    """Heads read once per batch for every device, and again for a device whose job became final."""
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    children: dict[str, list[str]] = {}
    for device in ("a", "b", "c"):
        db.call_sync(devices.register_device, device, None, [])
        for _ in range(2):
            job, _ = db.call_sync(jobs.submit_job, "j", wf.workflow_id, "DeviceId", device, None)
            children.setdefault(device, []).append(db.call_sync(jobs.child_jobs, job.job_id)[0].job_id)
    batch = [Update("a", children["a"][0], JobStatus.IN_PROGRESS), Update("a", children["a"][0], JobStatus.SUCCEEDED),
             Update("a", children["a"][1], JobStatus.IN_PROGRESS), Update("b", children["b"][1], JobStatus.IN_PROGRESS),
             Update("c", children["c"][0], JobStatus.FAILED, exit_code=3, stdout="out")]
    outcomes = db.call_sync(updates.record_device_messages, batch, [("c", True, now())])
    assert [(u.device_id, u.status) for u in outcomes.applied] == [
        ("a", JobStatus.IN_PROGRESS), ("a", JobStatus.SUCCEEDED), ("a", JobStatus.IN_PROGRESS),
        ("c", JobStatus.FAILED)]
    assert [(u.device_id, why) for u, why in outcomes.dropped] == [("b", "the job is not the device's current job")]
    failed = db.call_sync(jobs.get_child, children["c"][0])
    assert (failed.status, failed.exit_code, failed.stdout, failed.end_time is not None) == ("FAILED", 3, "out", True)
    heads = {q.device_id: q.head.job_id for q in db.call_sync(queues.device_queues, ["a", "b", "c"])}
    assert heads == {"a": children["a"][1], "b": children["b"][0], "c": children["c"][1]}
    assert db.call_sync(devices.get_device, "c").device.online is True


# --- reads beside the writer ------------------------------------------------------------------


def test_a_read_answers_while_a_write_is_open_and_sees_only_what_was_committed(db: Store) -> None:
    db.call_sync(workflows.create_workflow, "before", "true", None, False)
    open_write, release = threading.Event(), threading.Event()

    def slow_write() -> None:
        with write_transaction():
            Workflow.create(workflow_id="during", name="during", command="true")
            open_write.set()
            release.wait(10)

    async def scenario() -> tuple[list[str], list[str]]:
        writing = asyncio.ensure_future(db.call(slow_write))
        try:
            assert await asyncio.to_thread(open_write.wait, 10)
            during = await asyncio.wait_for(db.read(workflows.list_workflows), 5)  # not behind the write
        finally:
            release.set()
            await writing
        after = await db.read(workflows.list_workflows)  # read-your-writes: committed before the read began
        return [w.name for w in during], [w.name for w in after]

    assert asyncio.run(scenario()) == (["before"], ["before", "during"])


def test_a_job_read_beside_the_writer_answers_as_on_the_stores_thread(db: Store) -> None:
    """A single-device job is one statement on a reader (no snapshot); a group job, one with OnFailure
    or with a rollout reads its rows in a snapshot. Every one answers as the store's own thread does."""
    group_id, _ = group_job(db, 3)
    db.call_sync(devices.register_device, "solo", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf2", "echo {{V}}", None, False).workflow_id
    rollback = db.call_sync(workflows.create_workflow, "undo", "true", None, False).workflow_id
    single = db.call_sync(jobs.submit_job, None, wf, "DeviceId", "solo", None,
                          options=JobOptions(parameters={"V": "x"}, retries=Retries(2)))[0].job_id
    with_rollback = db.call_sync(jobs.submit_job, None, wf, "DeviceId", "d1", None,
                                 options=JobOptions(parameters={"V": "y"}, on_failure=rollback))[0].job_id
    rolled = [db.call_sync(held.submit_job, None, wf, field, value, None, parse(body, field),
                           JobOptions(parameters={"V": "z"}))[0].job_id
              for field, value, body in (("DeviceId", "d2", {"Rollout": {"MaxPerMinute": 1}}),
                                         ("DeviceGroup", "g", {"Rollout": {"Waves": [50, 100]}}))]
    [child] = db.call_sync(jobs.child_jobs, single)
    started = Update("solo", child.job_id, JobStatus.IN_PROGRESS, start_time=now())
    db.call_sync(updates.record_device_messages, [started], [])
    shown = [group_id, single, with_rollback, *rolled]

    async def on_readers() -> list[dict]:
        return [serialize.job(s) for s in await asyncio.gather(*(db.read(jobs.get_job, j) for j in shown))]

    on_store_thread = [serialize.job(db.call_sync(jobs.get_job, j)) for j in shown]
    assert asyncio.run(on_readers()) == on_store_thread
    assert [j["Status"] for j in on_store_thread] == ["QUEUED", "IN_PROGRESS", "QUEUED", "QUEUED", "QUEUED"]
    assert on_store_thread[1]["Retries"]["Max"] == 2 and on_store_thread[1]["StartTime"] is not None
    assert on_store_thread[2]["OnFailure"]["Result"]["SCHEDULED"] == 1
    assert on_store_thread[3]["Rollout"]["Released"] == 0 and on_store_thread[4]["Rollout"]["Waves"] == 2


def _report(db: Store, device: str, job_id: str, *reports: Update) -> None:
    """The device's reports on the job's one child (job_id is the parent's)."""
    [child] = [c for c in db.call_sync(jobs.child_jobs, job_id) if c.on_failure_of is None]
    sent = [Update(device, child.job_id, u.status, u.exit_code, u.stdout, start_time=u.start_time,
                   end_time=u.end_time, attempt=u.attempt) for u in reports]
    db.call_sync(updates.record_device_messages, sent, [])


def test_get_jobs_answer_from_its_row_is_the_full_model_answer(db: Store) -> None:
    """GET /v1/job/{id} builds a single-device job's answer from its one narrow row (no models):
    key for key (and in the same order) what serialize.job of get_job's summary gives, for jobs in
    every state; a group job, one with OnFailure and a child job id keep their own paths."""
    group_id, _ = group_job(db, 2)
    wf = db.call_sync(workflows.create_workflow, "wf2", "echo hi", None, False).workflow_id
    with_v = db.call_sync(workflows.create_workflow, "wf3", "echo {{V}}", None, False).workflow_id
    undo = db.call_sync(workflows.create_workflow, "undo", "true", None, False).workflow_id
    for name in ("q", "run", "ok", "bad", "retried", "gone", "nochild", "rolled", "rb"):
        db.call_sync(devices.register_device, name, None, [])

    def submit(device: str, options: JobOptions | None = None, workflow: str = wf) -> str:
        return db.call_sync(jobs.submit_job, "n", workflow, "DeviceId", device, 30,
                            options=options or JobOptions())[0].job_id

    singles = {name: submit(name) for name in ("q", "run", "ok", "bad", "gone", "nochild")}
    singles["params"] = submit("q", JobOptions(parameters={"V": "x"}), with_v)
    singles["retried"] = submit("retried", JobOptions(retries=Retries(2, 0)))
    singles["rolled"] = db.call_sync(held.submit_job, None, wf, "DeviceId", "rolled", None,
                                     parse({"Rollout": {"MaxPerMinute": 1}}, "DeviceId"))[0].job_id
    singles["waves"] = db.call_sync(held.submit_job, None, wf, "DeviceId", "rolled", None,
                                    parse({"Rollout": {"Waves": [100]}}, "DeviceId"))[0].job_id
    # A rate with no exact binary value (a REAL column on PostgreSQL: read as its text, 0.1, on every path)
    db.call_sync(Rollout.update(rate=0.1, checked_at=now()).where(Rollout.job == singles["waves"]).execute)
    _report(db, "run", singles["run"], Update("run", "", JobStatus.IN_PROGRESS, start_time=now()))
    _report(db, "ok", singles["ok"], Update("ok", "", JobStatus.IN_PROGRESS, start_time=now()),
            Update("ok", "", JobStatus.SUCCEEDED, 0, "done", end_time=now()))
    _report(db, "bad", singles["bad"], Update("bad", "", JobStatus.FAILED, 3, "no", end_time=now()))
    _report(db, "retried", singles["retried"], Update("retried", "", JobStatus.FAILED, 1, "try 1", end_time=now()))
    db.call_sync(jobs.cancel_job, singles["gone"])
    db.call_sync(ChildJob.delete().where(ChildJob.parent == singles["nochild"]).execute)
    with_rollback = submit("rb", JobOptions(on_failure=undo))
    child_id = db.call_sync(jobs.child_jobs, singles["ok"])[0].job_id
    others = [group_id, with_rollback]

    async def answers(ids: list[str]) -> list[tuple[type, dict]]:
        return [(type(await db.read(jobs.shown_job, j)), await views._shown_job(db, j)) for j in ids]

    ids = list(singles.values())
    shown = asyncio.run(answers(ids + others))
    full = [serialize.job(db.call_sync(jobs.get_job, j)) for j in ids + others]
    assert [list(a.items()) for _, a in shown] == [list(a.items()) for a in full]
    assert [json.dumps(a) for _, a in shown] == [json.dumps(a) for a in full]  # as web.json_response writes it
    assert [t for t, _ in shown] == [jobs.JobRow] * len(ids) + [jobs.JobSummary] * 2
    by_name = dict(zip(singles, full[:len(ids)], strict=True))
    statuses = {name: a["Status"] for name, a in by_name.items()}
    assert statuses == {"q": "QUEUED", "run": "IN_PROGRESS", "ok": "SUCCEEDED", "bad": "FAILED", "gone": "CANCELED",
                        "nochild": "CANCELED", "params": "QUEUED", "retried": "QUEUED", "rolled": "QUEUED",
                        "waves": "QUEUED"}
    assert by_name["retried"]["Retries"]["Max"] == 2 and by_name["rolled"]["Rollout"]["Pending"] == 1
    assert by_name["ok"]["ExitCode"] == 0 and by_name["ok"]["EndTime"] and by_name["waves"]["Rollout"]["CheckedAt"]
    assert '"RatePerMinute": 0.1,' in json.dumps(by_name["waves"])
    assert by_name["nochild"]["Result"]["Total"] == 0 and by_name["params"]["Parameters"] == {"V": "x"}
    assert asyncio.run(views._shown_job(db, child_id)) == serialize.child(db.call_sync(jobs.child_shown, child_id))


def test_a_job_read_answers_while_a_write_is_open_and_sees_only_what_was_committed(db: Store) -> None:
    """GET /v1/job/{id}'s read is one statement, on SQLite made on the event loop itself: it must not
    wait for the writer (the write here stays open until the read has answered)."""
    db.call_sync(devices.register_device, "d0", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False).workflow_id
    job_id = db.call_sync(jobs.submit_job, None, wf, "DeviceId", "d0", None)[0].job_id
    open_write, release = threading.Event(), threading.Event()

    def slow_write() -> None:
        with write_transaction():
            ChildJob.update(status=JobStatus.IN_PROGRESS.value).where(ChildJob.parent == job_id).execute()
            open_write.set()
            release.wait(10)

    async def scenario() -> tuple[str, str]:
        writing = asyncio.ensure_future(db.call(slow_write))
        try:
            assert await asyncio.to_thread(open_write.wait, 10)
            during = await db.read(jobs.get_job, job_id)
        finally:
            release.set()
            await writing
        return during.status.value, (await db.read(jobs.get_job, job_id)).status.value

    assert asyncio.run(scenario()) == ("QUEUED", "IN_PROGRESS")


def test_a_read_cannot_write(db: Store) -> None:
    def sneaky() -> None:
        Workflow.insert(workflow_id="sneaky", name="x", command="true").execute()

    with pytest.raises(Exception, match="(?i)read-?only"):
        asyncio.run(db.read(sneaky))
    with pytest.raises(Exception, match="(?i)read-?only"):  # nor without a transaction around it
        asyncio.run(db.read(single_statement(sneaky)))
    assert db.call_sync(workflows.list_workflows) == []
    assert asyncio.run(db.read(jobs.list_jobs, 10, 0)) == ([], 0)  # the reader is still usable


def test_a_new_secret_never_reads_as_a_command_line_option() -> None:
    secrets = [credentials.new_secret() for _ in range(2000)]  # 1 in 64 would start with "-" by chance
    assert not any(s.startswith("-") for s in secrets) and all(len(s) == 43 for s in secrets)


def test_plain_rows_convert_as_peewee_does(db: Store) -> None:
    """prepared_rows skips peewee's conversion only where the driver already gives the model's value."""
    group_job(db, 2)

    def select(count: int) -> object:
        return (Job.select(Job.job_id, Job.timeout_seconds, Job.success_on_restart, Job.created, ChildJob.device_id)
                .join(ChildJob, on=(ChildJob.parent == Job.job_id)).order_by(ChildJob.device_id).tuples())

    converted = db.call_sync(lambda: list(prepared("rows_peewee", select)))
    plain = db.call_sync(lambda: prepared_rows("rows_plain", select))
    assert plain == converted and len(plain) == 2
    assert isinstance(plain[0][2], bool) and plain[0][3].year >= 2024


def test_new_child_ids_are_distinct_version_4_uuids_as_uuid4_writes_them() -> None:
    ids = new_ids(1000)
    assert len(set(ids)) == 1000 and new_ids(0) == []
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)


def test_a_submission_reads_its_devices_queues_as_the_publisher_would(db: Store) -> None:
    for device in ("d0", "d1"):
        db.call_sync(devices.register_device, device, "g", ["t"])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    earlier = db.call_sync(jobs.submit_job, "a", wf.workflow_id, "DeviceId", "d0", None)[0]
    job, device_ids, read = db.call_sync(jobs.submit_job_with_queues, "b", wf.workflow_id, "DeviceGroup", "g", None,
                                         200)
    assert device_ids == ["d0", "d1"]
    assert read[0].epoch == db.call_sync(store_epoch)  # current: a final may move the head along it
    assert [q.device_id for q in read] == ["d0", "d1"]
    assert [e.parent_id for e in read[0].entries] == [earlier.job_id, job.job_id]
    assert read[0].head is not None and read[0].head.parent_id == earlier.job_id
    assert [e.parent_id for e in read[1].entries] == [job.job_id]
    fresh = db.call_sync(queues.device_queues, ["d0", "d1"], 200)
    assert [(q.entries, q.total, q.floor) for q in read] == [(q.entries, q.total, q.floor) for q in fresh]


def store_epoch() -> int:
    """The store's epoch between calls (a call marked as reporting its changes gets no id of its own)."""
    from ota_bridge import store
    return store.epoch()


store_epoch.reports_queue_changes = True  # type: ignore[attr-defined]


def test_a_submission_reads_no_queues_for_a_large_target_or_without_a_window(db: Store,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for device in ("d0", "d1"):
        db.call_sync(devices.register_device, device, "g", ["t"])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    assert db.call_sync(jobs.submit_job_with_queues, "a", wf.workflow_id, "DeviceGroup", "g", None, None)[2] == []
    monkeypatch.setattr(jobs, "READ_WITH_SUBMISSION", 1)
    job, device_ids, read = db.call_sync(jobs.submit_job_with_queues, "b", wf.workflow_id, "DeviceGroup", "g", None,
                                         200)
    assert device_ids == ["d0", "d1"] and read == []
    assert [len(q.entries) for q in db.call_sync(queues.device_queues, device_ids, 200)] == [2, 2]


def test_a_group_jobs_read_is_one_snapshot_while_its_children_finish(db: Store) -> None:
    """A group job's summary is read in several statements (its counts, its rollout): they see one
    moment, here while every write finishes a child and counts it on the rollout's row in one
    transaction (on SQLite the read is made on the event loop itself)."""
    for i in range(40):
        db.call_sync(devices.register_device, f"d{i}", "g", [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False).workflow_id
    job_id = db.call_sync(held.submit_job, None, wf, "DeviceGroup", "g", None,
                          parse({"Rollout": {"Waves": [50, 100]}}, "DeviceGroup"))[0].job_id
    seqs = [c.seq for c in db.call_sync(jobs.child_jobs, job_id)]
    db.call_sync(lambda: Rollout.update(released=0).where(Rollout.job == job_id).execute())

    def finish(seq: int) -> None:
        with write_transaction():
            ChildJob.update(status=JobStatus.SUCCEEDED.value).where(ChildJob.seq == seq).execute()
            Rollout.update(released=Rollout.released + 1).where(Rollout.job == job_id).execute()

    async def scenario() -> list[tuple[int, int, int]]:
        seen: list[tuple[int, int, int]] = []
        writing = asyncio.ensure_future(asyncio.gather(*(db.call(finish, seq) for seq in seqs)))
        while not writing.done() or not seen:
            summary = await db.read(jobs.get_job, job_id)
            seen.append((summary.counts.get("SUCCEEDED", 0), summary.rollout.released, sum(summary.counts.values())))
            await asyncio.sleep(0)
        await writing
        return seen

    seen = asyncio.run(scenario())
    assert [s for s in seen if s[0] != s[1] or s[2] != 40] == []
    assert db.call_sync(jobs.get_job, job_id).counts == {"SUCCEEDED": 40}


def test_a_group_jobs_read_on_sqlite_needs_no_reader_thread(tmp_path) -> None:
    """On SQLite a group job's GET reads its snapshot on the event loop: it answers while every
    reader thread is busy; a group too big for the loop (LOOP_READ_STEPS) goes to a reader thread."""
    db = Store(f"sqlite:///{tmp_path}/loop.db")
    try:
        group_id, _ = group_job(db, 3)
        db.call_sync(devices.register_devices, [devices.NewDevice(f"b{i}", "big", (), "x") for i in range(3000)])
        big_id = db.call_sync(jobs.submit_job, None, db.call_sync(workflows.list_workflows)[0].workflow_id,
                              "DeviceGroup", "big", None)[0].job_id
        release = threading.Event()

        async def scenario() -> tuple[dict, dict]:
            busy = [asyncio.ensure_future(db.read(release.wait, 10)) for _ in range(READERS)]
            try:
                for _ in range(1000):  # the loop's budget is each read's own, however often one runs
                    shown = serialize.job(await asyncio.wait_for(db.read(jobs.shown_job, group_id), 5))
                big = asyncio.ensure_future(db.read(jobs.shown_job, big_id))
                await asyncio.sleep(0.2)
                assert not big.done()  # behind the busy readers
            finally:
                release.set()
                await asyncio.gather(*busy)
            return shown, serialize.job(await big)

        shown, big = asyncio.run(scenario())
        assert shown == serialize.job(db.call_sync(jobs.get_job, group_id))
        assert big == serialize.job(db.call_sync(jobs.get_job, big_id)) and big["Result"]["Total"] == 3000
        db.call_sync(jobs.cancel_job, group_id)  # after the loop's interrupted read: its connection reads afresh
        release.clear()

        async def after() -> dict:
            busy = [asyncio.ensure_future(db.read(release.wait, 10)) for _ in range(READERS)]
            try:
                return serialize.job(await asyncio.wait_for(db.read(jobs.shown_job, group_id), 5))
            finally:
                release.set()
                await asyncio.gather(*busy)

        assert asyncio.run(after())["Status"] == "CANCELED"
    finally:
        db.close()


def test_a_submitted_job_is_stored_as_it_is_returned_with_its_own_defaults(db: Store) -> None:
    """new_job's prepared INSERT writes every column, the defaults made per row (not when it was prepared)."""
    db.call_sync(devices.register_device, "d0", None, [])
    wf = db.call_sync(workflows.create_workflow, "wf", "echo {{V}}", 30, True)
    first = db.call_sync(jobs.submit_job, None, wf.workflow_id, "DeviceId", "d0", None,
                         options=JobOptions(parameters={"V": "x"}, retries=Retries(2, 5)))[0]
    second = db.call_sync(jobs.submit_job, "named", wf.workflow_id, "DeviceId", "d0", 7,
                          options=JobOptions(parameters={"V": "y"}))[0]
    for job in (first, second):
        assert db.call_sync(lambda job=job: Job.get_by_id(job.job_id).__data__) == job.__data__
    assert (first.name, first.command, first.timeout_seconds, first.success_on_restart) == ("wf", "echo x", 30, True)
    assert (first.retry_max, first.retry_delay_seconds, first.parameters) == (2, 5, '{"V": "x"}')
    assert (second.name, second.timeout_seconds, second.retry_max, second.retry_on) == ("named", 7, 0, "")
    assert second.created > first.created  # made for each row, not once when the INSERT was prepared
