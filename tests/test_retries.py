"""Retries and OnFailure with a real service, broker and agents running real commands; and the
store's side of them (a silent device's timeout, a report about an old attempt) on a real database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.protocol import JobStatus
from ota_bridge.models import ChildJob, now
from ota_bridge.rollout_plan import parse
from ota_bridge.store import Store, devices, jobs, queues, rollouts, workflows, write_transaction
from ota_bridge.store.job_options import JobOptions, Retries
from ota_bridge.store.updates import Update, record_device_messages
from tests.conftest import Launcher
from tests.support.processes import Api, wait_until


def _children(api: Api, job_id: str) -> dict[tuple[str, bool], dict[str, Any]]:
    """(device, is a rollback child) -> the child job."""
    return {(c["DeviceId"], "OnFailureOf" in c): c for c in api.ok("GET", f"/v1/job/{job_id}/childjobs")}


def test_a_failing_command_runs_once_per_attempt_and_each_attempt_is_kept(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    launch.agent(service, "dev1", api.device("dev1"))
    ran = tmp_path / "ran"
    workflow = api.workflow(f'echo run >> {ran}; n=$(wc -l < {ran}); echo "attempt $n"; echo "err $n" >&2; exit 3')
    retries = {"Max": 2, "DelaySeconds": 0, "On": ["FAILED"]}
    job = api.ok("POST", "/v1/job", {"WorkflowId": workflow, "DeviceId": "dev1", "Retries": retries})["JobId"]
    done = api.wait_job(job)
    assert ran.read_text().split() == ["run"] * 3
    assert done["Status"] == "FAILED" and done["Retries"] == retries
    [child] = api.ok("GET", f"/v1/job/{job}/childjobs")
    assert child["Attempt"] == 3 and child["Status"] == "FAILED" and child["Stdout"] == "attempt 3\n"
    attempts = child["Attempts"]
    assert [a["Attempt"] for a in attempts] == [1, 2, 3]
    assert [(a["Status"], a["ExitCode"], a["Stdout"], a["Stderr"]) for a in attempts] == [
        ("FAILED", 3, f"attempt {n}\n", f"err {n}\n") for n in (1, 2, 3)]
    assert all(a["StartTime"] <= a["EndTime"] for a in attempts)
    assert attempts[0]["EndTime"] <= attempts[1]["StartTime"] <= attempts[1]["EndTime"] <= attempts[2]["StartTime"]


def test_a_retried_job_keeps_its_place_ahead_of_the_devices_later_job(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    launch.agent(service, "dev1", api.device("dev1"))
    ran = tmp_path / "ran"
    flaky = api.workflow(f'echo flaky >> {ran}; [ $(grep -c flaky {ran}) -ge 2 ]')  # fails once, then succeeds
    retried = api.ok("POST", "/v1/job", {"WorkflowId": flaky, "DeviceId": "dev1",
                                         "Retries": {"Max": 3, "DelaySeconds": 2}})["JobId"]
    later = api.submit(api.workflow(f"echo later >> {ran}"), DeviceId="dev1")

    held = wait_until(lambda: (c := _children(api, retried)[("dev1", False)])["Status"] == "SCHEDULED" and c,
                      20, "the first attempt to fail")
    assert held["Reason"].startswith("retry 1 of 3 (attempt 2) at ") and held["Attempt"] == 2
    assert api.ok("GET", f"/v1/job/{later}")["Status"] == "QUEUED"  # waits behind the held retry
    assert api.wait_job(retried)["Status"] == "SUCCEEDED"
    assert api.wait_job(later)["Status"] == "SUCCEEDED"
    assert ran.read_text().split() == ["flaky", "flaky", "later"]
    [child] = api.ok("GET", f"/v1/job/{retried}/childjobs")
    assert [a["Status"] for a in child["Attempts"]] == ["FAILED", "SUCCEEDED"]


def test_on_failure_rolls_back_a_failed_device_only_before_its_next_job(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    for device in ("ok-1", "bad-2"):
        launch.agent(service, device, api.device(device, group="fleet"))
    log = f"{tmp_path}/$OTA_DEVICE_ID"
    update = api.workflow(f'echo update >> {log}; case $OTA_DEVICE_ID in bad-*) exit 1;; esac')
    rollback = api.workflow(f"echo rollback {{{{to}}}} >> {log}")
    job = api.ok("POST", "/v1/job", {"WorkflowId": update, "DeviceGroup": "fleet", "OnFailure": rollback,
                                     "Retries": {"Max": 1}, "Parameters": {"to": "v1"}})["JobId"]
    later = api.submit(api.workflow(f"echo later >> {log}"), DeviceGroup="fleet")

    assert api.wait_job(later)["Status"] == "SUCCEEDED"
    summary = api.wait_job(job)
    assert (tmp_path / "bad-2").read_text().split("\n") == ["update", "update", "rollback v1", "later", ""]
    assert (tmp_path / "ok-1").read_text().split() == ["update", "later"]
    assert summary["Status"] == "FAILED"
    assert {k: v for k, v in summary["Result"].items() if v} == {"SUCCEEDED": 1, "FAILED": 1, "Total": 2}
    assert {k: v for k, v in summary["OnFailure"]["Result"].items() if v} == {"SUCCEEDED": 1, "CANCELED": 1,
                                                                               "Total": 2}
    children = _children(api, job)
    for device, status in (("ok-1", "CANCELED"), ("bad-2", "SUCCEEDED")):
        partner, undo = children[(device, False)], children[(device, True)]
        assert undo["OnFailureOf"] == partner["JobId"] and partner["OnFailureJobId"] == undo["JobId"]
        assert undo["Status"] == status and undo["Command"] == f"echo rollback v1 >> {log}"
    assert children[("ok-1", True)]["Reason"].startswith("not needed")
    assert api.ok("GET", f"/v1/job/{children[('bad-2', True)]['JobId']}")["OnFailureOf"]


# --- the store's side, on a real database -----------------------------------------------------------


def _retried_job(db: Store, max_retries: int = 1) -> tuple[ChildJob, str]:
    db.call_sync(devices.register_devices, [devices.NewDevice("d1", None, (), "x")])
    workflow = db.call_sync(workflows.create_workflow, "w", "false", 10, False)
    options = JobOptions(retries=Retries(max_retries, 0, ("FAILED", "TIMED_OUT")))
    job, _ = db.call_sync(jobs.submit_job, None, workflow.workflow_id, "DeviceId", "d1", None, options=options)
    [child] = db.call_sync(jobs.child_jobs, job.job_id)
    return child, job.job_id


def _set(db: Store, seq: int, **columns: Any) -> None:
    def write() -> None:
        with write_transaction():
            ChildJob.update(**columns).where(ChildJob.seq == seq).execute()
    db.call_sync(write)


def test_a_silent_devices_timeout_is_retried_and_the_last_one_ends_the_job(db: Store) -> None:
    child, _ = _retried_job(db)
    _set(db, child.seq, status="IN_PROGRESS", updated=now() - timedelta(seconds=60))
    assert db.call_sync(jobs.expire_silent_jobs, 1) == ["d1"]
    retry = db.call_sync(jobs.child_shown, child.job_id)
    assert (retry.child.status, retry.child.attempt) == ("SCHEDULED", 2)
    assert [(a.number, a.status) for a in retry.earlier] == [(1, "TIMED_OUT")]
    assert db.call_sync(queues.device_queues, ["d1"])[0].head is None  # the device waits (idle head)

    _set(db, child.seq, status="IN_PROGRESS", updated=now() - timedelta(seconds=60))  # attempt 2, silent too
    db.call_sync(jobs.expire_silent_jobs, 1)
    last = db.call_sync(jobs.get_child, child.job_id)
    assert (last.status, last.attempt, last.finalized_by_service) == ("TIMED_OUT", 2, True)


def test_a_report_about_an_earlier_attempt_is_dropped(db: Store) -> None:
    child, _ = _retried_job(db, max_retries=2)
    failed = Update("d1", child.job_id, JobStatus.FAILED, exit_code=1)
    assert db.call_sync(record_device_messages, [failed], []).applied == [failed]
    _set(db, child.seq, status="QUEUED")  # released: attempt 2 is the device's head
    assert db.call_sync(queues.device_queues, ["d1"])[0].head.attempt == 2
    outcome = db.call_sync(record_device_messages, [Update("d1", child.job_id, JobStatus.SUCCEEDED)], [])
    assert [why for _, why in outcome.dropped] == ["it is about attempt 1, and the job is at attempt 2"]
    again = Update("d1", child.job_id, JobStatus.SUCCEEDED, attempt=2)
    assert db.call_sync(record_device_messages, [again], []).applied == [again]
    assert db.call_sync(jobs.get_child, child.job_id).status == "SUCCEEDED"


def test_a_rejection_naming_no_attempt_ends_a_retry_an_old_agent_cannot_verify(db: Store) -> None:
    child, _ = _retried_job(db)
    db.call_sync(record_device_messages, [Update("d1", child.job_id, JobStatus.FAILED, exit_code=1)], [])
    _set(db, child.seq, status="QUEUED")  # attempt 2 released; a v2 agent refuses its v3 head
    rejected = Update("d1", child.job_id, JobStatus.REJECTED, reason="the head's signature does not verify")
    assert db.call_sync(record_device_messages, [rejected], []).applied == [rejected]
    assert db.call_sync(jobs.get_child, child.job_id).status == "REJECTED"


def test_a_rollback_child_whose_partner_another_path_ended_is_settled_with_the_timeouts(db: Store) -> None:
    db.call_sync(devices.register_devices, [devices.NewDevice("d1", None, (), "x")])
    workflow = db.call_sync(workflows.create_workflow, "w", "true", 10, False)
    job, _ = db.call_sync(jobs.submit_job, None, workflow.workflow_id, "DeviceId", "d1", None,
                          options=JobOptions(on_failure=workflow.workflow_id))
    partner, rollback = db.call_sync(jobs.child_jobs, job.job_id)
    assert (partner.on_failure_of, rollback.on_failure_of, rollback.status) == (None, partner.job_id, "SCHEDULED")
    _set(db, partner.seq, status="CANCELED")  # as a rollout's abort would, knowing nothing of rollbacks
    assert db.call_sync(jobs.expire_silent_jobs, 60) == ["d1"]
    settled = db.call_sync(jobs.get_child, rollback.job_id)
    assert settled.status == "CANCELED" and settled.reason.startswith("not needed")


def test_a_rollout_neither_counts_nor_releases_rollback_children(db: Store) -> None:
    db.call_sync(devices.register_devices, [devices.NewDevice(d, "g", (), "x") for d in ("d1", "d2")])
    workflow = db.call_sync(workflows.create_workflow, "w", "true", 10, False)
    plan = parse({"Rollout": {"Waves": [50, 100]}}, "DeviceGroup")
    job, _ = db.call_sync(rollouts.submit_job, None, workflow.workflow_id, "DeviceGroup", "g", None, plan,
                          JobOptions(on_failure=workflow.workflow_id))
    db.call_sync(rollouts.advance, job.job_id, now())
    children = db.call_sync(jobs.child_jobs, job.job_id)
    assert sorted((c.on_failure_of is None, c.status) for c in children) == [
        (False, "SCHEDULED"), (False, "SCHEDULED"), (True, "QUEUED"), (True, "SCHEDULED")]  # wave 1: one device
    summary = db.call_sync(jobs.get_job, job.job_id)
    assert summary.rollout.released == 1 and summary.counts == {"QUEUED": 1, "SCHEDULED": 1}
