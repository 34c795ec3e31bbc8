"""Rollout plans without a database: every field checked with its name, cron windows, wave and rate arithmetic,
and the decisions on a real SQLite file (store/rollouts.py) driven by a clock the test sets."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest

from agent.protocol import JobStatus
from ota_bridge.cron import CronError, parse_cron, window
from ota_bridge.models import ChildJob
from ota_bridge.rollout_plan import Plan, PlanError, parse
from ota_bridge.store import Store, devices, jobs, workflows
from ota_bridge.store import rollouts as held
from ota_bridge.store.updates import Update, record_device_messages
from tests.support.databases import database_url

T0 = datetime(2026, 3, 14, 1, 0)


@pytest.mark.parametrize("body, error", [
    ({"Rollout": {"Waves": [10, 5, 100]}}, "Rollout.Waves[1]: must be increasing percentages ending at 100"),
    ({"Rollout": {"Waves": [10, 50]}}, "Rollout.Waves[1]: must be increasing percentages ending at 100"),
    ({"Rollout": {"MaxPerMinute": 0}}, "Rollout.MaxPerMinute: must be from 1"),
    ({"Rollout": {"MaxPerMinute": 5, "Waves": [100]}}, "Rollout: give either MaxPerMinute or Waves"),
    ({"Rollout": {"MaxPerMinute": 5, "SoakSeconds": 3}}, "Rollout.SoakSeconds: is for Waves"),
    ({"Rollout": {"MaxPerMinute": 5, "Growth": {"Factor": 2}}}, "Rollout.Growth.AfterSucceeded: missing"),
    ({"AbortOn": [{"Status": "FAILED", "ThresholdPercent": 10}, {"Status": "LOST", "ThresholdPercent": 1}]},
     "AbortOn[1].Status: must be one of FAILED, TIMED_OUT, REJECTED, ANY"),
    ({"Schedule": {"StartTime": "soon"}}, "Schedule.StartTime: must be an ISO 8601 time"),
    ({"Schedule": {"StartTime": "2026-01-02T00:00:00Z", "EndTime": "2026-01-01T00:00:00Z"}},
     "Schedule.EndTime: must be after StartTime"),
    ({"Schedule": {"MaintenanceWindows": [{"Cron": "0 2 * *", "DurationMinutes": 60}]}},
     "Schedule.MaintenanceWindows[0].Cron: '0 2 * *' has 4 fields"),
    ({"Schedule": {"MaintenanceWindows": [{"Cron": "0 25 * * *", "DurationMinutes": 60}]}},
     "Schedule.MaintenanceWindows[0].Cron: hour '25' is outside 0-23"),
    ({"Schedule": {"MaintenanceWindows": [{"Cron": "0 2 * * *", "DurationMinutes": 60, "TimeZone": "Mars/Base"}]}},
     "Schedule.MaintenanceWindows[0].TimeZone: 'Mars/Base' is not a time zone"),
    ({"Schedule": {"EndBehavior": "CANCEL"}}, "Schedule.EndBehavior: needs an EndTime"),
])
def test_every_field_is_checked_and_named(body: dict, error: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse(body, "DeviceGroup")
    assert str(caught.value).startswith(error)


def test_continuous_is_for_groups_and_tags_and_a_plain_job_has_no_plan() -> None:
    with pytest.raises(PlanError, match="^Continuous: is for a DeviceGroup or TagId job"):
        parse({"Continuous": True}, "DeviceId")
    assert parse({}, "DeviceGroup") is None
    plan = parse({"Rollout": {"Waves": [25, 100]}, "Continuous": True}, "TagId")
    assert plan is not None and Plan.from_json(plan.to_json()) == plan


def test_cron_fields_and_windows_in_their_time_zone() -> None:
    cron = parse_cron("*/15 9-17 * * 1-5")
    assert sorted(cron.minutes) == [0, 15, 30, 45]
    assert cron.matches(datetime(2026, 11, 30, 9, 15)) and not cron.matches(datetime(2026, 11, 29, 9, 15))  # Sunday
    berlin = window("0 2 * * *", 120, "Europe/Berlin")  # 01:00 to 03:00 UTC in winter
    assert [berlin.is_open(datetime(2026, 11, 30, h, m)) for h, m in ((0, 59), (1, 0), (2, 59), (3, 0))] == [
        False, True, True, False]
    with pytest.raises(CronError):
        parse_cron("60 * * * *")


def test_hold_reasons_name_the_wave_or_the_window() -> None:
    plan = parse({"Rollout": {"Waves": [25, 50, 100]}}, "DeviceGroup")
    assert plan is not None
    assert plan.hold_reasons(4, T0) == ["rollout: wave 1 of 3 not released", "rollout: wave 2 of 3 not released",
                                        "rollout: wave 3 of 3 not released", "rollout: wave 3 of 3 not released"]
    windowed = parse({"Schedule": {"MaintenanceWindows": [{"Cron": "0 3 * * *", "DurationMinutes": 60}]}},
                     "DeviceGroup")
    assert windowed is not None and windowed.hold_reasons(1, T0) == ["outside maintenance window"]


# --- decisions on a real SQLite file, on a clock the test sets ---------------------------------------


def rollout_job(db: Store, n: int, body: dict) -> str:
    for i in range(n):
        db.call_sync(devices.register_device, f"d{i:02d}", "g", [])
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
    plan = parse(body, "DeviceGroup")
    job, _ = db.call_sync(held.submit_job, "job", wf.workflow_id, "DeviceGroup", "g", None, plan)
    return job.job_id


def released(db: Store, job_id: str) -> list[str]:
    return sorted(c.device_id for c in db.call_sync(jobs.child_jobs, job_id) if c.status != "SCHEDULED")


def finish(db: Store, job_id: str, status: JobStatus, device_ids: list[str]) -> None:
    children = {c.device_id: c.job_id for c in db.call_sync(jobs.child_jobs, job_id)}
    db.call_sync(record_device_messages, [Update(d, children[d], status) for d in device_ids], [])


def test_a_rate_limited_rollout_releases_no_more_than_its_rate_each_minute(db: Store) -> None:
    job_id = rollout_job(db, 12, {"Rollout": {"MaxPerMinute": 5}})
    counts = []
    for seconds in (0, 1, 30, 59, 60, 61, 119, 120, 180):
        db.call_sync(held.advance, job_id, T0 + timedelta(seconds=seconds))
        counts.append(len(released(db, job_id)))
    assert counts == [5, 5, 5, 5, 10, 10, 10, 12, 12]


def test_exponential_growth_raises_the_rate_after_successes(db: Store) -> None:
    job_id = rollout_job(db, 20, {"Rollout": {"MaxPerMinute": 2, "Growth": {"Factor": 3, "AfterSucceeded": 2}}})
    db.call_sync(held.advance, job_id, T0)
    first = released(db, job_id)
    assert len(first) == 2
    finish(db, job_id, JobStatus.SUCCEEDED, first)
    db.call_sync(held.advance, job_id, T0 + timedelta(minutes=1))
    assert len(released(db, job_id)) == 2 + 6
    assert db.call_sync(jobs.get_job, job_id).rollout.rate == 6


def test_waves_open_on_success_after_the_soak_and_abort_cancels_the_rest(db: Store) -> None:
    job_id = rollout_job(db, 8, {"Rollout": {"Waves": [25, 50, 100], "WaveSuccessPercent": 50, "SoakSeconds": 60},
                                 "AbortOn": [{"Status": "FAILED", "ThresholdPercent": 50, "MinFinished": 4}]})
    db.call_sync(held.advance, job_id, T0)
    assert released(db, job_id) == ["d00", "d01"]
    finish(db, job_id, JobStatus.SUCCEEDED, ["d00"])
    db.call_sync(held.advance, job_id, T0 + timedelta(seconds=10))  # half of wave 1 succeeded: the soak starts
    db.call_sync(held.advance, job_id, T0 + timedelta(seconds=69))
    assert released(db, job_id) == ["d00", "d01"]
    db.call_sync(held.advance, job_id, T0 + timedelta(seconds=70))
    assert released(db, job_id) == ["d00", "d01", "d02", "d03"]
    finish(db, job_id, JobStatus.FAILED, ["d01", "d02", "d03"])  # 3 of 4 finished failed
    db.call_sync(held.advance, job_id, T0 + timedelta(seconds=200))
    summary = db.call_sync(jobs.get_job, job_id)
    assert summary.rollout.aborted and summary.rollout.abort_reason.startswith("rollout aborted: 3 of 4 finished")
    children = {c.device_id: c for c in db.call_sync(jobs.child_jobs, job_id)}
    assert [children[d].status for d in ("d04", "d05", "d06", "d07")] == ["CANCELED"] * 4
    assert children["d04"].reason == summary.rollout.abort_reason


def test_pause_stops_releases_and_the_state_survives_a_reopen(db: Store, tmp_path) -> None:
    job_id = rollout_job(db, 6, {"Rollout": {"MaxPerMinute": 2}})
    db.call_sync(held.advance, job_id, T0)
    assert db.call_sync(held.set_paused, job_id, True) == ["d02", "d03", "d04", "d05"]
    db.call_sync(held.advance, job_id, T0 + timedelta(minutes=5))
    assert len(released(db, job_id)) == 2
    reasons = {c.reason for c in db.call_sync(jobs.child_jobs, job_id) if c.status == "SCHEDULED"}
    assert reasons == {"rollout paused; rollout: waiting for its turn at 2 a minute"}
    db.call_sync(held.set_paused, job_id, False)
    reasons = {c.reason for c in db.call_sync(jobs.child_jobs, job_id) if c.status == "SCHEDULED"}
    assert reasons == {"rollout: waiting for its turn at 2 a minute"}
    db.call_sync(held.advance, job_id, T0 + timedelta(minutes=6))
    assert len(released(db, job_id)) == 4
    reopened = Store(db.url)
    try:
        reopened.call_sync(held.advance, job_id, T0 + timedelta(minutes=6, seconds=30))  # same minute: nothing
        assert len(released(reopened, job_id)) == 4
    finally:
        reopened.close()


def test_a_continuous_job_reaches_a_device_that_joins_later_behind_its_earlier_jobs(db: Store) -> None:
    job_id = rollout_job(db, 1, {"Continuous": True})
    wf = db.call_sync(workflows.create_workflow, "other", "true", None, False)
    db.call_sync(devices.register_device, "late", None, [])
    earlier, _ = db.call_sync(jobs.submit_job, "earlier", wf.workflow_id, "DeviceId", "late", None)
    view, joined = db.call_sync(held.update_device, "late", "g", None, None, object())
    assert joined == ["late"]
    children = {c.device_id: c for c in db.call_sync(jobs.child_jobs, job_id)}
    assert children["late"].status == "QUEUED"
    assert children["late"].seq > db.call_sync(jobs.child_jobs, earlier.job_id)[0].seq
    db.call_sync(jobs.cancel_job, job_id)
    db.call_sync(held.register_devices, [devices.NewDevice("later", "g", (), "x")])
    assert "later" not in {c.device_id for c in db.call_sync(jobs.child_jobs, job_id)}
    assert db.call_sync(lambda: ChildJob.select().where(ChildJob.device_id == "later").count()) == 0


@pytest.mark.postgres
def test_two_instances_deciding_at_once_release_no_device_twice(tmp_path) -> None:
    """Two stores (two connections, as two instances have) decide the same rollout at the same
    moment, over and over: the rollout's row lock makes them take turns, so the rate holds."""
    with database_url("postgres", tmp_path) as url:
        first, second = Store(url), Store(url)
        try:
            job_id = rollout_job(first, 12, {"Rollout": {"MaxPerMinute": 5}})

            def decide(store: Store) -> None:
                for _ in range(10):
                    store.call_sync(held.advance, job_id, T0)

            threads = [threading.Thread(target=decide, args=(s,)) for s in (first, second)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert len(released(first, job_id)) == 5
            assert first.call_sync(jobs.get_job, job_id).rollout.released == 5
        finally:
            second.close()
            first.close()
