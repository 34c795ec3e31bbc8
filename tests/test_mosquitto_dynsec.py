"""Mosquitto's dynamic security plugin kept in step with the registry, end to end.

A real Mosquitto 2.0 loads the plugin from mosquitto-dynsec.conf as shipped; its first file comes
from `ota-bridge mosquitto-dynsec-config`, and the service (`--mosquitto-dynsec`) adds, disables,
re-keys and deletes devices over MQTT while it runs. tests/test_isolation.py runs its isolation,
disable and rotate tests on this set-up too (its `dynsec` broker).
"""

from __future__ import annotations

import queue
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ota_bridge import cli, settings
from ota_bridge.errors import ConfigError
from tests.conftest import Launcher
from tests.support.fake_device import FakeDevice
from tests.support.mosquitto import DYNSEC_CONF, DYNSEC_FILE, REPO_ROOT, dynsec_mosquitto, logs_in, start_mosquitto
from tests.support.processes import Service, wait_until

pytestmark = pytest.mark.mosquitto


@pytest.fixture(scope="module")
def dynsec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, int]]:
    workdir = tmp_path_factory.mktemp("dynsec")
    launcher = Launcher(workdir)
    try:
        with dynsec_mosquitto(workdir) as (broker, flags):
            yield launcher.service(mqtt_url=broker.url, extra=flags), broker.port
    finally:
        launcher.close()


def test_bulk_and_single_registrations_log_in_and_get_jobs(dynsec: tuple[Service, int]) -> None:
    service, port = dynsec
    api = service.api

    def register(n: int) -> Any:
        if n % 2:
            return api.request("POST", "/v1/device", {"DeviceId": f"one-{n}"})
        return api.request("POST", "/v1/devices", {"Devices": [{"DeviceId": f"many-{n}-{k}"} for k in range(5)]})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(register, range(6)))
    assert [a.status for a in answers] == [201] * 6, [a.body for a in answers]
    registered = [d for a in answers for d in a.body.get("Devices", [a.body])]
    for device in registered[::4]:
        assert logs_in(port, device["DeviceId"], device["MqttPassword"]), device["DeviceId"]
    device = FakeDevice(service.broker_url, "many-0-3", next(d["MqttPassword"] for d in registered
                                                             if d["DeviceId"] == "many-0-3"))
    try:
        job = api.submit(api.workflow("true"), DeviceId="many-0-3")
        child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
        device.head_for(child)
        device.report(child, "SUCCEEDED", ExitCode=0)
        assert api.wait_job(job)["Status"] == "SUCCEEDED"
    finally:
        device.close()


def test_a_deleted_device_is_dropped_and_refused(dynsec: tuple[Service, int]) -> None:
    service, port = dynsec
    password = service.api.device("short-lived")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="short-lived")
    client.username_pw_set("short-lived", password)
    gone: queue.Queue[bool] = queue.Queue()
    client.on_disconnect = lambda *_: gone.put(True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 10, "the device's connection")
        service.api.ok("DELETE", "/v1/device/short-lived")
        assert gone.get(timeout=10), "the deleted device's connection was not dropped"
    finally:
        client.loop_stop()
    assert not logs_in(port, "short-lived", password)


def test_a_refused_command_undoes_the_registration(dynsec: tuple[Service, int]) -> None:
    service, port = dynsec
    service.api.device("orphan")
    with sqlite3.connect(service.data_dir / "ota-bridge.db") as db:  # the registry forgets it, the broker not
        db.execute("DELETE FROM device WHERE device_id = 'orphan'")
    answer = service.api.request("POST", "/v1/devices", {"Devices": [{"DeviceId": "bystander"},
                                                                     {"DeviceId": "orphan"}]})
    assert answer.status == 500 and "'orphan'" in answer.body["Detail"], answer.body
    assert "2 devices were not registered" in answer.body["Detail"], answer.body
    assert service.api.request("GET", "/v1/device/bystander").status == 404
    password = service.api.device("orphan")  # the undo removed the plugin's leftovers too
    assert logs_in(port, "orphan", password)


def test_the_first_file_holds_the_devices_already_registered(tmp_path: Path) -> None:
    service = Service(tmp_path)  # registers on the embedded broker first, then moves to Mosquitto
    service.start()
    try:
        kept = service.api.device("kept")
        barred = service.api.device("barred")
        service.api.ok("PATCH", "/v1/device/barred", {"Enabled": False})
    finally:
        service.stop()
    accounts = tmp_path / "mosquitto-dynsec"
    accounts.mkdir()
    subprocess.run([sys.executable, "-m", "ota_bridge", "mosquitto-dynsec-config", "--out", str(accounts / DYNSEC_FILE),
                    "--data-dir", str(service.data_dir)], check=True, capture_output=True, timeout=60, cwd=REPO_ROOT)
    assert (accounts / DYNSEC_FILE).stat().st_mode & 0o777 == 0o600
    again = subprocess.run([sys.executable, "-m", "ota_bridge", "mosquitto-dynsec-config", "--out",
                            str(accounts / DYNSEC_FILE), "--data-dir", str(service.data_dir)],
                           capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert again.returncode != 0 and "--replace" in again.stderr, again.stderr
    with start_mosquitto(tmp_path, accounts_dir=accounts, conf=DYNSEC_CONF) as broker:
        assert logs_in(broker.port, "kept", kept)  # the registry's own hash, as the plugin stores them
        assert not logs_in(broker.port, "barred", barred)
        operator = (service.data_dir / "mqtt-operator-password").read_text().strip()
        assert logs_in(broker.port, "api", operator)


@pytest.mark.parametrize("flags, complaint", [
    (["--mosquitto-dynsec"], "--mqtt-url"),
    (["--mosquitto-dynsec", "--mqtt-url", "mqtt://h:1883", "--mosquitto-dir", "/x"], "not both"),
])
def test_settings_that_do_not_go_together(flags: list[str], complaint: str) -> None:
    args = cli.build_parser().parse_args(["serve", *flags])
    with pytest.raises(ConfigError, match=complaint):
        settings.resolve(args, environ={})


def test_the_service_needs_the_admin_password_the_set_up_makes(tmp_path: Path) -> None:
    service = Service(tmp_path, mqtt_url="mqtt://127.0.0.1:1", extra=("--mosquitto-dynsec",))
    with pytest.raises(AssertionError, match="mosquitto-dynsec-config"):
        service.start(timeout=20)
