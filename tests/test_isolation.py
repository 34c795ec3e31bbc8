"""Topic isolation on both brokers: a device sees and writes only its own topics.

Clients here are bare paho clients logging in with real device credentials, so nothing but
the broker's own checks stands between device B and device A's messages. On Mosquitto, the
checks are the password and ACL files the service writes from its registry, or (`dynsec`) the
clients and roles it keeps in Mosquitto's dynamic security plugin.
"""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from ota_bridge.embedded_broker import TopicPolicy
from tests.conftest import Launcher
from tests.support.mosquitto import dynsec_mosquitto, secure_mosquitto
from tests.support.processes import Service, wait_until

TOPICS = Topics()
QUIET_SECONDS = 1.5  # how long a client listens for what it must never get


class Client:
    """A bare MQTT client that records everything it is sent."""

    def __init__(self, fleet: "Fleet", username: str, password: str, client_id: str | None = None,
                 will: str | None = None) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.suback: queue.Queue[list[Any]] = queue.Queue()
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or username)
        self.mqtt.username_pw_set(username, password)
        if will:
            self.mqtt.will_set(will, b'{"Presence": "offline"}', qos=1, retain=True)
        self.mqtt.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        self.mqtt.on_message = lambda _c, _u, m: self.received.put((m.topic, m.payload))
        self.mqtt.on_subscribe = lambda _c, _u, _m, codes, _p: self.suback.put(codes)
        self.mqtt.connect("127.0.0.1", fleet.port)
        self.mqtt.loop_start()

    def connected(self) -> bool:
        return not self.connack.get(timeout=10).is_failure

    def subscribe(self, topic: str) -> bool:
        self.mqtt.subscribe(topic, qos=1)
        return not self.suback.get(timeout=10)[0].is_failure

    def topics_received(self, wait: float = QUIET_SECONDS) -> set[str]:
        time.sleep(wait)
        got = set()
        while not self.received.empty():
            got.add(self.received.get()[0])
        return got

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@dataclass
class Fleet:
    service: Service
    port: int
    passwords: dict[str, str]
    operator_password: str
    embedded: bool


@pytest.fixture(scope="module", params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto),
                                        pytest.param("dynsec", marks=pytest.mark.mosquitto)])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One service (and Mosquitto) per broker kind for the whole module; fleet() resets its devices."""
    workdir = tmp_path_factory.mktemp(request.param)
    launcher = Launcher(workdir)
    try:
        if request.param == "embedded":
            service = launcher.service()
            yield Fleet(service, service.mqtt_port, {}, service.api.token or "", True)
            return
        with (dynsec_mosquitto if request.param == "dynsec" else secure_mosquitto)(workdir) as (mosquitto, flags):
            service = launcher.service(mqtt_url=mosquitto.url, extra=flags)
            operator = (service.data_dir / "mqtt-operator-password").read_text().strip()
            yield Fleet(service, mosquitto.port, {}, operator, False)
    finally:
        launcher.close()


@pytest.fixture
def fleet(broker: Fleet) -> Fleet:
    """dev1 and dev2, registered afresh for each test (their old jobs and retained topics gone)."""
    return Fleet(broker.service, broker.port, make_devices(broker.service), broker.operator_password, broker.embedded)


def make_devices(service: Service) -> dict[str, str]:
    for dev in ("dev1", "dev2"):
        service.api.request("DELETE", f"/v1/device/{dev}")
    return {dev: service.api.device(dev) for dev in ("dev1", "dev2")}


def test_device_b_never_receives_device_a_messages_retained_or_live(fleet: Fleet) -> None:
    api, passwords = fleet.service.api, fleet.passwords
    api.submit(api.workflow("true"), DeviceId="dev1")  # dev1 now has a retained head and queue
    a = Client(fleet, "dev1", passwords["dev1"], will=TOPICS.presence("dev1"))
    assert a.connected() and a.subscribe(TOPICS.job("dev1"))
    assert TOPICS.job("dev1") in a.topics_received()
    b = Client(fleet, "dev2", passwords["dev2"])
    try:
        assert b.connected()
        assert b.subscribe(TOPICS.job("dev2"))
        if fleet.embedded:  # amqtt refuses the subscription; Mosquitto grants it and delivers nothing
            assert not b.subscribe(TOPICS.job("dev1")), "a device may not subscribe to another's topics"
            assert not b.subscribe("ota/v1/#") and not b.subscribe("#")
        else:
            b.subscribe(TOPICS.job("dev1")), b.subscribe("ota/v1/#"), b.subscribe("#")
        a.mqtt.publish(TOPICS.presence("dev1"), b'{"Presence": "online"}', qos=1, retain=True)
        api.submit(api.workflow("true"), DeviceId="dev1")  # live traffic for dev1
        assert not [t for t in b.topics_received() if "/dev1/" in t]
    finally:
        a.close()
        b.close()


def test_a_device_cannot_publish_for_another(fleet: Fleet) -> None:
    api = fleet.service.api
    job = api.submit(api.workflow("true"), DeviceId="dev1")
    child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
    watcher = Client(fleet, "api", fleet.operator_password, client_id="watcher")
    assert watcher.connected() and watcher.subscribe(TOPICS.job("dev1"))
    head = watcher.received.get(timeout=10)
    b = Client(fleet, "dev2", fleet.passwords["dev2"])
    try:
        assert b.connected()
        forged = b'{"JobId": "%s", "Status": "SUCCEEDED", "ExitCode": 0}' % child.encode()
        b.mqtt.publish(TOPICS.status("dev1"), forged, qos=1).wait_for_publish(10)
        b.mqtt.publish(TOPICS.job("dev1"), b"{}", qos=1, retain=True).wait_for_publish(10)
        time.sleep(QUIET_SECONDS)
        assert api.ok("GET", f"/v1/job/{job}")["Status"] == "QUEUED"
        assert watcher.topics_received() == set(), "the forged head reached the broker"
        assert head[1] and json.loads(head[1])["JobId"] == child
    finally:
        b.close()
        watcher.close()


@pytest.mark.parametrize("username, password_of, client_id, will", [
    ("dev1", "dev2", "dev1", None),  # another device's password
    ("ghost", "dev1", "ghost", None),  # not registered
])
def test_logins_that_are_refused(fleet: Fleet, username: str, password_of: str, client_id: str, will: str) -> None:
    client = Client(fleet, username, fleet.passwords[password_of], client_id=client_id, will=will)
    try:
        assert not client.connected()
    finally:
        client.close()


@pytest.mark.parametrize("username, client_id, will", [
    ("dev1", "dev2", None),  # a device borrowing another's client id
    ("dev1", "dev1", TOPICS.presence("dev2")),  # a last will that speaks for another device
    ("api", "ota-bridge-service", None),  # an operator taking over the service's session
    ("api", "dev1", None),  # ... or a device's
])
def test_embedded_broker_refuses_borrowed_client_ids_and_wills(launch: Launcher, username: str, client_id: str,
                                                              will: str) -> None:
    """On Mosquitto, use_username_as_clientid makes these harmless: every client id is its username."""
    service = launch.service()
    fleet = Fleet(service, service.mqtt_port, make_devices(service), "", True)
    password = service.api.token if username == "api" else fleet.passwords[username]
    client = Client(fleet, username, password or "", client_id=client_id, will=will)
    try:
        assert not client.connected()
    finally:
        client.close()


def test_anonymous_is_refused(fleet: Fleet) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon")
    codes: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.put(rc)
    client.connect("127.0.0.1", fleet.port)
    client.loop_start()
    try:
        assert codes.get(timeout=10).is_failure
    finally:
        client.loop_stop()


def test_operators_read_everything_and_write_nothing(fleet: Fleet) -> None:
    api = fleet.service.api
    api.submit(api.workflow("true"), DeviceId="dev2")
    watcher = Client(fleet, "api", fleet.operator_password, client_id="watcher-1")
    try:
        assert watcher.connected() and watcher.subscribe("ota/v1/#")
        assert TOPICS.job("dev2") in watcher.topics_received()
        watcher.mqtt.publish(TOPICS.job("dev1"), b"{}", qos=1, retain=True).wait_for_publish(10)
        assert TOPICS.job("dev1") not in watcher.topics_received(), "an operator wrote a head"
    finally:
        watcher.close()


def test_a_disabled_device_is_disconnected_and_cannot_come_back(fleet: Fleet) -> None:
    api = fleet.service.api
    device = Client(fleet, "dev1", fleet.passwords["dev1"])
    try:
        assert device.connected()
        gone: queue.Queue[Any] = queue.Queue()
        device.mqtt.on_disconnect = lambda *_: gone.put(True)
        assert api.ok("PATCH", "/v1/device/dev1", {"Enabled": False})["Enabled"] is False
        assert gone.get(timeout=10)  # Mosquitto drops it when it reloads the accounts
    finally:
        device.close()
    assert not Client(fleet, "dev1", fleet.passwords["dev1"]).connected()
    api.ok("PATCH", "/v1/device/dev1", {"Enabled": True})
    assert wait_until(lambda: Client(fleet, "dev1", fleet.passwords["dev1"]).connected(), 10, "re-enabled login")


def test_rotated_credentials_replace_the_old_ones(fleet: Fleet) -> None:
    api = fleet.service.api
    device = Client(fleet, "dev1", fleet.passwords["dev1"])
    assert device.connected()
    gone: queue.Queue[Any] = queue.Queue()
    device.mqtt.on_disconnect = lambda *_: gone.put(True)
    fresh = api.ok("POST", "/v1/device/dev1/credentials")["MqttPassword"]
    assert gone.get(timeout=10), "the connection made with the old password was not dropped"
    device.close()
    assert fresh != fleet.passwords["dev1"]
    assert not Client(fleet, "dev1", fleet.passwords["dev1"]).connected()
    assert wait_until(lambda: Client(fleet, "dev1", fresh).connected(), 10, "a login with the new password")


@pytest.mark.parametrize("user, topic, action, allowed", [
    ("dev1", "ota/v1/devices/dev1/job", "subscribe", True),
    ("dev1", "ota/v1/devices/dev1/#", "subscribe", True),
    ("dev1", "ota/v1/devices/+/job", "subscribe", False),
    ("dev1", "ota/v1/devices/dev10/job", "subscribe", False),
    ("dev1", "ota/v1/devices/dev1/status", "publish", True),
    ("dev1", "ota/v1/devices/dev1/presence", "publish", True),
    ("dev1", "ota/v1/devices/dev1/job", "publish", False),
    ("dev1", "ota/v1/devices/dev2/job", "receive", False),
    ("api", "ota/v1/devices/dev2/job", "receive", True),
    ("api", "ota/v1/devices/dev2/job", "publish", False),
    ("ota-bridge-service", "ota/v1/devices/dev2/job", "publish", True),
])
def test_topic_policy_table(user: str, topic: str, action: str, allowed: bool) -> None:
    assert TopicPolicy(TOPICS).allows(user, topic, action) is allowed
