"""Each fault window on its own, with real processes: what happens is what docs/guarantees.md says."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Launcher
from tests.support.fake_device import FakeDevice
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import Api, wait_until


def child(api: Api, job_id: str) -> dict:
    return api.ok("GET", f"/v1/job/{job_id}/childjobs")[0]


def runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_service_killed_after_storing_a_result_before_the_next_head(launch: Launcher, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    service = launch.service(extra=("--failpoints", "exit-after-store"))
    api = service.api
    agent = launch.agent(service, "dev1", api.device("dev1"))
    first, second = (api.submit(api.workflow(f"echo {n} >> {log}; echo {n}"), DeviceId="dev1") for n in "ab")
    wait_until(lambda: not service.running, 30, "the failpoint to kill the service")
    service.argv = [a for a in service.argv if a not in ("--failpoints", "exit-after-store")]
    service.start()
    assert api.wait_job(first)["Result"] == "a\n"  # the stored result survived the crash
    assert api.wait_job(second)["Result"] == "b\n"  # and the queue moved on after the restart
    assert runs(log) == ["a", "b"] and agent.running


def test_agent_killed_between_running_a_command_and_reporting_it(launch: Launcher, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    service = launch.service()
    api = service.api
    agent = launch.agent(service, "dev1", api.device("dev1"))
    dies = api.submit(api.workflow(f"echo ran >> {log}; kill -9 $PPID"), DeviceId="dev1")
    after = api.submit(api.workflow(f"echo after >> {log}"), DeviceId="dev1")
    wait_until(lambda: agent.proc.poll() is not None, 30, "the command to kill its agent")
    agent.start()
    interrupted = api.wait_job(dies)
    assert interrupted["Status"] == "INTERRUPTED"
    assert "restarted" in child(api, dies)["Reason"]
    assert api.wait_job(after)["Status"] == "SUCCEEDED"
    assert runs(log) == ["ran", "after"], "the interrupted command must never run again"


def test_reboot_workflow_counts_as_success_when_it_says_so(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    agent = launch.agent(service, "dev1", api.device("dev1"))
    reboot = api.workflow("kill -9 $PPID; sleep 5", name="reboot", SuccessOnRestart=True)
    job = api.submit(reboot, DeviceId="dev1")
    wait_until(lambda: agent.proc.poll() is not None, 30, "the 'reboot' to kill its agent")
    agent.start()
    assert api.wait_job(job)["Status"] == "SUCCEEDED"


@pytest.mark.mosquitto
def test_broker_restarted_while_heads_are_retained(launch: Launcher, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    with start_mosquitto(tmp_path) as broker:
        service = launch.service(mqtt_url=broker.url)
        api = service.api
        agent = launch.agent(service, "dev1", api.device("dev1"), start=False)
        jobs = [api.submit(api.workflow(f"echo {i} >> {log}"), DeviceId="dev1") for i in range(3)]
        broker.restart()  # no persistence: every retained head is gone
        agent.start()
        assert [api.wait_job(j)["Status"] for j in jobs] == ["SUCCEEDED"] * 3
        running = api.submit(api.workflow(f"sleep 2; echo mid >> {log}"), DeviceId="dev1")
        api.wait_job(running, final=False)
        wait_until(lambda: child(api, running)["Status"] == "IN_PROGRESS", 15, "the job to start")
        broker.restart()  # while a job runs: its result must still arrive, once
        assert api.wait_job(running)["Status"] == "SUCCEEDED"
    assert runs(log) == ["0", "1", "2", "mid"]


def test_duplicate_late_and_out_of_order_updates_change_nothing(launch: Launcher) -> None:
    service = launch.service()
    api = service.api
    device = FakeDevice(service.broker_url, "dev1", api.device("dev1"))
    try:
        wf = api.workflow("true")
        first, second = api.submit(wf, DeviceId="dev1"), api.submit(wf, DeviceId="dev1")
        c1, c2 = child(api, first)["JobId"], child(api, second)["JobId"]
        device.head_for(c1)
        device.report(c2, "SUCCEEDED", ExitCode=0, Stdout="too early")  # not the head: dropped
        device.report(c1, "IN_PROGRESS")
        device.report(c1, "SUCCEEDED", ExitCode=0, Stdout="one")
        device.head_for(c2)
        device.report(c1, "FAILED", ExitCode=1, Stdout="duplicate")  # already final: dropped
        device.report(c1, "IN_PROGRESS")  # backwards: dropped
        device.report(c2, "SUCCEEDED", ExitCode=0, Stdout="two")
        assert api.wait_job(second)["Result"] == "two"
        assert api.ok("GET", f"/v1/job/{first}")["Result"] == "one"
        assert child(api, first)["Status"] == "SUCCEEDED"
        assert "is not the device's current job" in service.log()
    finally:
        device.close()


def test_silent_device_times_out_on_the_server_and_a_late_result_is_kept(launch: Launcher) -> None:
    service = launch.service(extra=("--timeout-grace", "1"))
    api = service.api
    device = FakeDevice(service.broker_url, "dev1", api.device("dev1"))
    try:
        first = api.submit(api.workflow("sleep 100", TimeoutSeconds=1), DeviceId="dev1")
        second = api.submit(api.workflow("echo next"), DeviceId="dev1")
        c1, c2 = child(api, first)["JobId"], child(api, second)["JobId"]
        device.head_for(c1)
        device.report(c1, "IN_PROGRESS")  # ... and then the device says nothing more
        assert api.wait_job(first)["Status"] == "TIMED_OUT"
        device.head_for(c2)  # the queue moved on
        device.report(c1, "SUCCEEDED", ExitCode=0, Stdout="finished after all")
        late = wait_until(lambda: (c := child(api, first))["Stdout"] and c, 15, "the late result")
        assert late["Status"] == "TIMED_OUT" and late["ExitCode"] == 0
        assert "reported SUCCEEDED later" in late["Reason"]
    finally:
        device.close()


def test_cancel_a_queued_and_a_running_job(launch: Launcher, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    service = launch.service()
    api = service.api
    launch.agent(service, "dev1", api.device("dev1"), "--kill-grace", "1")
    running = api.submit(api.workflow(f"sleep 30; touch {marker}"), DeviceId="dev1")
    queued = api.submit(api.workflow("echo never"), DeviceId="dev1")
    last = api.submit(api.workflow("echo last"), DeviceId="dev1")
    wait_until(lambda: child(api, running)["Status"] == "IN_PROGRESS", 15, "the long job to start")
    assert api.ok("POST", f"/v1/job/{queued}/cancel")["Status"] == "CANCELED"
    assert child(api, running)["Status"] == "IN_PROGRESS"
    assert api.ok("POST", f"/v1/job/{running}/cancel")["Status"] == "CANCELED"
    assert api.wait_job(last)["Result"] == "last\n"
    killed = wait_until(lambda: (c := child(api, running))["Reason"] and "later" in c["Reason"] and c, 15,
                        "the agent's report of the killed command")
    assert killed["Status"] == "CANCELED" and "reported CANCELED later" in killed["Reason"]
    assert child(api, queued)["Stdout"] == "" and not marker.exists()


def test_bad_device_messages_do_not_stop_the_service(launch: Launcher) -> None:
    service = launch.service()
    api = service.api
    password = api.device("dev1")
    device = FakeDevice(service.broker_url, "dev1", password)
    try:
        job = api.submit(api.workflow("true"), DeviceId="dev1")
        c1 = child(api, job)["JobId"]
        device.head_for(c1)
        status = device.topics.status("dev1")
        for junk in (b"not json", b"[]", b'{"JobId": "\\ud800", "Status": "FAILED"}', b"{" * 100_000,
                     b'{"JobId": "x", "Status": "FAILED", "Stdout": "\\ud800"}'):
            device.client.publish(status, junk, qos=1).wait_for_publish(10)
        device.client.publish(status, b"x" * (2 * 1024 * 1024), qos=1)  # over the limit: the broker disconnects it
        wait_until(lambda: "over the limit" in service.log(), 10, "the broker to refuse the oversized message")
        device.close()  # a new client: paho would send that message again after every reconnect
        device = FakeDevice(service.broker_url, "dev1", password)
        device.report(c1, "SUCCEEDED", ExitCode=0, Stdout="out\x00put")
        assert api.wait_job(job)["Result"] == "out\ufffdput"
        assert "ignored a bad message from device dev1" in service.log()
    finally:
        device.close()
