"""The service's one connection to an MQTT broker over TCP (Mosquitto, or any broker by --mqtt-url), over paho-mqtt.

paho is driven by the asyncio event loop, with no thread of its own (paho's external-loop API):
the socket is watched with loop.add_reader (paho's loop_read), and with loop.add_writer while paho
has packets queued (loop_write); a timer calls loop_misc for the keep-alive. So a device's message
is parsed and handed to the dispatcher in the same turn of the loop that read it, and a publish
or acknowledgement from the loop is written in the loop's next turn, both without a hand-over
between threads (each took 2-3.5 ms of scheduling on a loaded machine: bench/profile_notes.md).
Only a (re)connect, whose TCP connect and TLS handshake block, runs on a worker thread.

Incoming QoS 1 messages are acknowledged by hand, after the dispatcher has stored what they say,
so a message the service had not stored when it died is delivered again by the broker (on brokers
that keep the service's session). In cluster mode each instance has its own client id and a clean
session (docs/scale.md says why).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import SERVICE_CLIENT_ID

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0  # how long a shutdown waits for the DISCONNECT to be written
# paho numbers QoS 1 publishes 1..65535 and silently overwrites an unacknowledged one when the
# numbers wrap: past 65,535 outstanding, messages are lost. Publishers wait below this bound.
MAX_OUTSTANDING = 20_000
ROOM_POLL_SECONDS = 0.05
KEEPALIVE_SECONDS = 30
MISC_SECONDS = 1.0  # how often paho's loop_misc runs (keep-alive pings, a broker gone silent)
RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS = 1.0, 10.0  # the wait before a reconnect, doubled per failure


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


def _not_reconnect_noise(record: logging.LogRecord) -> bool:
    """Drops the error paho logs after every failed reconnect: _keep_connected logs those."""
    return not str(record.msg).startswith("Client is not connected")


def _no_delay(sock: Any) -> None:
    """paho leaves Nagle on: each small packet sent after another unanswered one would wait for the
    peer's delayed ACK (~40 ms), twice per exchange. Every exchange here is small and waits for an answer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
        self._loop_thread: int | None = None
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()  # the socket closed: _keep_connected reconnects
        self._keeper: asyncio.Task[None] | None = None
        self._connector = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ota-mqtt-connect")
        self._connecting: concurrent.futures.Future[Any] | None = None
        self._accepted = False  # the broker accepted the connection last made (its CONNACK)
        self._misc: asyncio.TimerHandle | None = None
        self._watched: Any = None  # the socket the loop watches for reading
        self._writing: Any = None  # the socket the loop watches for writing, while paho has packets queued
        self._stopping = False
        self.write_passes = 0  # loop_write calls: each writes every packet queued since the last
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        if username:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls)  # the context checks the certificate and the host name
        paho_log = log.getChild("paho")  # its errors, e.g. the broker refusing the service's TLS certificate
        paho_log.addFilter(_not_reconnect_noise)
        client.enable_logger(paho_log)
        # No window of paho's own: with one, every PUBACK scans paho's outstanding messages from the first
        # (for queued ones to send, _update_inflight), ~1,000 of them while a fan-out's heads are out.
        # room() bounds what is outstanding (MAX_OUTSTANDING), and publishes go out in the order made.
        client.max_inflight_messages_set(0)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        self._client = client

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # connect_async only records where to; the first connect is _keep_connected's, as every reconnect.
        self._client.connect_async(self.host, self.port, keepalive=KEEPALIVE_SECONDS)
        self._keeper = self._loop.create_task(self._keep_connected(), name="ota-mqtt-link")
        self._misc = self._loop.call_later(MISC_SECONDS, self._tick)

    def stop(self) -> None:
        """Disconnect now: the DISCONNECT is written if the socket takes it at once, then the socket closes."""
        self._stopping = True
        if self._keeper is not None:
            self._keeper.cancel()
        if self._misc is not None:
            self._misc.cancel()
        if self._connecting is not None and not self._connecting.done():  # close what it opens, when it does
            self._connecting.add_done_callback(lambda _f: self._client._sock_close())
        if self._client.socket() is not None:
            self._client.disconnect()
            self._client.loop_write()  # writes the DISCONNECT, after which paho closes the socket
        self._client._sock_close()  # if the DISCONNECT could not be written at once
        self._connector.shutdown(wait=False)
        self.connected.clear()

    async def aclose(self, timeout: float = STOP_SECONDS) -> None:
        """Disconnect, letting the event loop write the DISCONNECT for up to `timeout` (packets queued
        before it go first), then close the socket whatever is left."""
        self._stopping = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._client.socket() is not None and self.connected.is_set():
            self._client.disconnect()  # queued: the loop's writer sends it, and paho then closes the socket
            try:
                await asyncio.wait_for(self._lost.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("the MQTT link did not stop within %.0f s; closing its socket", timeout)
        self.stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        """Queue a publish; the loop writes it in its next turn, or (QoS 1 only) after the next reconnect.

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

    # --- connecting -----------------------------------------------------------------------

    async def _keep_connected(self) -> None:
        """Connect; after each loss wait (1 s, doubled per failed attempt up to 10 s) and connect again.
        The wait starts again at 1 s once the broker accepted a connection (paho's own rule)."""
        assert self._loop is not None
        delay = 0.0  # the first connect at once
        while not self._stopping:
            if delay:
                await asyncio.sleep(delay)
            self._lost.clear()
            self._accepted = False
            try:
                # The TCP connect and the TLS handshake block: a thread of the link's own. The socket
                # is watched once it returns (_watch; paho's socket callbacks on that thread leave it).
                self._connecting = self._connector.submit(self._client.reconnect)
                await asyncio.wrap_future(self._connecting)
            except Exception as error:  # OSError, ssl.SSLError, a name that does not resolve
                log.warning("cannot connect to the broker %s:%s (%s); retrying", self.host, self.port, error)
                delay = min(max(delay * 2, RECONNECT_MIN_SECONDS), RECONNECT_MAX_SECONDS)
                continue
            self._watch()
            await self._lost.wait()
            # As paho's own loop: 1 s after a connection the broker accepted, else twice the last wait.
            delay = RECONNECT_MIN_SECONDS if self._accepted else min(max(delay * 2, RECONNECT_MIN_SECONDS),
                                                                     RECONNECT_MAX_SECONDS)

    def _watch(self) -> None:
        """On the loop: watch the socket paho just opened, and write what it queued meanwhile (its CONNECT)."""
        assert self._loop is not None
        sock = self._client.socket()
        if sock is None or self._stopping:
            return
        if self._watched is not sock:
            self._watched = sock
            self._loop.add_reader(sock, self._read)
        if self._client.want_write():
            self._add_writer(sock)

    def _tick(self) -> None:
        """paho's keep-alive: a PINGREQ when due, the socket closed when the broker has gone silent."""
        assert self._loop is not None
        if self._stopping:
            return
        if self._client.socket() is not None:
            self._client.loop_misc()
        self._misc = self._loop.call_later(MISC_SECONDS, self._tick)

    # --- the socket, on the loop --------------------------------------------------------

    def _read(self) -> None:
        client = self._client
        client.loop_read()
        sock = client.socket()
        if isinstance(sock, ssl.SSLSocket) and sock.pending() and self._loop is not None:
            self._loop.call_soon(self._read)  # decrypted bytes the selector cannot see

    def _write(self) -> None:
        self.write_passes += 1
        self._client.loop_write()

    def _add_writer(self, sock: Any) -> None:
        assert self._loop is not None
        if self._writing is not sock:
            self._writing = sock
            self._loop.add_writer(sock, self._write)

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    # paho's socket callbacks: on the loop, except while the worker thread connects (see _watch).

    def _socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        _no_delay(sock)

    def _socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        """Just before paho closes the socket: no longer watched, and _keep_connected reconnects."""
        if self._loop is not None and not self._loop.is_closed() and self._on_loop():
            if self._watched is sock:
                self._loop.remove_reader(sock)
            if self._writing is sock:
                self._loop.remove_writer(sock)
        if self._watched is sock:
            self._watched = None
        if self._writing is sock:
            self._writing = None
        self._lost.set()

    def _register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if self._on_loop() and sock is self._watched:
            self._add_writer(sock)

    def _unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if self._writing is sock and self._loop is not None and self._on_loop():
            self._writing = None
            self._loop.remove_writer(sock)

    # paho's other callbacks, on the loop (within loop_read, loop_write or loop_misc).

    def _paho_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%s refused the service's connection: %s", self.host, self.port, reason)
            return
        self._accepted = True
        client.subscribe([(topic, 1) for topic in self._subscriptions])
        log.info("connected to the broker at %s:%s", self.host, self.port)
        self.connected.set()
        self._on_connect()

    def _paho_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        if reason.is_failure and not self._stopping:
            log.warning("lost the broker %s:%s (%s); reconnecting", self.host, self.port, reason)

    def _paho_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message(Incoming(msg.topic, msg.payload, bool(msg.retain), msg.mid, msg.qos))
