"""Heads that cannot be replayed, withheld or silently canceled, and the rotation of the signing key.

Each test here failed before protocol v2: an unsigned empty head canceled a running job, a
canceled job's signed head ran when replayed, an agent without state ran an old head, and the
service made a new key (and every agent rejected every job) when its key file was missing.

Two layers, like tests/test_agent_signing.py: the agent's decisions (no broker), then the real
service, broker and agents; a forger publishes straight to an open Mosquitto.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agent import job_signature
from agent.daemon import BELOW_FLOOR, NO_ISSUE_TIME, STALE
from agent.link import JobMessage
from agent.protocol import HEAD_VALIDITY_SECONDS, SERVICE_CLIENT_ID, Key, Topics, utc_now
from ota_bridge.store import Store, devices, jobs, queues, workflows
from tests import test_agent_signing as signing
from tests.conftest import Launcher
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import REPO, Agent, wait_until
from tests.test_agent_signing import (
    DEVICE,
    FORGER_KEY,
    SERVICE_KEY,
    Wire,
    forge,
    head,
    idle,
    only_rejection,
    public_b64,
)

deciding, mosquitto_fleet = signing.deciding, signing.mosquitto_fleet  # the fixtures, shared

OLD = utc_now() - timedelta(seconds=HEAD_VALIDITY_SECONDS + 3600)


# --- the agent's decisions (no broker) ------------------------------------------------------


@pytest.mark.parametrize("message", [
    lambda: idle(10**9, key=None), lambda: idle(10**9, key=FORGER_KEY), lambda: idle(10**9, device="dev2"),
    lambda: idle(10**9, **{Key.FLOOR: 10**10}),
], ids=["unsigned", "forged", "another-device", "floor-changed"])
def test_an_unsigned_forged_or_foreign_idle_head_does_not_cancel_the_running_job(deciding, message):
    agent = deciding()
    runner = agent.run_as_current(head("j5", "sleep 60", 5))
    assert agent.deliver(message()) == [] and runner.canceled is None


def test_an_empty_payload_is_ignored_and_cancels_nothing(deciding, caplog):
    agent = deciding()
    runner = agent.run_as_current(head("j5", "sleep 60", 5))
    agent.agent._on_job_message(JobMessage(agent.link.job_topic, b""))
    agent.agent._act_on_head()
    assert runner.canceled is None and "empty payload" in caplog.text


def test_a_signed_idle_head_cancels_the_running_job_only_if_its_floor_covers_it(deciding):
    agent = deciding()
    runner = agent.run_as_current(head("j5", "sleep 60", 5))
    assert agent.deliver(idle(4)) == [] and runner.canceled is None  # older than the job: not the service's word now
    agent.deliver(idle(5))
    assert runner.canceled == "the job queue was cleared while the command ran"


def test_a_head_at_or_below_a_verified_floor_is_rejected_for_good(deciding):
    agent = deciding()
    canceled = head("j7", "touch /tmp/never", 7)  # signed, then canceled before this device saw it
    assert agent.deliver(idle(7)) == [] and agent.journal.floor == 7
    assert only_rejection(agent.deliver(canceled), "j7")[Key.REASON] == BELOW_FLOOR
    restarted = deciding()  # the floor is in the journal: it survives a restart
    assert restarted.journal.floor == 7
    assert only_rejection(restarted.deliver(canceled), "j7")[Key.REASON] == BELOW_FLOOR
    assert agent.started == restarted.started == []
    restarted.deliver(head("j9", "true", 9, floor=7))
    assert restarted.started == ["j9"]


def test_a_job_head_raises_the_floor_to_the_seq_before_it(deciding):
    agent = deciding()
    agent.deliver(head("j9", "true", 9))
    assert agent.journal.floor == 8 and agent.started == ["j9"]
    assert agent.deliver(idle(3)) == [] and agent.journal.floor == 8  # a floor never goes down
    assert deciding().journal.floor == 8  # written with the start, in one journal write


def test_the_floor_of_a_rejected_job_head_is_durable_too(deciding):
    agent = deciding()
    agent.journal.record_result("j9", {Key.JOB_ID: "j9", Key.STATUS: "REJECTED"}, seq=9)  # HighestSeq 9, no Floor
    assert only_rejection(agent.deliver(head("j5", "true", 5)), "j5")[Key.REASON] == STALE
    assert deciding().journal.floor == 4 and agent.started == []


@pytest.mark.parametrize("issued", [OLD, utc_now() + timedelta(seconds=HEAD_VALIDITY_SECONDS + 3600)])
def test_an_agent_without_state_holds_back_a_head_issued_outside_the_window(deciding, issued, caplog):
    agent = deciding()
    assert agent.deliver(head("j1", "true", 1, issued=issued)) == []  # neither run nor reported: held back
    assert agent.started == [] and agent.journal.floor is None and "held back" in caplog.text
    agent.deliver(head("j1", "true", 1))  # the service signs it again, with a fresh IssuedAt
    assert agent.started == ["j1"]


def test_an_agent_with_state_relies_on_its_floor_not_on_the_clock(deciding):
    agent = deciding()
    agent.deliver(idle(1))
    agent.deliver(head("j2", "true", 2, issued=OLD))
    assert agent.started == ["j2"]


def test_a_head_signed_without_an_issue_time_is_ignored_not_rejected(deciding, caplog):
    agent = deciding()
    v1 = head("j1", "true", 1)
    del v1[Key.ISSUED_AT]  # what a service older than the agent sends
    assert agent.deliver(v1) == [] and agent.started == []
    assert NO_ISSUE_TIME in caplog.text


def test_during_a_rotation_the_agent_trusts_both_keys(deciding):
    agent = deciding("--server-key", f"{public_b64(SERVICE_KEY)},{public_b64(FORGER_KEY)}")
    agent.deliver(head("j1", "true", 1))
    agent.deliver(head("j2", "true", 2, key=FORGER_KEY))
    assert agent.started == ["j1", "j2"]


# --- the floor the service publishes (SQLite and PostgreSQL) --------------------------------


# `db` (tests/conftest.py): the same store code on a SQLite file and on a fresh PostgreSQL database


def test_the_floor_covers_every_canceled_or_deleted_job_of_the_device(db: Store) -> None:
    assert not db.call_sync(queues.has_history)
    db.call_sync(devices.register_device, "d0", None, [])
    assert db.call_sync(queues.has_history)
    wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False).workflow_id
    first, second = (db.call_sync(jobs.submit_job, n, wf, "DeviceId", "d0", None)[0].job_id for n in ("a", "b"))
    queue = db.call_sync(queues.device_queues, ["d0"])[0]
    assert queue.floor == queue.head.seq - 1
    db.call_sync(jobs.cancel_job, first)
    queue = db.call_sync(queues.device_queues, ["d0"])[0]
    assert queue.floor == queue.head.seq - 1 and queue.floor >= db.call_sync(jobs.child_jobs, first)[0].seq
    deleted_seq = queue.head.seq
    db.call_sync(jobs.delete_job, second)  # the newest job of all: its row is gone, its Seq stays covered
    assert db.call_sync(queues.device_queues, ["d0"])[0].floor >= deleted_seq


# --- the real service, the real broker, the real agents ---------------------------------------


@pytest.mark.mosquitto
def test_a_forged_empty_or_idle_head_does_not_cancel_a_running_job(mosquitto_fleet) -> None:
    broker, service, agent, wire = mosquitto_fleet
    api = service.api
    job = api.submit(api.workflow("sleep 3; echo survived"), DeviceId=DEVICE)
    wire.next_on(Topics().status(DEVICE), lambda m: m[Key.STATUS] == "IN_PROGRESS")
    forger = Wire(broker.url, client_id=SERVICE_CLIENT_ID)
    try:
        forger.client.publish(Topics().job(DEVICE), b"", qos=1, retain=True).wait_for_publish(15)
    finally:
        forger.close()
    for forged in (idle(10**9, key=FORGER_KEY), idle(10**9, key=None)):
        forge(broker.url, DEVICE, forged)
    done = api.wait_job(job)
    assert (done["Status"], done["Result"]) == ("SUCCEEDED", "survived\n")


@pytest.mark.mosquitto
def test_the_head_of_a_job_canceled_before_the_device_ran_it_never_runs(launch: Launcher, tmp_path: Path) -> None:
    with start_mosquitto(tmp_path) as broker:
        service = launch.service(mqtt_url=broker.url)
        api = service.api
        password = api.device(DEVICE)
        wire = Wire(broker.url)
        try:
            job_topic = Topics().job(DEVICE)
            wire.watch(job_topic)
            wire.watch(Topics().status(DEVICE))
            marker = tmp_path / "canceled-job-ran"
            job = api.submit(api.workflow(f"touch {marker}"), DeviceId=DEVICE)
            captured = wire.next_on(job_topic, lambda m: m.get(Key.JOB_ID) is not None)
            api.ok("POST", f"/v1/job/{job}/cancel")
            agent = launch.agent(service, DEVICE, password)  # it sees the idle head, and its floor
            wait_until(lambda: "the floor is now" in agent.log(), 20, "the agent to take the floor")

            forge(broker.url, DEVICE, captured)  # the canceled job's genuine signed head, replayed
            rejected = wire.next_on(Topics().status(DEVICE), lambda m: m[Key.JOB_ID] == captured[Key.JOB_ID])
            assert (rejected[Key.STATUS], rejected[Key.REASON]) == ("REJECTED", BELOW_FLOOR)
            assert api.wait_job(api.submit(api.workflow("echo next"), DeviceId=DEVICE))["Result"] == "next\n"
            assert not marker.exists()
            assert api.ok("GET", f"/v1/job/{job}")["Status"] == "CANCELED"
        finally:
            wire.close()


@pytest.mark.mosquitto
def test_an_agent_without_state_does_not_run_an_old_signed_head(tmp_path: Path) -> None:
    with start_mosquitto(tmp_path) as broker:
        agent = Agent(tmp_path, DEVICE, "unused", broker.url, "--server-key", public_b64(SERVICE_KEY))
        agent.start()
        wire = Wire(broker.url)
        try:
            wire.watch(Topics().status(DEVICE))
            wait_until(lambda: "subscribed to" in agent.log(), 20, "the agent to subscribe")
            old, new = tmp_path / "old-head-ran", tmp_path / "new-head-ran"
            wire.publish(Topics().job(DEVICE), head("old-1", f"touch {old}", 5, issued=OLD))
            wait_until(lambda: "held back" in agent.log() or old.exists(), 20, "the agent to look at the old head")
            wire.publish(Topics().job(DEVICE), head("new-1", f"touch {new}", 6))
            wire.next_on(Topics().status(DEVICE), lambda m: m[Key.JOB_ID] == "new-1" and m[Key.STATUS] == "SUCCEEDED")
            assert new.exists() and not old.exists()
        finally:
            wire.close()
            agent.stop()


def ota_bridge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_BRIDGE_")}
    return subprocess.run([sys.executable, "-m", "ota_bridge", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_service_refuses_to_start_without_its_key_once_it_has_devices(launch: Launcher) -> None:
    service = launch.service()
    service.api.device(DEVICE)
    old_key = service.signing_key_file.read_text()
    service.stop()
    (service.data_dir / "job-signing.key").unlink()

    with pytest.raises(AssertionError, match="the service exited") as refused:
        service.start()
    assert "job-signing.key is missing" in str(refused.value) and "--new-signing-key" in str(refused.value)
    service.argv.append("--new-signing-key")
    service.start()
    assert service.signing_key_file.read_text() != old_key


def test_a_key_rotation_keeps_jobs_running_on_agents_given_the_new_key(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    old_key = service.signing_key_file.read_text().strip()
    key_files = {device: tmp_path / f"{device}.pub" for device in ("dev1", "dev2")}
    agents = {}
    for device, key_file in key_files.items():
        key_file.write_text(old_key + "\n")
        agents[device] = launch.agent(service, device, api.device(device), "--server-key-file", str(key_file))

    staged = ota_bridge_cli("signing-key", "rotate", "--data-dir", str(service.data_dir))
    assert staged.returncode == 0, staged.stderr
    new_key = (service.data_dir / "job-signing.next.pub").read_text().strip()
    assert new_key in staged.stdout and service.signing_key_file.read_text().strip() == old_key

    target = key_files["dev1"]  # pushed with a job signed by the old key; dev2 never gets it
    push = api.workflow(f"printf '%s\\n%s\\n' '{old_key}' '{new_key}' > {target}.new && mv {target}.new {target}")
    assert api.wait_job(api.submit(push, DeviceId="dev1"))["Status"] == "SUCCEEDED"
    wait_until(lambda: "now trusting" in agents["dev1"].log(), 20, "dev1 to re-read its key file")

    activated = ota_bridge_cli("signing-key", "rotate", "--activate", "--data-dir", str(service.data_dir))
    assert activated.returncode == 0, activated.stderr
    service.stop()
    service.start()
    assert service.signing_key_file.read_text().strip() == new_key
    assert api.ok("GET", "/v1/signing-key")["PublicKey"] == new_key

    assert api.wait_job(api.submit(api.workflow("echo rotated"), DeviceId="dev1"), 60)["Result"] == "rotated\n"
    refused = api.submit(api.workflow("echo never"), DeviceId="dev2")
    assert api.wait_job(refused, 60)["Status"] == "REJECTED"
    assert api.ok("GET", f"/v1/job/{refused}/childjobs")[0]["Reason"] == job_signature.DOES_NOT_VERIFY

    retired = ota_bridge_cli("signing-key", "retire", "--data-dir", str(service.data_dir))
    assert retired.returncode == 0 and old_key in retired.stdout
    assert not (service.data_dir / "job-signing.previous.key").exists()
