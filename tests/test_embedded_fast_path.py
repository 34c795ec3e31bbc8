"""The devices' own packets on the embedded broker's fast path (embedded_broker/core.py, _FastPath).

A real embedded broker in this process, a device on a real TCP connection speaking raw MQTT, and
the service attached in-process, as in test_embedded_service_link. The fast path takes a device's
QoS 0 and 1 PUBLISH, its PUBACK and its PINGREQ before amqtt's reader loop would, and writes the
messages routed to a device at once. The tests switch amqtt's own handling of those packets off:
on plain amqtt, nothing would be routed, acknowledged or answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Iterator

import pytest
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from agent.protocol import OPERATOR_USERNAME
from tests.support.processes import wait_until
from tests.support.raw_mqtt import PUBACK, RawClient, publish_packet
from tests.test_broker_hardening import QUIET, TOKEN, TOPICS
from tests.test_embedded_service_link import Attached, Running


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    """A broker whose amqtt handles no PUBLISH, PUBACK or PINGREQ itself."""
    handled: list[str] = []

    def ignored(name: str) -> Any:
        async def ignore(self: BrokerProtocolHandler, packet: object) -> None:
            handled.append(name)

        return ignore

    for name in ("handle_publish", "handle_puback", "handle_pingreq"):
        monkeypatch.setattr(BrokerProtocolHandler, name, ignored(name))
    broker = Running()
    broker.to_amqtt = []  # type: ignore[attr-defined]  # what a test expects amqtt's own loop to handle
    try:
        yield broker
    finally:
        broker.close()
    assert handled == broker.to_amqtt  # type: ignore[attr-defined]


@pytest.fixture
def service(running: Running) -> Iterator[Attached]:
    """The service attached in-process (this module's: not conftest's service process)."""
    with contextlib.closing(Attached(running)) as attached:
        yield attached


def inflight(running: Running, client_id: str) -> int:
    async def count() -> int:
        session, _ = running.broker.core._broker._sessions[client_id]
        return len(session.inflight_out)

    return running.call(count())


def unacknowledged_head(running: Running, service: Attached, head: bytes, clean: bool) -> RawClient:
    """dev-a subscribed to its heads, sent one it has not read (so not acknowledged)."""
    device = RawClient(running.port)
    running.opened.append(device)
    assert device.connect("dev-a", "dev-a", "pw-a", clean=clean) == 0
    assert device.subscribe(TOPICS.job("dev-a")) == 1
    service.publish((TOPICS.job("dev-a"), head, True))
    time.sleep(QUIET / 2)
    assert inflight(running, "dev-a") == 1
    return device


def test_a_devices_publishes_are_routed_and_acknowledged_without_amqtts_reader_loop(
        running: Running, service: Attached) -> None:
    device = running.device("dev-a")
    device.publish(TOPICS.status("dev-a"), b"qos1", qos=1)  # its PUBACK read, or the test fails here
    device.publish(TOPICS.status("dev-a"), b"qos0")
    device.publish(TOPICS.presence("dev-a"), b"online", qos=1, retain=True)
    assert service.received(3) == [(TOPICS.status("dev-a"), b"qos1", False),
                                   (TOPICS.status("dev-a"), b"qos0", False),
                                   (TOPICS.presence("dev-a"), b"online", False)]
    assert device.alive()  # PINGREQ answered
    watcher = running.login("watcher", OPERATOR_USERNAME, TOKEN)
    assert watcher.subscribe(TOPICS.presence("+")) == 1
    assert watcher.messages(QUIET) == [(TOPICS.presence("dev-a"), b"online")]  # retained


def test_a_burst_of_publishes_arrives_in_order_each_acknowledged(
        running: Running, service: Attached) -> None:
    device = running.device("dev-a")
    payloads = [b"m%d" % n for n in range(200)]
    device.send(b"".join(publish_packet(TOPICS.status("dev-a"), p, qos=1, packet_id=n + 1)
                         for n, p in enumerate(payloads)))
    acks = [device.read(PUBACK).body for _ in payloads]
    assert acks == [(n + 1).to_bytes(2, "big") for n in range(200)]
    assert [payload for _, payload, _ in service.received(200)] == payloads


def test_the_topic_policy_holds_on_the_fast_path(
        running: Running, service: Attached) -> None:
    device = running.device("dev-a")
    device.publish(TOPICS.status("dev-b"), b"for another", qos=1)  # acknowledged, as amqtt does, not routed
    device.publish(TOPICS.job("dev-a"), b"a head of its own", qos=1)
    device.publish(TOPICS.presence("dev-b"), b"offline", qos=1, retain=True)
    device.publish(TOPICS.status("dev-a"), b"mine", qos=1)
    assert service.received(1) == [(TOPICS.status("dev-a"), b"mine", False)]
    watcher = running.login("watcher", OPERATOR_USERNAME, TOKEN)
    assert watcher.subscribe(TOPICS.device("+", "#")) == 1
    assert watcher.messages(QUIET) == []  # nothing was retained


def test_heads_are_written_to_the_device_at_once_and_released_by_its_puback(
        running: Running, service: Attached) -> None:
    device = running.device("dev-a")
    assert device.subscribe(TOPICS.job("dev-a")) == 1
    heads = [(TOPICS.job("dev-a"), b"head %d" % n, True) for n in range(5)]
    service.publish(*heads)
    assert device.messages(QUIET) == [(topic, payload) for topic, payload, _ in heads]  # each acknowledged
    wait_until(lambda: inflight(running, "dev-a") == 0, 2, "the PUBACKs to release the heads")


def test_an_unacknowledged_head_is_dropped_with_its_connection(
        running: Running, service: Attached) -> None:
    """As amqtt: a QoS 1 message the device never acknowledged is forgotten when its connection ends
    (amqtt#401; the retained head comes back at the next subscribe)."""
    device = unacknowledged_head(running, service, b"the head", clean=False)
    device.close()
    wait_until(lambda: inflight(running, "dev-a") == 0, 5, "the connection's end to drop the head")
    again = running.login("dev-a", "dev-a", "pw-a", clean=False)
    assert again.subscribe(TOPICS.job("dev-a")) == 1
    assert again.messages(QUIET) == [(TOPICS.job("dev-a"), b"the head")]


def test_a_head_never_acknowledged_is_given_up_after_five_seconds_the_device_kept(
        running: Running, service: Attached) -> None:
    """As amqtt's QoS 1 flow: no PUBACK within 5 s and the message leaves the session (logged); the
    connection stays, and the next head still reaches the device."""
    device = unacknowledged_head(running, service, b"first", clean=True)
    wait_until(lambda: inflight(running, "dev-a") == 0, 8, "the head to be given up")
    service.publish((TOPICS.job("dev-a"), b"second", True))
    running.to_amqtt = ["handle_puback"]  # type: ignore[attr-defined]  # the late one for "first": unknown
    assert device.messages(QUIET) == [(TOPICS.job("dev-a"), b"first"), (TOPICS.job("dev-a"), b"second")]
    wait_until(lambda: inflight(running, "dev-a") == 0, 2, "the second head's PUBACK to release it")


def test_the_framer_cuts_whole_packets_from_chunks_and_checks_sizes_from_the_header() -> None:
    from ota_bridge.embedded_broker.wire import PacketFramer, PacketTooLarge, WireError  # noqa: PLC0415

    async def frames(chunks: list[bytes], limit: int = 1 << 20) -> list[bytes | None]:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        framer, got = PacketFramer(reader, limit), []
        while (packet := await framer.next()) is not None:
            got.append(packet)
        return got

    packets = [publish_packet("t/a", b"x" * size, qos=1, packet_id=1) for size in (0, 1, 200, 70_000)]
    stream = b"".join(packets) + b"\xc0\x00"
    assert asyncio.run(frames([stream])) == [*packets, b"\xc0\x00"]
    assert asyncio.run(frames([stream[i:i + 3] for i in range(0, len(stream), 3)])) == [*packets, b"\xc0\x00"]
    assert asyncio.run(frames([b"\xc0", b"\x00"])) == [b"\xc0\x00"]
    with pytest.raises(PacketTooLarge):
        asyncio.run(frames([packets[3][:5]], limit=65_536))  # from its header alone
    with pytest.raises(WireError):
        asyncio.run(frames([b"\x30\xff\xff\xff\xff\x01"]))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(frames([packets[2][:-1]]))
