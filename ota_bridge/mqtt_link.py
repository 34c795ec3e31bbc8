"""The service's one connection to the MQTT broker (embedded or external), over paho-mqtt.

paho runs its network loop on its own thread; its callbacks only hand events to the asyncio
loop with call_soon_threadsafe. Incoming QoS 1 messages are acknowledged by hand, after the
dispatcher has stored what they say, so a message the service had not stored when it died is
delivered again by the broker (on brokers that keep the service's session). In cluster mode
each instance has its own client id and a clean session (docs/scale.md says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import SERVICE_CLIENT_ID

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0  # how long a shutdown waits for paho's thread to end
# paho numbers QoS 1 publishes 1..65535 and silently overwrites an unacknowledged one when the
# numbers wrap: past 65,535 outstanding, messages are lost. Publishers wait below this bound.
MAX_OUTSTANDING = 20_000
ROOM_POLL_SECONDS = 0.05


def _not_reconnect_noise(record: logging.LogRecord) -> bool:
    """Drops the error paho logs after every failed reconnect: _paho_connect_fail logs those."""
    return not str(record.msg).startswith("Client is not connected")


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """paho leaves Nagle on: each small packet sent after another unanswered one would wait for the
    peer's delayed ACK (~40 ms), twice per exchange. Every exchange here is small and waits for an answer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Wakeup:
    """paho's wake-up socket pair, sending its byte only while none waits unread.

    Every publish and acknowledgement from the event loop writes a byte to the pair to break paho's
    thread out of select(): a system call per message (~0.15 ms here on a busy machine), dozens per
    group job, on the event loop that also runs the API and the embedded broker. One unread byte
    wakes paho as well as many: its thread reads the pair, then writes every queued packet in the
    same pass. `due` is cleared just after that read: a packet queued while `due` is set was queued
    before the clear, so that pass writes it; once cleared, the next packet sends a byte again. (Cleared
    before the read, a byte sent in between would be read with the old one and leave `due` set with
    nothing to read: paho would then sleep in select() for up to a second with packets queued.)
    """

    def __init__(self, reader: socket.socket, writer: socket.socket) -> None:
        self.due = False
        self.sent = 0  # bytes written: wake-ups
        self.reader, self.writer = _WakeupReader(reader, self), _WakeupWriter(writer, self)


class _WakeupWriter:
    def __init__(self, sock: socket.socket, wakeup: _Wakeup) -> None:
        self._sock, self._wakeup = sock, wakeup

    def send(self, data: bytes) -> int:
        if self._wakeup.due:
            return len(data)
        self._wakeup.due = True
        self._wakeup.sent += 1
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _WakeupReader:
    def __init__(self, sock: socket.socket, wakeup: _Wakeup) -> None:
        self._sock, self._wakeup = sock, wakeup

    def recv(self, size: int) -> bytes:
        try:
            return self._sock.recv(size)
        finally:
            self._wakeup.due = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _wake_once(client: mqtt.Client) -> _Wakeup | None:
    """Wrap the wake-up pair paho's loop_start made (paho 2: `_sockpairR`, `_sockpairW`)."""
    reader, writer = client._sockpairR, client._sockpairW
    if not isinstance(reader, socket.socket) or not isinstance(writer, socket.socket):
        return None
    wakeup = _Wakeup(reader, writer)
    client._sockpairR, client._sockpairW = wakeup.reader, wakeup.writer  # type: ignore[assignment]
    return wakeup


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retained: bool
    mid: int
    qos: int


class Link(Protocol):
    """What the dispatcher and the service use of a link to the broker: BrokerLink here (over TCP),
    or embedded_broker.service_link.ServiceLink (the embedded broker, in-process)."""

    host: str
    port: int
    connected: asyncio.Event

    def start(self) -> None: ...

    async def aclose(self, timeout: float = ...) -> None: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None: ...

    @property
    def outstanding(self) -> int: ...

    async def room(self, limit: int | None = None) -> None: ...

    def ack(self, message: Incoming) -> None: ...


class BrokerLink:
    """Connects, reconnects with backoff, publishes, and passes messages and connects to the loop."""

    def __init__(self, host: str, port: int, username: str | None, password: str | None,
                 subscriptions: list[str], on_message: Callable[[Incoming], None],
                 on_connect: Callable[[], None], tls: ssl.SSLContext | None = None,
                 client_id: str = SERVICE_CLIENT_ID, clean_session: bool = False,
                 max_outstanding: int = MAX_OUTSTANDING) -> None:
        self.host, self.port = host, port
        self.max_outstanding = max_outstanding
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connect = on_connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = asyncio.Event()
        self.wakeup: _Wakeup | None = None  # paho's wake-up pair, once started
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        if username:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls)  # the context checks the certificate and the host name
        paho_log = log.getChild("paho")  # its errors, e.g. the broker refusing the service's TLS certificate
        paho_log.addFilter(_not_reconnect_noise)
        client.enable_logger(paho_log)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_inflight_messages_set(1000)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_connect_fail = self._paho_connect_fail
        client.on_message = self._paho_message
        client.on_socket_open = _no_delay
        self._client = client

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self.wakeup = _wake_once(self._client)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets(sockpair_only=True)  # paho 2 leaves its wake-up socket pair open

    async def aclose(self, timeout: float = STOP_SECONDS) -> None:
        """stop() on a thread of its own, so the event loop (and the embedded broker on it) keeps
        running while paho finishes: paho's thread does not end while a packet or an unacknowledged
        QoS 1 message is outstanding, which a broker blocked behind a join would never answer."""
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()

        def stop() -> None:
            try:
                self.stop()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed first
                    loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

        threading.Thread(target=stop, name="ota-mqtt-stop", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(stopped), timeout)
        except asyncio.TimeoutError:
            log.warning("the MQTT link did not stop within %.0f s; leaving it behind", timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        """Queue a publish; paho sends it now, or (QoS 1 only) after the next reconnect.

        A caller publishing many messages awaits room() between batches."""
        self._client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def outstanding(self) -> int:
        """QoS 1 publishes paho holds until the broker acknowledges them."""
        return len(self._client._out_messages)  # paho's own record: nothing of ours to drift from it

    async def room(self, limit: int | None = None) -> None:
        """Wait until fewer than limit (MAX_OUTSTANDING) publishes are unacknowledged."""
        limit = self.max_outstanding if limit is None else limit
        while self.outstanding >= limit:
            await asyncio.sleep(ROOM_POLL_SECONDS)

    def ack(self, message: Incoming) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # paho's thread from here on: hand over to the event loop, nothing else.

    def _paho_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%s refused the service's connection: %s", self.host, self.port, reason)
            return
        client.subscribe([(topic, 1) for topic in self._subscriptions])
        self._call(self._connected)

    def _paho_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        error = sys.exc_info()[1]  # paho calls this while handling the OSError (a TLS failure is one)
        log.warning("cannot connect to the broker %s:%s (%s); retrying", self.host, self.port, error)

    def _paho_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._call(self.connected.clear)
        if reason.is_failure:
            log.warning("lost the broker %s:%s (%s); reconnecting", self.host, self.port, reason)

    def _paho_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._call(self._on_message, Incoming(msg.topic, msg.payload, bool(msg.retain), msg.mid, msg.qos))

    def _connected(self) -> None:
        log.info("connected to the broker at %s:%s", self.host, self.port)
        self.connected.set()
        self._on_connect()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)
