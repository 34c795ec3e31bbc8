"""The service's MQTT link bounds its unacknowledged publishes, runs paho on the event loop, reconnects.

paho numbers QoS 1 publishes 1..65535 and, when the numbers wrap, silently overwrites a message
the broker has not acknowledged yet: a service restart that republished 100,000 heads lost 32,767
of them (bench/paho_mid_wrap.py). The publisher awaits BrokerLink.room() before each batch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest

from ota_bridge import dispatch
from ota_bridge.mqtt_link import MAX_OUTSTANDING, Incoming
from ota_bridge.mqtt_link import BrokerLink as ServiceLink
from tests.support.mosquitto import Mosquitto, start_mosquitto

pytestmark = pytest.mark.mosquitto
LIMIT = 50


def test_room_waits_while_the_broker_has_not_acknowledged_enough(tmp_path: Path) -> None:
    async def scenario(port: int, pid: int) -> None:
        link = ServiceLink("127.0.0.1", port, None, None, ["room/#"], lambda _m: None, lambda: None,
                           max_outstanding=LIMIT)
        link.start()
        try:
            await asyncio.wait_for(link.connected.wait(), 20)
            os.kill(pid, signal.SIGSTOP)  # the broker acknowledges nothing meanwhile
            try:
                for n in range(LIMIT + 10):
                    link.publish(f"room/{n}", b"x", retain=False)
                assert link.outstanding >= LIMIT
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(link.room(), 1.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(link.room(), 20)  # the acknowledgements make room again
            assert link.outstanding < LIMIT
        finally:
            await link.aclose()

    with start_mosquitto(tmp_path) as broker:
        assert broker.process is not None
        asyncio.run(scenario(broker.port, broker.process.pid))


def test_the_bound_leaves_room_for_a_publisher_batch_below_pahos_message_ids() -> None:
    assert MAX_OUTSTANDING + 2 * dispatch.BATCH < 65_535  # a batch publishes a head and a queue per device


def test_a_burst_of_publishes_is_written_in_a_few_passes_and_every_message_arrives(tmp_path: Path) -> None:
    """The event loop writes what paho queued when the socket is writable: a burst of publishes made
    in one turn of the loop goes out in one pass or a few, not one wake-up each. Nothing may be
    left unsent."""
    count = 500

    async def scenario(port: int) -> None:
        got: list[str] = []
        done = asyncio.Event()

        def on_message(message: Incoming) -> None:
            got.append(message.topic)
            link.ack(message)
            if len(got) == 2 * count:
                done.set()

        link = ServiceLink("127.0.0.1", port, None, None, ["burst/#"], on_message, lambda: None)
        link.start()
        try:
            await asyncio.wait_for(link.connected.wait(), 20)
            await asyncio.sleep(0.5)  # the subscription is in place
            before = link.write_passes
            for n in range(count):  # one burst, as the publisher sends a batch of heads and lists
                link.publish(f"burst/{n}", b"x", retain=False)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            burst_passes = link.write_passes - before
            for n in range(count):  # one at a time, each after the loop has had a turn
                link.publish(f"burst/{count + n}", b"x", retain=False)
                await asyncio.sleep(0)
            await asyncio.wait_for(done.wait(), 30)
            assert got == [f"burst/{n}" for n in range(2 * count)]
            assert 1 <= burst_passes < count / 2
        finally:
            await link.aclose()

    with start_mosquitto(tmp_path) as broker:
        asyncio.run(scenario(broker.port))


def _paho_threads() -> set[threading.Thread]:
    """paho's network threads alive now (another test's clients may have left theirs behind)."""
    return {t for t in threading.enumerate() if t.name.startswith("paho")}


def test_the_link_runs_on_the_event_loop_and_reconnects_after_the_broker_restarts(tmp_path: Path) -> None:
    """No network thread of paho's: the event loop reads the socket and calls back on its own thread,
    and after the broker goes away and comes back the link connects and subscribes again."""
    async def scenario(broker: Mosquitto) -> None:
        loop_thread = threading.get_ident()
        got: list[tuple[str, int]] = []
        connects: list[int] = []
        arrived = asyncio.Event()

        def on_message(message: Incoming) -> None:
            got.append((message.topic, threading.get_ident()))
            link.ack(message)
            arrived.set()

        async def round_trip(topic: str) -> None:
            arrived.clear()
            link.publish(topic, b"x", retain=False)
            await asyncio.wait_for(arrived.wait(), 20)
            assert got[-1] == (topic, loop_thread)

        link = ServiceLink("127.0.0.1", broker.port, None, None, ["restart/#"], on_message,
                           lambda: connects.append(threading.get_ident()))
        others = _paho_threads()
        link.start()
        try:
            await asyncio.wait_for(link.connected.wait(), 20)
            assert _paho_threads() - others == set()
            await round_trip("restart/before")
            await asyncio.to_thread(broker.restart)
            await asyncio.wait_for(_until(lambda: len(connects) == 2 and link.connected.is_set()), 30)
            assert connects == [loop_thread, loop_thread]
            assert _paho_threads() - others == set()
            await round_trip("restart/after")  # subscribed again
        finally:
            await link.aclose()
        assert link._client.socket() is None

    with start_mosquitto(tmp_path) as broker:
        asyncio.run(scenario(broker))


def test_a_message_is_delivered_again_until_it_is_acknowledged(tmp_path: Path) -> None:
    """Manual acknowledgement through the event-loop-driven client: a message the dispatcher has not
    acknowledged (not stored yet) comes again after a lost connection; one acknowledged does not."""
    async def scenario(port: int) -> None:
        got: list[tuple[str, bytes]] = []
        pending: list[Incoming] = []
        arrived = asyncio.Event()

        def on_message(message: Incoming) -> None:
            got.append((message.topic, message.payload))
            pending.append(message)
            arrived.set()

        async def drop_connection() -> None:
            connected_before = connects[0]
            sock = link._client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)  # as a network failure: the loop reads end-of-file
            await asyncio.wait_for(_until(lambda: connects[0] > connected_before and link.connected.is_set()), 30)

        connects = [0]

        def on_connect() -> None:
            connects[0] += 1

        link = ServiceLink("127.0.0.1", port, None, None, ["acks/#"], on_message, on_connect)
        link.start()
        try:
            await asyncio.wait_for(link.connected.wait(), 20)
            await asyncio.sleep(0.5)  # the subscription is in place
            link.publish("acks/one", b"1", retain=False)
            await asyncio.wait_for(arrived.wait(), 20)
            await asyncio.wait_for(_until(lambda: link.outstanding == 0), 20)  # else paho sends it again
            assert got == [("acks/one", b"1")]
            arrived.clear()
            await drop_connection()  # not acknowledged: the broker keeps it for the session
            await asyncio.wait_for(arrived.wait(), 20)
            assert got == [("acks/one", b"1"), ("acks/one", b"1")]
            for message in pending:
                link.ack(message)
            await asyncio.sleep(0.5)  # the PUBACK written
            await drop_connection()
            await asyncio.sleep(1.0)
            assert len(got) == 2
        finally:
            await link.aclose()

    with start_mosquitto(tmp_path) as broker:
        asyncio.run(scenario(broker.port))


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.05)
