"""The service's in-process link to its embedded broker (embedded_broker/service_link.py).

A real embedded broker in this process (on its own thread and event loop, as in
test_broker_hardening), devices and an operator on real TCP connections speaking raw MQTT, and the
service attached in-process: no socket, no amqtt session. Plain amqtt has no such client.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from agent.protocol import OPERATOR_USERNAME
from ota_bridge.embedded_broker.service_link import ServiceLink
from ota_bridge.mqtt_link import Incoming
from tests.support.processes import Service, wait_until
from tests.support.raw_mqtt import RawClient
from tests.test_broker_hardening import DEVICES, QUIET, TOKEN, TOPICS, BrokerThread

SUBSCRIPTIONS = [TOPICS.all_devices(TOPICS.STATUS), TOPICS.all_devices(TOPICS.PRESENCE)]


class Attached:
    """A ServiceLink on the broker's loop, recording what it is handed and when on_connect ran."""

    def __init__(self, running: BrokerThread) -> None:
        self.running = running
        self.got: list[Incoming] = []
        self.connects: list[int] = []  # len(got) at each on_connect

        async def start() -> ServiceLink:
            link = ServiceLink(running.broker.core, SUBSCRIPTIONS, on_message=self.got.append,
                               on_connect=lambda: self.connects.append(len(self.got)))
            link.start()
            return link

        self.link = running.call(start())

    def publish(self, *messages: tuple[str, bytes, bool]) -> None:
        """Publish these (topic, payload, retain) back to back in one turn of the broker's loop."""
        async def publish() -> None:
            for topic, payload, retain in messages:
                self.link.publish(topic, payload, retain=retain)

        self.running.call(publish())

    def received(self, count: int, timeout: float = 10) -> list[tuple[str, bytes, bool]]:
        wait_until(lambda: len(self.got) >= count, timeout, f"{count} messages for the service")
        time.sleep(QUIET / 4)  # and no more
        return [(m.topic, m.payload, m.retained) for m in self.got]

    def close(self) -> None:
        async def close() -> None:
            await self.link.aclose()

        self.running.call(close())


class Running(BrokerThread):
    """A fresh broker for one test, closing the clients it logged in."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[RawClient] = []

    def login(self, client_id: str, username: str, password: str, **kwargs: object) -> RawClient:
        client = super().login(client_id, username, password, **kwargs)
        self.opened.append(client)
        return client

    def device(self, device_id: str) -> RawClient:
        return self.login(device_id, device_id, DEVICES[device_id])

    def close(self) -> None:
        for client in self.opened:
            client.close()
        super().close()


@pytest.fixture
def running() -> Iterator[Running]:
    broker = Running()
    try:
        yield broker
    finally:
        broker.close()


def test_the_service_hears_devices_in_order_and_retained_presence_after_connecting(
        running: Running) -> None:
    dev_a = running.device("dev-a")
    operator = running.login("watcher", OPERATOR_USERNAME, TOKEN)
    assert operator.subscribe(TOPICS.presence("dev-a")) == 1
    dev_a.publish(TOPICS.presence("dev-a"), b"online", qos=1, retain=True)  # before the service is there
    assert operator.messages(QUIET) == [(TOPICS.presence("dev-a"), b"online")]  # routed, so retained
    service = Attached(running)
    try:
        assert service.link.connected.is_set()
        assert service.received(1) == [(TOPICS.presence("dev-a"), b"online", True)]
        assert service.connects == [0]  # on_connect first, then the retained messages, as after a CONNACK
        results = [b"r%d" % n for n in range(50)]
        for result in results:
            dev_a.publish(TOPICS.status("dev-a"), result, qos=1)
        got = service.received(51)[1:]
        assert got == [(TOPICS.status("dev-a"), r, False) for r in results]
        assert running.session_count() == 2  # dev-a's and the operator's: none for the service, no socket
    finally:
        service.close()
    dev_a.publish(TOPICS.status("dev-a"), b"after the link stopped", qos=1)
    time.sleep(QUIET / 4)
    assert len(service.got) == 51 and not service.link.connected.is_set()


def test_heads_reach_only_their_device_in_order_and_the_last_one_is_retained(
        running: Running) -> None:
    dev_a, dev_b = running.device("dev-a"), running.device("dev-b")
    assert dev_a.subscribe(TOPICS.job("dev-a")) == 1 and dev_b.subscribe(TOPICS.job("dev-b")) == 1
    operator = running.login("watcher", OPERATOR_USERNAME, TOKEN)
    assert operator.subscribe(TOPICS.device("+", "#")) == 1
    service = Attached(running)
    try:
        heads = [(TOPICS.job("dev-a"), b"head %d" % n, True) for n in range(300)]
        service.publish(*heads, (TOPICS.queue("dev-a"), b"list", True))
        assert dev_a.messages(QUIET * 2) == [(topic, payload) for topic, payload, _ in heads]
        assert dev_b.messages(QUIET) == []  # the topic policy still decides who receives
        watched = operator.messages(QUIET * 2)
        assert watched[0] == (TOPICS.job("dev-a"), b"head 0") and watched[-1] == (TOPICS.queue("dev-a"), b"list")
        assert len(watched) == 301
        later = running.device("dev-a")  # takes over dev-a's connection
        assert later.subscribe(TOPICS.job("dev-a")) == 1
        assert later.messages(QUIET) == [(TOPICS.job("dev-a"), b"head 299")]  # retained: the last one
        service.publish((TOPICS.job("dev-a"), b"", True))  # an empty retained message clears it
        assert later.messages(QUIET) == [(TOPICS.job("dev-a"), b"")]
        again = running.device("dev-a")
        assert again.subscribe(TOPICS.job("dev-a")) == 1
        assert again.messages(QUIET) == []
    finally:
        service.close()


def test_a_device_cannot_publish_heads_past_the_in_process_service(
        running: Running) -> None:
    dev_a, dev_b = running.device("dev-a"), running.device("dev-b")
    assert dev_b.subscribe(TOPICS.job("dev-b")) == 1
    service = Attached(running)
    try:
        dev_a.publish(TOPICS.job("dev-b"), b"forged", qos=1, retain=True)
        dev_a.publish(TOPICS.status("dev-b"), b"forged", qos=1)
        dev_a.publish(TOPICS.status("dev-a"), b"mine", qos=1)
        assert service.received(1) == [(TOPICS.status("dev-a"), b"mine", False)]
        assert dev_b.messages(QUIET) == []
        with pytest.raises(ValueError, match="not a topic name"):
            service.publish((TOPICS.all_devices(TOPICS.STATUS), b"x", False))
    finally:
        service.close()


def test_the_service_uses_the_in_process_link_to_its_embedded_broker(service: Service) -> None:
    assert "connected to the embedded broker in-process" in service.log()
    api = service.api
    password = api.device("linked-1")
    device = RawClient(service.mqtt_port)
    try:
        assert device.connect("linked-1", "linked-1", password) == 0
        assert device.subscribe(TOPICS.job("linked-1")) == 1
        device.publish(TOPICS.presence("linked-1"), b'{"Presence": "online"}', qos=1, retain=True)
        wait_until(lambda: api.ok("GET", "/v1/device/linked-1")["Online"], 10, "the device to show online")
        assert any(topic == TOPICS.job("linked-1") for topic, _ in device.messages(QUIET * 2))  # its first head
    finally:
        device.close()


def test_a_service_failing_to_take_a_message_costs_the_device_nothing(running: Running) -> None:
    def refuse(message: Incoming) -> None:
        raise RuntimeError(f"cannot take {message.topic}")

    async def start() -> ServiceLink:
        link = ServiceLink(running.broker.core, SUBSCRIPTIONS, on_message=refuse, on_connect=lambda: None)
        link.start()
        return link

    link = running.call(start())
    dev_a = running.device("dev-a")
    assert dev_a.subscribe(TOPICS.job("dev-a")) == 1
    dev_a.publish(TOPICS.status("dev-a"), b"result", qos=1)
    assert dev_a.alive()

    async def publish() -> None:
        link.publish(TOPICS.job("dev-a"), b"head", retain=True)

    running.call(publish())
    assert dev_a.messages(QUIET) == [(TOPICS.job("dev-a"), b"head")]
