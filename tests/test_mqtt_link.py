"""The service's MQTT link bounds its unacknowledged publishes.

paho numbers QoS 1 publishes 1..65535 and, when the numbers wrap, silently overwrites a message
the broker has not acknowledged yet: a service restart that republished 100,000 heads lost 32,767
of them (bench/paho_mid_wrap.py). The publisher awaits BrokerLink.room() before each batch.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from ota_bridge import dispatch
from ota_bridge.mqtt_link import MAX_OUTSTANDING
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
