"""The promise at the heart of ota-bridge, with a real service, broker and agent processes:
a device runs its queued jobs one by one, in submission order, and every result comes back."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from tests.conftest import Launcher
from tests.support.mosquitto import BROKERS, broker_url, start_mosquitto
from tests.support.processes import REPO, free_port, wait_until


@pytest.mark.parametrize("broker", BROKERS)
def test_offline_device_runs_its_jobs_in_submission_order(broker: str, launch: Launcher, tmp_path: Path) -> None:
    out = tmp_path / "order.txt"
    with broker_url(broker, tmp_path) as (url, flags):
        service = launch.service(mqtt_url=url, extra=flags)
        api = service.api
        agent = launch.agent(service, "dev1", api.device("dev1"), start=False)
        jobs = [api.submit(api.workflow(f"echo {i} >> {out}; sleep 0.2"), DeviceId="dev1") for i in range(5)]
        assert api.ok("GET", "/v1/device/dev1")["PendingJobs"] == 5
        agent.start()
        finished = [api.wait_job(job) for job in jobs]
    assert out.read_text().split() == ["0", "1", "2", "3", "4"]
    assert all(j["Status"] == "SUCCEEDED" for j in finished)
    starts_and_ends = [(j["StartTime"], j["EndTime"]) for j in finished]
    for (_, end), (start, _) in zip(starts_and_ends, starts_and_ends[1:], strict=False):
        assert end <= start, "a job started before the previous one ended"


def test_group_job_reports_each_devices_result(launch: Launcher) -> None:
    service = launch.service()
    api = service.api
    for dev in ("ok-1", "ok-2", "bad-3"):
        launch.agent(service, dev, api.device(dev, group="fleet"))
    command = 'echo "out $OTA_DEVICE_ID"; echo "err" >&2; case "$OTA_DEVICE_ID" in bad-*) exit 3;; esac'
    job = api.submit(api.workflow(command), DeviceGroup="fleet")
    summary = api.wait_job(job)
    children = {c["DeviceId"]: c for c in api.ok("GET", f"/v1/job/{job}/childjobs")}
    assert summary["Status"] == "FAILED"
    assert summary["Result"]["SUCCEEDED"] == 2 and summary["Result"]["FAILED"] == 1
    assert children["bad-3"]["Status"] == "FAILED" and children["bad-3"]["ExitCode"] == 3
    for dev in ("ok-1", "ok-2"):
        assert children[dev]["Status"] == "SUCCEEDED" and children[dev]["ExitCode"] == 0
    for dev, child in children.items():
        assert child["Stdout"] == f"out {dev}\n" and child["Stderr"] == "err\n"
        assert child["StartTime"] <= child["EndTime"] and child["Result"] == child["Stdout"]


def test_timeout_kills_the_command_and_the_queue_goes_on(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    launch.agent(service, "dev1", api.device("dev1"), "--kill-grace", "1")
    marker = tmp_path / "child-survived"
    slow = api.workflow(f"(sleep 4; touch {marker}) & sleep 60", TimeoutSeconds=1)
    after = api.workflow("echo next")
    slow_job, next_job = api.submit(slow, DeviceId="dev1"), api.submit(after, DeviceId="dev1")
    timed_out = api.wait_job(slow_job)
    assert timed_out["Status"] == "TIMED_OUT"
    assert api.wait_job(next_job)["Result"] == "next\n"
    with pytest.raises(AssertionError):  # the whole process group died, background child too
        wait_until(marker.exists, 5, "the background child to write its marker")


def test_job_timeout_can_be_set_per_job(launch: Launcher) -> None:
    service = launch.service()
    api = service.api
    launch.agent(service, "dev1", api.device("dev1"), "--kill-grace", "1")
    wf = api.workflow("sleep 30", TimeoutSeconds=600)
    job = api.ok("POST", "/v1/job", {"Name": "short", "WorkflowId": wf, "DeviceId": "dev1", "TimeoutSeconds": 1})
    assert api.ok("GET", f"/v1/job/{job['JobId']}")["TimeoutSeconds"] == 1
    assert api.wait_job(job["JobId"])["Status"] == "TIMED_OUT"


@pytest.mark.parametrize("broker", BROKERS)
def test_queues_survive_a_service_restart(broker: str, launch: Launcher, tmp_path: Path) -> None:
    """The database is the truth: after a restart the service republishes every queue."""
    with broker_url(broker, tmp_path) as (url, flags):
        service = launch.service(mqtt_url=url, extra=flags)
        api = service.api
        agent = launch.agent(service, "dev1", api.device("dev1"), start=False)
        jobs = [api.submit(api.workflow(f"echo {i}"), DeviceId="dev1") for i in range(3)]
        service.kill()
        service.start()  # the embedded broker comes back empty; Mosquitto keeps its retained head
        agent.start()
        assert [api.wait_job(j)["Result"] for j in jobs] == ["0\n", "1\n", "2\n"]


def test_busy_port_gets_a_one_line_error_naming_port_and_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, env in (("--http", "OTA_BRIDGE_HTTP"), ("--mqtt-listen", "OTA_BRIDGE_MQTT_LISTEN")):
            other = "--mqtt-listen" if flag == "--http" else "--http"
            result = subprocess.run(
                [sys.executable, "-m", "ota_bridge", "serve", "--data-dir", str(tmp_path / flag), flag,
                 f"127.0.0.1:{port}", other, f"127.0.0.1:{free_port()}"],
                capture_output=True, text=True, timeout=60, cwd=REPO)
            assert result.returncode == 2, result.stderr
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith(f"ota-bridge: port {port} on 127.0.0.1 is already in use; choose another "
                                   f"with {flag} or {env}")


def test_tokens_can_be_made_listed_and_revoked(launch: Launcher) -> None:
    service = launch.service()

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "ota_bridge", "token", *args, "--data-dir", str(service.data_dir)],
                              capture_output=True, text=True, timeout=60, cwd=REPO, check=True).stdout

    token = cli("create", "--name", "ci").strip()
    assert service.api.request("GET", "/v1/job", token=token).status == 200
    listed = cli("list")
    names = [line.split("\t")[0] for line in listed.splitlines()]
    assert names == ["admin", "mosquitto_sub", "ci"] and token not in listed  # the viewer token of its watch file
    assert "revoked 1 token named 'ci'" in cli("revoke", "--name", "ci")
    wait_until(lambda: service.api.request("GET", "/v1/job", token=token).status == 401, 10, "the revocation")
    assert service.api.request("GET", "/v1/job").status == 200  # the admin token still works


@pytest.mark.mosquitto
def test_the_retained_queue_list_follows_progress_submits_and_cancels(launch: Launcher, tmp_path: Path) -> None:
    """The list a device's queue topic retains: the head's IN_PROGRESS comes from the queue the
    service last published (no read), so a submit or cancel since must show in it too."""
    with start_mosquitto(tmp_path) as broker:
        service = launch.service(mqtt_url=broker.url)
        api = service.api
        agent = launch.agent(service, "dev1", api.device("dev1"), start=False)
        watcher = RetainedWatcher(broker.port, Topics().queue("dev1"))
        try:
            api.submit(api.workflow("sleep 3"), "first", DeviceId="dev1")
            second = api.submit(api.workflow("true"), "second", DeviceId="dev1")
            watcher.wait_for(lambda jobs: len(jobs) == 2, "both jobs listed")
            third = api.submit(api.workflow("echo third"), "third", DeviceId="dev1")  # after the list was published
            watcher.wait_for(lambda jobs: len(jobs) == 3, "the third job listed")
            agent.start()
            listed = watcher.wait_for(lambda jobs: jobs and jobs[0][1] == "IN_PROGRESS", "the head in progress")
            assert listed == [("first", "IN_PROGRESS"), ("second", "QUEUED"), ("third", "QUEUED")]
            api.ok("POST", f"/v1/job/{second}/cancel")
            listed = watcher.wait_for(lambda jobs: len(jobs) == 2, "the canceled job gone")
            assert listed == [("first", "IN_PROGRESS"), ("third", "QUEUED")]
            assert api.wait_job(third)["Result"] == "third\n"
            watcher.wait_for(lambda jobs: jobs == [], "an empty list")
        finally:
            watcher.stop()


class RetainedWatcher:
    """A paho client that keeps the latest queue list of one device, as (JobName, Status) pairs."""

    def __init__(self, port: int, topic: str) -> None:
        self.jobs: list[tuple[str, str]] | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="queue-watcher")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)

    def _on_message(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        listed = json.loads(message.payload)["Jobs"] if message.payload else []
        self.jobs = [(job["JobName"], job["Status"]) for job in listed]

    def wait_for(self, condition: Callable[[list], bool], what: str) -> list[tuple[str, str]]:
        wait_until(lambda: self.jobs is not None and condition(self.jobs), 20, what)
        return self.jobs

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
