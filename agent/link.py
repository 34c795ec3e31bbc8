"""The agent's one link to the MQTT broker (paho), and the events it hands the agent.

paho's network thread only turns callbacks into events (Connected, ConnectFailed, Disconnected,
Subscribed, JobMessage) on the agent's bounded queue (EventQueue); the agent's main thread reads
them and calls BrokerLink to subscribe and publish.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401 - here, not on paho's thread: see the note below
import logging
import socket
import sys
import threading
import time
from _queue import Empty, SimpleQueue
from typing import Any, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from . import protocol
from .protocol import Key, Presence, Topics
from .settings import Settings, agent_version

log = logging.getLogger("ota-agent")

# encodings.idna: socket.getaddrinfo encodes the broker's name with that codec. Imported first on
# paho's thread, the codec's tables would fill a malloc arena of that thread's own, ~0.25 MiB
# resident for good; imported at start with the rest, they fit the main heap (bench/profile_notes.md,
# agent-idle-rss).

_SHUTDOWN_PUBLISH_SECONDS = 3.0
_FULL_RETRY_SECONDS = 0.01  # how often EventQueue.put looks again at a full queue
# Seconds between connection attempts: paho doubles them from the first to the last, and starts
# again from the first after a successful connection.
RECONNECT_DELAYS = (1, 30)
# After the broker refused the device's credentials, retrying every 30 s only floods its log: the
# delay doubles from 1 s up to 5 minutes instead (credentials_retry_delay).
CREDENTIALS_RETRY_MAX_SECONDS = 300
# CONNACK reason codes (MQTT 5 values; paho maps MQTT 3.1.1's 4 and 5 to 134 and 135) that say
# the device's credentials were refused.
_BAD_CREDENTIALS = frozenset({134, 135, 140})  # bad user name or password, not authorised, bad auth method


# --- events from paho's thread --------------------------------------------------------------
# Records set once in __init__ and never changed. Plain classes with __slots__, not NamedTuples
# (each typing.NamedTuple costs ~1-2 million instructions to define at every start, a plain class
# ~0.1 million: bench/profile_notes.md, agent-exec-until-online); the main loop tells them apart
# with isinstance, never by ==.


class Connected:
    __slots__ = ("refused", "bad_credentials", "refusals", "retry_in")

    def __init__(self, refused: str | None, bad_credentials: bool = False, refusals: int = 0,
                 retry_in: float | None = None) -> None:
        self.refused = refused  # the broker's reason when it refused the connection
        self.bad_credentials = bad_credentials  # refused: the user name or password is wrong, or not authorised
        self.refusals = refusals  # credential refusals in a row, this one included
        self.retry_in = retry_in  # seconds until the next attempt, after a credential refusal


class ConnectFailed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason  # the network or TLS error, e.g. the broker's certificate did not verify


class Disconnected:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Subscribed:
    __slots__ = ("refused",)

    def __init__(self, refused: str | None) -> None:
        self.refused = refused


class JobMessage:
    __slots__ = ("topic", "payload")

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload


LinkEvent = Union[Connected, ConnectFailed, Disconnected, Subscribed, JobMessage]


class QueueFull(Exception):
    """EventQueue.put_nowait: the queue already holds its maximum of events."""


class QueueEmpty(Exception):
    """EventQueue.get, get_nowait: no event came."""


class EventQueue:
    """A bounded first-in, first-out queue of events between threads, for one reader (the main loop).

    The events lie in the C SimpleQueue (_queue, not the queue module: that loads queue.py and heapq,
    ~70 KiB resident and ~1% of the agent's start-up: bench/profile_notes.md, agent-idle-rss). Its
    get waits on one lock and its put wakes the reader only when it waits, where a Condition takes a
    new lock and a Python-level waiter list per wait (bench/profile_notes.md, group-latency-embedded).
    Writers check the bound under a lock of their own: the reader only takes events out, so a
    writer never sees the queue grow between its check and its put.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._events = SimpleQueue()
        self._writing = threading.Lock()

    def put(self, event: Any) -> None:
        """Add an event, waiting while the queue is full (never, unless the main loop is stuck)."""
        while True:
            with self._writing:
                if self._events.qsize() < self.maxsize:
                    self._events.put(event)
                    return
            time.sleep(_FULL_RETRY_SECONDS)

    def put_nowait(self, event: Any) -> None:
        """Add an event; raises QueueFull when the queue is full."""
        with self._writing:
            if self._events.qsize() >= self.maxsize:
                raise QueueFull
            self._events.put(event)

    def get(self, timeout: float) -> Any:
        """The oldest event, waiting up to `timeout` seconds for one; raises QueueEmpty if none came."""
        try:
            return self._events.get(timeout=timeout)
        except Empty:
            raise QueueEmpty from None

    def get_nowait(self) -> Any:
        """The oldest event; raises QueueEmpty when there is none."""
        try:
            return self._events.get_nowait()
        except Empty:
            raise QueueEmpty from None


# --- the broker -----------------------------------------------------------------------------


def _not_reconnect_noise(record: logging.LogRecord) -> bool:
    """Drops the error paho logs after every failed reconnect: the agent logs those itself."""
    return not str(record.msg).startswith("Client is not connected")


class BrokerLink:
    """The one place that talks to the MQTT broker. Callbacks only queue events."""

    def __init__(self, settings: Settings, events: EventQueue) -> None:
        """`events`: the agent's event queue, which the link puts only LinkEvents on."""
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.events = events
        self._refusals = 0  # credential refusals since the last successful connection (paho's thread)
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=s.device_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set_context(s.tls)
        paho_log = log.getChild("mqtt")  # paho's errors, e.g. the broker refusing our TLS certificate
        paho_log.addFilter(_not_reconnect_noise)
        client.enable_logger(paho_log)
        will = protocol.encode(presence_message(Presence.OFFLINE))
        client.will_set(self.topics.presence(s.device_id), will, qos=1, retain=True)
        client.reconnect_delay_set(*RECONNECT_DELAYS)
        client.on_connect = lambda c, u, flags, code, props: self._on_connect(code)
        # paho calls on_connect_fail while it handles the OSError (a TLS failure is one): keep its text.
        client.on_connect_fail = lambda c, u: self._offer(ConnectFailed(str(sys.exc_info()[1])))
        client.on_disconnect = lambda c, u, flags, code, props: self._offer(Disconnected(str(code)))
        client.on_subscribe = lambda c, u, mid, codes, props: self._offer(Subscribed(_refusal(codes)))
        client.on_message = lambda c, u, msg: self._offer(JobMessage(msg.topic, bytes(msg.payload)))
        client.on_socket_open = lambda c, u, sock: no_delay(sock)
        return client

    def _on_connect(self, code: Any) -> None:
        """paho's thread, on a CONNACK. A refusal of the credentials sets the delay of paho's next
        attempt (it is read right after this callback returns); a success restores the normal delays."""
        if not code.is_failure:
            self._refusals = 0
            self.client.reconnect_delay_set(*RECONNECT_DELAYS)
            self._offer(Connected(None))
        elif code.value in _BAD_CREDENTIALS:
            self._refusals += 1
            delay = credentials_retry_delay(self._refusals)
            self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)
            self._offer(Connected(str(code), bad_credentials=True, refusals=self._refusals, retry_in=delay))
        else:
            self._offer(Connected(str(code)))

    def _offer(self, event: LinkEvent) -> None:
        try:
            self.events.put_nowait(event)
        except QueueFull:
            log.warning("event queue full; dropped %s", type(event).__name__)

    def start(self) -> None:
        """Connect in the background; the first connection also retries while the broker is down."""
        self.client.connect_async(self.settings.broker_host, self.settings.broker_port, keepalive=60)
        self.client.loop_start()

    def subscribe_job(self) -> None:
        self.client.subscribe(self.job_topic, qos=1)

    @property
    def job_topic(self) -> str:
        return self.topics.job(self.settings.device_id)

    def publish_status(self, message: dict[str, Any]) -> None:
        self._publish(self.topics.status(self.settings.device_id), message, retain=False)

    def publish_presence(self, presence: Presence) -> mqtt.MQTTMessageInfo:
        return self._publish(self.topics.presence(self.settings.device_id), presence_message(presence), retain=True)

    def _publish(self, topic: str, message: dict[str, Any], retain: bool) -> mqtt.MQTTMessageInfo:
        """Publish QoS 1 without waiting; paho queues it while offline."""
        info = self.client.publish(topic, protocol.encode(message), qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("could not queue a message for %s: %s", topic, mqtt.error_string(info.rc))
        return info

    def stop(self) -> None:
        """Say offline (when connected), disconnect cleanly, stop paho's thread."""
        info = self.publish_presence(Presence.OFFLINE)
        try:
            info.wait_for_publish(timeout=_SHUTDOWN_PUBLISH_SECONDS)
        except (RuntimeError, ValueError) as e:
            log.info("could not publish presence offline (%s); the broker's last will says it", e)
        self.client.disconnect()
        self.client.loop_stop()


def no_delay(sock: Any) -> None:
    """Turn Nagle off (paho leaves it on): a status sent while the broker has not yet acknowledged
    the last one would otherwise wait for its delayed ACK, ~40 ms, on every job."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def credentials_retry_delay(refusals: int) -> int:
    """Seconds before the next attempt after `refusals` credential refusals in a row: 1, 2, 4, ... 300."""
    return min(2 ** min(refusals - 1, 16), CREDENTIALS_RETRY_MAX_SECONDS)


def _refusal(codes: list[Any]) -> str | None:
    refused = [str(code) for code in codes if code.is_failure]
    return ", ".join(refused) or None


def presence_message(presence: Presence) -> dict[str, Any]:
    return {
        Key.PRESENCE: presence.value,
        Key.TIME: protocol.format_time(protocol.utc_now()),
        Key.AGENT_VERSION: agent_version(),
    }
