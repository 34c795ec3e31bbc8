"""The service's MQTT link bounds its unacknowledged publishes, and wakes paho's thread sparingly.

paho numbers QoS 1 publishes 1..65535 and, when the numbers wrap, silently overwrites a message
the broker has not acknowledged yet: a service restart that republished 100,000 heads lost 32,767
of them (bench/paho_mid_wrap.py). The publisher awaits BrokerLink.room() before each batch.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Callable

import pytest

from ota_bridge import dispatch
from ota_bridge.mqtt_link import MAX_OUTSTANDING, Incoming, _Wakeup
from ota_bridge.mqtt_link import BrokerLink as ServiceLink
from tests.support.mosquitto import start_mosquitto

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


def test_a_burst_of_publishes_wakes_pahos_thread_a_few_times_and_every_message_arrives(tmp_path: Path) -> None:
    """Each publish from the event loop used to write a byte to paho's wake-up pair (a system call
    each); one unread byte wakes it as well as many. Nothing may be left unsent for want of a byte."""
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
            assert link.wakeup is not None
            before = link.wakeup.sent
            for n in range(count):  # one burst, as the publisher sends a batch of heads and lists
                link.publish(f"burst/{n}", b"x", retain=False)
            burst_wakeups = link.wakeup.sent - before
            for n in range(count):  # one at a time, each after paho's thread has had a turn
                link.publish(f"burst/{count + n}", b"x", retain=False)
                await asyncio.sleep(0)
            await asyncio.wait_for(done.wait(), 30)
            assert got == [f"burst/{n}" for n in range(2 * count)]
            assert burst_wakeups < count / 2
        finally:
            await link.aclose()

    with start_mosquitto(tmp_path) as broker:
        asyncio.run(scenario(broker.port))


class _Pipe:
    """Both ends of a wake-up pair, in memory; `during_read` runs inside the reader's recv, as
    another thread could."""

    def __init__(self) -> None:
        self.unread = 0
        self.during_read: list[Callable[[], None]] = []

    def send(self, data: bytes) -> int:
        self.unread += len(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        while self.during_read:
            self.during_read.pop()()
        taken, self.unread = self.unread, 0
        return b"0" * taken


def test_a_wakeup_is_never_due_with_nothing_left_to_read() -> None:
    """`due` means a byte waits unread: else paho sleeps in select() with packets queued."""
    pipe = _Pipe()
    wakeup = _Wakeup(pipe, pipe)  # type: ignore[arg-type]
    wakeup.writer.send(b"0")
    wakeup.writer.send(b"0")
    assert pipe.unread == 1 and wakeup.due  # one byte for both
    pipe.during_read.append(lambda: wakeup.writer.send(b"0"))  # a publish while paho reads the pair
    wakeup.reader.recv(10000)
    assert not wakeup.due and pipe.unread == 0  # the publish was queued before paho's write pass
    wakeup.writer.send(b"0")
    assert wakeup.due and pipe.unread == 1
    wakeup.reader.recv(10000)
    pipe.during_read.append(lambda: wakeup.writer.send(b"0"))
    wakeup.writer.send(b"0")
    wakeup.reader.recv(10000)
    assert wakeup.due == (pipe.unread > 0)
