"""The service's link to its own embedded broker, inside the process: BrokerLink's interface
(mqtt_link.py) without paho, a socket or MQTT packets.

Over TCP each head was encoded by paho on its thread, written to a loopback socket, read back
packet by packet by amqtt in the same process and under the same GIL, and each device message
went the same way in reverse, every one with its PUBACK. Here a publish is routed by the broker
when it is made (its topic policy, its retained messages, QoS 1 to the devices as before), and a
device message is handed to the dispatcher as the broker routes it.

What the dispatcher relies on is kept:
- Incoming messages arrive in the order the broker routes them, as `Incoming` with QoS 1; the
  dispatcher acknowledges each after its batch is stored. The device had its PUBACK from the broker
  when the broker received it, as over TCP. What a service that dies before storing would have had
  redelivered by a broker keeping its session, this broker (dying with it) never could: the agent
  resends its journaled result when the restarted service republishes its head (docs/guarantees.md).
  `ack` has nothing left to release.
- `connected` is set at start (the dispatcher then republishes every head from the database), and
  the retained messages the filters match are handed over right after, as a broker does at a
  subscribe; cleared at stop. Publishes while not connected are dropped: the next connect
  republishes everything, as paho's reconnect does.
- `outstanding` is 0 and `room()` never waits: a publish is routed before `publish` returns.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..mqtt_link import MAX_OUTSTANDING, Incoming
from .core import AmqttCore, LocalClient
from .policy import SERVICE_USERNAME

log = logging.getLogger(__name__)


class ServiceLink:
    """The service as a client inside its embedded broker (core.LocalClient), with BrokerLink's interface."""

    def __init__(self, core: AmqttCore, subscriptions: list[str], on_message: Callable[[Incoming], None],
                 on_connect: Callable[[], None], max_outstanding: int = MAX_OUTSTANDING) -> None:
        self.host, self.port = "in-process", 0
        self.max_outstanding = max_outstanding
        self.connected = asyncio.Event()
        self._core = core
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connect = on_connect
        self._client: LocalClient | None = None

    def start(self) -> None:
        self._client = self._core.attach(SERVICE_USERNAME, self._subscriptions, self._receive)
        log.info("connected to the embedded broker in-process")
        self.connected.set()
        self._on_connect()
        asyncio.get_running_loop().call_soon(self._replay_retained, self._client)

    def stop(self) -> None:
        self.connected.clear()
        if self._client is not None:
            self._core.detach(self._client)
            self._client = None

    async def aclose(self, timeout: float = 0) -> None:
        self.stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        """Route now: retained if asked, delivered to the subscribers the topic policy allows."""
        if self._client is not None:
            self._client.publish(topic, payload, retain, qos)

    @property
    def outstanding(self) -> int:
        return 0

    async def room(self, limit: int | None = None) -> None:
        """Nothing waits for an acknowledgement: there is always room."""

    def ack(self, message: Incoming) -> None:
        """Nothing to release: see the module's docstring."""

    def _receive(self, topic: str, payload: bytes, retained: bool) -> None:
        self._on_message(Incoming(topic, payload, retained, 0, 1))

    def _replay_retained(self, client: LocalClient) -> None:
        """After on_connect's first step, as a subscribe's retained messages come after the CONNACK."""
        if client is self._client:
            for topic, payload in client.retained():
                client.hand_over(topic, payload, True)
