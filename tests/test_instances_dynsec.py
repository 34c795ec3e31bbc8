"""Cluster mode with Mosquitto's dynamic security plugin: two `ota-bridge serve --instance-id` instances
on one PostgreSQL database, each with its own broker logins (`ota-bridge mosquitto-dynsec-instance`),
and any instance's API call changes the devices' broker accounts.

Devices registered through one instance log in and run jobs submitted through the other; a device
disabled through the instance that did not register it is dropped by the broker and refused, and
enabled again through the first; when one instance's change reaches the broker after another's
newer one (instance a waits a second before telling the broker: a failpoint), the broker still ends
as the registry says; the instances never take over each other's sessions (the broker's own log of
connections says so).
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg2
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ota_bridge import credentials, signing
from ota_bridge.broker_accounts import DYNSEC_ADMIN_PASSWORD_FILE
from ota_bridge.mosquitto_dynsec import InstanceLogins

from .support.databases import fresh_postgres
from .support.mosquitto import REPO_ROOT, Mosquitto, dynsec_mosquitto, logs_in
from .support.processes import Agent, Api, Service, wait_until
from .test_instances import start_instances

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]

INSTANCES = "ab"


def set_up_instance(tmp_path: Path, broker: Mosquitto, name: str,
                    admin_password_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The documented one-time set-up of an instance, as the plugin's first admin (its password in the
    data dir `mosquitto-dynsec-config` wrote, tmp_path/service-data)."""
    admin_password_file = admin_password_file or tmp_path / "service-data" / DYNSEC_ADMIN_PASSWORD_FILE
    return subprocess.run(
        [sys.executable, "-m", "ota_bridge", "mosquitto-dynsec-instance", "--instance-id", name, "--mqtt-url",
         broker.url, "--data-dir", str(tmp_path / name / "service-data"), "--admin-password-file",
         str(admin_password_file)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def connected_as(broker: Mosquitto, login: str) -> int:
    """How often the broker logged a new connection of this login (its client id and its username)."""
    name = re.escape(login)
    return len(re.findall(rf"New client connected from \S+ as {name} \(.*u'{name}'\)", broker.log_text()))


def test_two_instances_keep_device_accounts_in_the_plugin(tmp_path: Path) -> None:
    with fresh_postgres() as database, dynsec_mosquitto(tmp_path) as (broker, _flags):
        for name in INSTANCES:
            done = set_up_instance(tmp_path, broker, name)
            assert done.returncode == 0, done.stderr
        again = set_up_instance(tmp_path, broker, "a")  # safe to run again: same logins, same passwords
        assert again.returncode == 0, again.stderr
        wrong = tmp_path / "wrong-password"
        wrong.write_text("not-the-admin-password\n")
        refused = set_up_instance(tmp_path, broker, "c", wrong)
        assert refused.returncode == 2 and "refused the login" in refused.stderr, refused.stderr
        assert not list((tmp_path / "c" / "service-data").iterdir())  # no password the broker never took
        services = start_instances(tmp_path, database, broker.url, INSTANCES, ("--mosquitto-dynsec",),
                                   {"a": ("--failpoints", "slow-broker-accounts")})
        agents: list[Agent] = []
        try:
            token = (services[0].data_dir / "admin-token").read_text().strip()
            a, b = (Api(s.base_url, token) for s in services)
            run_jobs_across_instances(tmp_path, broker, services, a, b, agents)
            disable_through_the_other_instance(broker, a, b)
            overtaken_disable(broker, a, b)
            overtaken_rotation(broker, database, a, b)
            assert a.ok("GET", "/v1/health")["BrokerConnected"] and b.ok("GET", "/v1/health")["BrokerConnected"]
            assert_refused_without_set_up(tmp_path, broker, database, services[0])
            for name in INSTANCES:  # one connection per login, each its own user, never taken over
                logins = InstanceLogins.of(name)
                for login in (logins.service, logins.admin):
                    assert connected_as(broker, login) == 1, (login, broker.log_text())
            assert "already connected" not in broker.log_text(), broker.log_text()
        finally:
            for process in [*agents, *services]:
                process.stop()


def assert_refused_without_set_up(tmp_path: Path, broker: Mosquitto, database: str, first: Service) -> None:
    """An instance given no logins of its own (and the cluster's signing key) stops, naming the set-up."""
    not_set_up = Service(tmp_path / "c", broker.url, database, ("--instance-id", "c", "--mosquitto-dynsec"))
    not_set_up.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the refused set-up made it, and no more
    for key_file in signing.key_files(first.data_dir):
        shutil.copy2(key_file, not_set_up.data_dir / key_file.name)
    with pytest.raises(AssertionError, match="mosquitto-dynsec-instance --instance-id c"):
        not_set_up.start(timeout=20)


def run_jobs_across_instances(tmp_path: Path, broker: Mosquitto, services: list[Service], a: Api, b: Api,
                              agents: list[Agent]) -> None:
    """A device registered through each instance runs a job submitted through the other."""
    for api, device_id in ((a, "dev-a"), (b, "dev-b")):
        agents.append(Agent(tmp_path, device_id, api.device(device_id), broker.url,
                            server_key_file=services[0].signing_key_file))
        agents[-1].start()
    workflow = a.workflow('echo "ran on $OTA_DEVICE_ID"')
    jobs = [b.submit(workflow, "from-b", DeviceId="dev-a"), a.submit(workflow, "from-a", DeviceId="dev-b")]
    for job_id, api, device_id in zip(jobs, (a, b), ("dev-a", "dev-b"), strict=True):
        assert api.wait_job(job_id, timeout=30)["Status"] == "SUCCEEDED", api.ok("GET", f"/v1/job/{job_id}")
        child = api.ok("GET", f"/v1/job/{job_id}/childjobs")[0]
        assert child["DeviceId"] == device_id and child["Status"] == "SUCCEEDED", child


def disable_through_the_other_instance(broker: Mosquitto, a: Api, b: Api) -> None:
    """Registered through a, disabled through b: the broker drops its connection and refuses it; enabled
    again through a, it logs in."""
    password = a.device("victim")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="victim")
    client.username_pw_set("victim", password)
    dropped: queue.Queue[bool] = queue.Queue()
    client.on_disconnect = lambda *_: dropped.put(True)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 10, "the device's connection")
        b.ok("PATCH", "/v1/device/victim", {"Enabled": False})
        assert dropped.get(timeout=10), "the disabled device's connection was not dropped"
    finally:
        client.disconnect()
        client.loop_stop()
    assert not logs_in(broker.port, "victim", password)
    a.ok("PATCH", "/v1/device/victim", {"Enabled": True})
    assert logs_in(broker.port, "victim", password)



def stored_hash(database: str, device_id: str) -> str:
    with psycopg2.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT password_hash FROM device WHERE device_id = %s", (device_id,))
        [(stored,)] = cursor.fetchall()
    return str(stored)


def overtaken_disable(broker: Mosquitto, a: Api, b: Api) -> None:
    """a disables (and tells the broker a second after committing: its failpoint), b enables meanwhile:
    the plugin gets b's enable first, a's disable last, and still the broker ends as the registry says."""
    password = b.device("flipper")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(a.request, "PATCH", "/v1/device/flipper", {"Enabled": False})
        wait_until(lambda: not b.ok("GET", "/v1/device/flipper")["Enabled"], 10, "a's disable to be committed")
        b.ok("PATCH", "/v1/device/flipper", {"Enabled": True})
        assert slow.result().status == 200
    assert b.ok("GET", "/v1/device/flipper")["Enabled"] is True
    assert logs_in(broker.port, "flipper", password)


def overtaken_rotation(broker: Mosquitto, database: str, a: Api, b: Api) -> None:
    """a re-keys (slow, as above), b re-keys meanwhile: the broker takes b's password, the one the registry
    kept, not a's, which the plugin would have got last."""
    b.device("spinner")
    before = stored_hash(database, "spinner")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(a.ok, "POST", "/v1/device/spinner/credentials")
        wait_until(lambda: stored_hash(database, "spinner") != before, 10, "a's new password to be committed")
        newest = b.ok("POST", "/v1/device/spinner/credentials")["MqttPassword"]
        overtaken = slow.result()["MqttPassword"]
    assert credentials.verify_password(newest, stored_hash(database, "spinner"))
    assert logs_in(broker.port, "spinner", newest)
    assert not logs_in(broker.port, "spinner", overtaken)
