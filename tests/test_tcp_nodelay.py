"""Both MQTT links turn Nagle off on their socket (paho leaves it on), and the shipped Mosquitto does too.

With Nagle on, each small packet sent while the last is unacknowledged waits for the peer's
delayed ACK (~40 ms): a device draining its queue ran about 11 jobs a second. No timing here:
the tests read the socket option after a real connection to a real broker.
"""

from __future__ import annotations

import asyncio
import queue
import socket
from pathlib import Path

import pytest

from agent.link import BrokerLink as AgentLink
from agent.link import Connected
from agent.settings import load_settings
from ota_bridge.mqtt_link import BrokerLink as ServiceLink
from tests.support.mosquitto import broker_config, start_mosquitto

KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="  # RFC 8032 TEST 1's public key
pytestmark = pytest.mark.mosquitto


def no_delay(sock: object) -> int:
    assert sock is not None, "not connected"
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # type: ignore[attr-defined]


def test_the_agent_link_sets_tcp_nodelay(tmp_path: Path) -> None:
    with start_mosquitto(tmp_path) as broker:
        settings = load_settings(["--broker", broker.url, "--device-id", "dev1", "--password", "pw",
                                  "--server-key", KEY, "--state-dir", str(tmp_path / "state")], {})
        events: queue.Queue[object] = queue.Queue()
        link = AgentLink(settings, events)
        link.start()
        try:
            connected = events.get(timeout=20)
            assert isinstance(connected, Connected) and connected.refused is None, connected
            assert no_delay(link.client.socket()) != 0
        finally:
            link.stop()


def test_the_service_link_sets_tcp_nodelay(tmp_path: Path) -> None:
    async def connect_and_read(url_port: int) -> int:
        link = ServiceLink("127.0.0.1", url_port, None, None, ["nodelay/#"], lambda _m: None, lambda: None)
        link.start()
        try:
            await asyncio.wait_for(link.connected.wait(), 20)
            return no_delay(link._client.socket())
        finally:
            link.stop()

    with start_mosquitto(tmp_path) as broker:
        assert asyncio.run(connect_and_read(broker.port)) != 0


def test_the_shipped_mosquitto_config_sets_tcp_nodelay() -> None:
    assert "set_tcp_nodelay true" in broker_config(1883).splitlines()
