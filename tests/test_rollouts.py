"""Rollouts end to end: a real service and broker, real agents for a few devices and real MQTT
clients answering for the many (RolloutDevice), and the service's clock set by the test
(--test-clock) wherever time decides. No timing assertions: releases are counted after the
rollout says (CheckedAt) that it decided on the clock the test set."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import OPERATOR_USERNAME, Topics, encode, format_time, parse_time, utc_now
from tests.conftest import Launcher
from tests.support.fake_device import FakeDevice
from tests.support.processes import Api, Service, wait_until


class RolloutDevice(FakeDevice):
    """A device played by a paho client: it answers each head it gets (FAILED if `fails`)."""

    def __init__(self, broker_url: str, device_id: str, password: str, fails: bool = False) -> None:
        self.fails = fails
        self.ran: list[str] = []
        super().__init__(broker_url, device_id, password)

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        head = json.loads(msg.payload) if msg.payload else {}
        job_id = head.get("JobId")
        if job_id is None or job_id in self.ran:
            return
        self.ran.append(job_id)
        now = format_time(utc_now())
        self.client.publish(self.topics.status(self.device_id), encode({
            "JobId": job_id, "Status": "FAILED" if self.fails else "SUCCEEDED", "ExitCode": 1 if self.fails else 0,
            "StartTime": now, "EndTime": now}), qos=1)


class QueueWatcher:
    """An operator (user `api`, an API token) reading the retained queue lists."""

    def __init__(self, service: Service) -> None:
        self.latest: dict[str, Any] = {}
        self.lock = threading.Lock()
        host, port = service.broker_url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="queue-watcher")
        self.client.username_pw_set(OPERATOR_USERNAME, service.api.token)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(Topics().all_devices(Topics.QUEUE), qos=1)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = Topics().parse(msg.topic)
        if parsed is not None:
            with self.lock:
                self.latest[parsed[0]] = json.loads(msg.payload) if msg.payload else None

    def jobs(self, device_id: str) -> list[tuple[str, str, str | None]]:
        with self.lock:
            queue = self.latest.get(device_id) or {"Jobs": []}
        return [(j["JobId"], j["Status"], j.get("Reason")) for j in queue["Jobs"]]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def register(api: Api, ids: list[str], group: str) -> dict[str, str]:
    body = api.ok("POST", "/v1/devices", {"Devices": [{"DeviceId": d, "DeviceGroup": group} for d in ids]})
    return {d["DeviceId"]: d["MqttPassword"] for d in body["Devices"]}


def children(api: Api, job_id: str) -> dict[str, dict[str, Any]]:
    return {c["DeviceId"]: c for c in api.ok("GET", f"/v1/job/{job_id}/childjobs")}


def test_a_four_wave_rollout_aborts_before_wave_3_when_wave_2_fails(launch: Launcher) -> None:
    service = launch.service()
    api = service.api
    ids = [f"d{i:02d}" for i in range(40)]  # waves of 10, 25, 50, 100%: d00-d03, d04-d09, d10-d19, d20-d39
    passwords = register(api, ids, "fleet")
    real = {"d00", "d25"}  # a real agent in wave 1 and one in wave 4
    for device_id in sorted(real):
        launch.agent(service, device_id, passwords[device_id])
    fakes = [RolloutDevice(service.broker_url, d, passwords[d], fails="d04" <= d <= "d09")
             for d in ids if d not in real]
    try:
        job_id = api.ok("POST", "/v1/job", {
            "WorkflowId": api.workflow("true"), "DeviceGroup": "fleet",
            "Rollout": {"Waves": [10, 25, 50, 100], "WaveSuccessPercent": 80},
            "AbortOn": [{"Status": "FAILED", "ThresholdPercent": 40, "MinFinished": 8}]})["JobId"]
        job = api.wait_job(job_id, timeout=60)
    finally:
        for fake in fakes:
            fake.close()
    rollout = job["Rollout"]
    assert rollout["Aborted"] is True and rollout["AbortReason"].startswith("rollout aborted: "), rollout
    assert rollout["Wave"] == 2 and rollout["Released"] == 10, rollout
    result = children(api, job_id)
    assert [d for d in ids if result[d]["Status"] == "SUCCEEDED"] == ["d00", "d01", "d02", "d03"]
    assert {result[d]["Status"] for d in ids[4:10]} <= {"FAILED", "CANCELED"}
    later = [result[d] for d in ids[10:]]  # never released: canceled with the reason, never started
    assert {(c["Status"], c["Reason"], c["StartTime"]) for c in later} == {("CANCELED", rollout["AbortReason"], None)}
    assert all(not fake.ran for fake in fakes if fake.device_id >= "d10")


@pytest.fixture(scope="module")
def clocked(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One service whose clock for rollouts is the time in a file the tests write."""
    workdir = Path(tmp_path_factory.mktemp("clocked"))
    clock_file = workdir / "clock"
    clock_file.write_text("2026-03-14T00:30:00Z")
    service = Service(workdir, extra=("--test-clock", str(clock_file)))
    service.start()
    try:
        yield service, clock_file
    finally:
        service.stop()


def at(api: Api, job_id: str, clock_file: Path, when: str) -> dict[str, Any]:
    """Set the service's clock, and wait until the rollout decided on it; its state."""
    clock_file.write_text(when)
    wanted = parse_time(when)

    def decided() -> dict[str, Any] | None:
        job = api.ok("GET", f"/v1/job/{job_id}")
        checked = parse_time(job["Rollout"]["CheckedAt"])
        return job if checked is not None and checked >= wanted else None

    return wait_until(decided, 20, f"the rollout to decide at {when}")


def rate_job(api: Api, group: str, devices: int, per_minute: int) -> str:
    register(api, [f"{group}{i}" for i in range(devices)], group)
    return api.ok("POST", "/v1/job", {"WorkflowId": api.workflow("true"), "DeviceGroup": group,
                                      "Rollout": {"MaxPerMinute": per_minute}})["JobId"]


def test_a_rate_limited_rollout_releases_no_faster_than_its_rate_and_pauses(clocked: Any) -> None:
    service, clock_file = clocked
    api = service.api
    job_id = rate_job(api, "rated", 7, 3)

    def released_at(when: str) -> int:
        """Set the clock, wait for the rollout's decision on it, count the children no longer held."""
        state = at(api, job_id, clock_file, when)["Rollout"]
        out_of_hold = sum(c["Status"] != "SCHEDULED" for c in children(api, job_id).values())
        assert state["Released"] == out_of_hold
        return out_of_hold

    released = [released_at(when) for when in ("2026-03-14T00:30:00Z", "2026-03-14T00:30:59Z")]
    assert api.ok("POST", f"/v1/job/{job_id}/pause")["Rollout"]["Paused"] is True
    released.append(released_at("2026-03-14T00:32:00Z"))
    assert {c["Reason"] for c in children(api, job_id).values() if c["Status"] == "SCHEDULED"} == {
        "rollout paused; rollout: waiting for its turn at 3 a minute"}
    assert api.ok("POST", f"/v1/job/{job_id}/resume")["Rollout"]["Paused"] is False
    released += [released_at(when) for when in ("2026-03-14T00:32:01Z", "2026-03-14T00:32:30Z",
                                                 "2026-03-14T00:33:01Z")]
    assert released == [3, 3, 3, 6, 6, 7]


def test_a_held_job_keeps_its_place_until_its_maintenance_window_opens(clocked: Any, tmp_path: Path) -> None:
    service, clock_file = clocked
    api = service.api
    clock_file.write_text("2026-03-14T00:30:00Z")
    launcher = Launcher(tmp_path)
    watcher = QueueWatcher(service)
    try:
        password = api.device("w1", group="windowed")
        out = tmp_path / "order"
        windowed = api.ok("POST", "/v1/job", {
            "WorkflowId": api.workflow(f"echo windowed >> {out}"), "DeviceGroup": "windowed",
            "Schedule": {"MaintenanceWindows": [{"Cron": "0 2 * * *", "DurationMinutes": 60,
                                                 "TimeZone": "Europe/Berlin"}]}})["JobId"]
        later = api.submit(api.workflow(f"echo later >> {out}"), DeviceId="w1")
        launcher.agent(service, "w1", password)
        held_child = children(api, windowed)["w1"]
        expected = [(held_child["JobId"], "SCHEDULED", "outside maintenance window"),
                    (children(api, later)["w1"]["JobId"], "QUEUED", None)]
        wait_until(lambda: watcher.jobs("w1") == expected, 20, f"the queue list {expected}")
        at(api, windowed, clock_file, "2026-03-14T00:59:00Z")
        assert api.ok("GET", f"/v1/job/{later}")["Status"] == "QUEUED"  # it waits behind the held job
        assert held_child["Status"] == "SCHEDULED" and held_child["Reason"] == "outside maintenance window"
        clock_file.write_text("2026-03-14T01:00:00Z")  # 02:00 in Berlin
        assert api.wait_job(later)["Status"] == "SUCCEEDED"
        assert api.ok("GET", f"/v1/job/{windowed}")["Status"] == "SUCCEEDED"
        assert out.read_text().split() == ["windowed", "later"]
    finally:
        watcher.close()
        launcher.close()


def test_a_rollout_resumes_where_it_was_after_a_restart(clocked: Any) -> None:
    service, clock_file = clocked
    api = service.api
    job_id = rate_job(api, "restarted", 5, 2)
    assert at(api, job_id, clock_file, "2026-03-14T05:00:00Z")["Rollout"]["Released"] == 2
    service.stop()
    service.start()
    clock_file.write_text("2026-03-14T05:00:30Z")  # the same minute: its 2 are spent
    assert at(api, job_id, clock_file, "2026-03-14T05:00:30Z")["Rollout"]["Released"] == 2
    assert at(api, job_id, clock_file, "2026-03-14T05:01:00Z")["Rollout"]["Released"] == 4


def test_a_continuous_job_reaches_a_device_registered_afterwards(launch: Launcher) -> None:
    service = launch.service()
    api = service.api
    job_id = api.ok("POST", "/v1/job", {"WorkflowId": api.workflow("true"), "TagId": "kiosk",
                                        "Continuous": True})["JobId"]
    assert api.ok("GET", f"/v1/job/{job_id}")["Rollout"]["Continuous"] is True
    password = api.device("k1", tags=["kiosk"])
    launch.agent(service, "k1", password)
    wait_until(lambda: children(api, job_id).get("k1", {}).get("Status") == "SUCCEEDED", 30,
               "the new device's child to succeed")
    api.device("k2")
    api.ok("PATCH", "/v1/device/k2", {"Tags": ["kiosk"]})  # gets the tag later
    assert children(api, job_id)["k2"]["Status"] == "QUEUED"
    api.ok("POST", f"/v1/job/{job_id}/cancel")
    api.device("k3", tags=["kiosk"])
    assert "k3" not in children(api, job_id)


def test_bad_rollout_fields_are_refused_by_name_and_pause_needs_a_rollout(clocked: Any) -> None:
    api = clocked[0].api
    workflow_id = api.workflow("true")
    api.device("plain1", group="plain")
    resp = api.request("POST", "/v1/job", {"WorkflowId": workflow_id, "DeviceGroup": "plain",
                                           "Rollout": {"Waves": [1, 10, 5, 100]}})
    assert resp.status == 400
    assert "Rollout.Waves[2]: must be increasing percentages ending at 100" in resp.body["Detail"]
    plain = api.submit(workflow_id, DeviceGroup="plain")
    assert "Rollout" not in api.ok("GET", f"/v1/job/{plain}")
    assert api.request("POST", f"/v1/job/{plain}/pause").status == 409
    assert api.request("POST", "/v1/job/no-such-job/pause").status == 404
