"""Topic isolation on the embedded broker: a device sees and writes only its own topics.

Clients here are bare paho clients logging in with real device credentials, so nothing but
the broker's own checks stands between device B and device A's messages.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from ota_bridge.broker import TopicPolicy
from tests.conftest import Launcher
from tests.support.processes import Service

TOPICS = Topics()
QUIET_SECONDS = 1.5  # how long a client listens for what it must never get


class Client:
    """A bare MQTT client that records everything it is sent."""

    def __init__(self, service: Service, username: str, password: str, client_id: str | None = None,
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
        self.mqtt.connect("127.0.0.1", service.mqtt_port)
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


@pytest.fixture
def fleet(launch: Launcher) -> tuple[Service, dict[str, str]]:
    service = launch.service()
    passwords = {dev: service.api.device(dev) for dev in ("dev1", "dev2")}
    return service, passwords


def test_device_b_never_receives_device_a_messages_retained_or_live(fleet: Any) -> None:
    service, passwords = fleet
    api = service.api
    api.submit(api.workflow("true"), DeviceId="dev1")  # dev1 now has a retained head and queue
    a = Client(service, "dev1", passwords["dev1"], will=TOPICS.presence("dev1"))
    assert a.connected() and a.subscribe(TOPICS.job("dev1"))
    assert TOPICS.job("dev1") in a.topics_received()
    b = Client(service, "dev2", passwords["dev2"])
    try:
        assert b.connected()
        assert b.subscribe(TOPICS.job("dev2"))
        assert not b.subscribe(TOPICS.job("dev1")), "a device may not subscribe to another's topics"
        assert not b.subscribe("ota/v1/#") and not b.subscribe("#")
        a.mqtt.publish(TOPICS.presence("dev1"), b'{"Presence": "online"}', qos=1, retain=True)
        api.submit(api.workflow("true"), DeviceId="dev1")  # live traffic for dev1
        assert not [t for t in b.topics_received() if "/dev1/" in t]
    finally:
        a.close()
        b.close()


def test_a_device_cannot_publish_for_another(fleet: Any) -> None:
    service, passwords = fleet
    api = service.api
    job = api.submit(api.workflow("true"), DeviceId="dev1")
    child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
    b = Client(service, "dev2", passwords["dev2"])
    try:
        assert b.connected()
        forged = b'{"JobId": "%s", "Status": "SUCCEEDED", "ExitCode": 0}' % child.encode()
        b.mqtt.publish(TOPICS.status("dev1"), forged, qos=1).wait_for_publish(10)
        b.mqtt.publish(TOPICS.job("dev1"), b"{}", qos=1, retain=True).wait_for_publish(10)
        time.sleep(QUIET_SECONDS)
        assert api.ok("GET", f"/v1/job/{job}")["Status"] == "QUEUED"
        assert "refused for user 'dev2'" in service.log()
    finally:
        b.close()


@pytest.mark.parametrize("username, password_of, client_id, will", [
    ("dev1", "dev2", "dev1", None),  # another device's password
    ("dev1", "dev1", "dev2", None),  # a client id that is not the device's own
    ("dev1", "dev1", "dev1", TOPICS.presence("dev2")),  # a last will that speaks for another device
    ("ghost", "dev1", "ghost", None),  # not registered
])
def test_logins_that_are_refused(fleet: Any, username: str, password_of: str, client_id: str, will: str) -> None:
    service, passwords = fleet
    client = Client(service, username, passwords[password_of], client_id=client_id, will=will)
    try:
        assert not client.connected()
    finally:
        client.close()


def test_anonymous_is_refused(fleet: Any) -> None:
    service, _ = fleet
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon")
    codes: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.put(rc)
    client.connect("127.0.0.1", service.mqtt_port)
    client.loop_start()
    try:
        assert codes.get(timeout=10).is_failure
    finally:
        client.loop_stop()


def test_operators_read_everything_and_write_nothing(fleet: Any) -> None:
    service, _ = fleet
    api = service.api
    api.submit(api.workflow("true"), DeviceId="dev2")
    watcher = Client(service, "api", api.token, client_id="watcher-1")
    try:
        assert watcher.connected() and watcher.subscribe("ota/v1/#")
        assert TOPICS.job("dev2") in watcher.topics_received()
        watcher.mqtt.publish(TOPICS.job("dev1"), b"{}", qos=1, retain=True).wait_for_publish(10)
        assert "refused for user 'api'" in service.log()
    finally:
        watcher.close()


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
