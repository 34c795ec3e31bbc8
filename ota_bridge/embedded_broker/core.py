"""amqtt 0.12, reached into here and nowhere else: the broker behind the front.

amqtt listens on no socket of its own: its listeners are "external", so the only way in is
`AmqttCore.serve`, which the front calls for a connection whose CONNECT it has already checked.
What amqtt does with a CONNECT before its own login check (deleting a clean session's
namesake, merging a will and credentials into an existing session, taking over a connected
one, keeping a session for every refused client) therefore only ever happens to a client
that passed the front.

The service itself is a `LocalClient` (`AmqttCore.attach`): a client inside this process, with
no socket and no packets, whose publishes are routed when made and to which device messages are
handed as they are routed.

The packets a device sends most, and those sent to it, skip amqtt's per-packet machinery
(`_FastPath`): a QoS 0 or 1 PUBLISH is checked against the topic policy and routed as the front
reads it, a PUBACK releases its message, a PINGREQ is answered, each without a task; a message
routed to a connected client is written to it at once, its PUBACK awaited without a task or a
timer of its own. Everything else (CONNECT, SUBSCRIBE, UNSUBSCRIBE, DISCONNECT, QoS 2, anything
odd) still goes through amqtt's own reader loop, which also takes every packet while a plugin
listens to amqtt's per-packet or per-message events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import AMQTTError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage

from .policy import Login, TopicPolicy
from .wire import header_length, publish_packet

log = logging.getLogger(__name__)

CONNECT_PASS = Broker._handle_client_session.__code__  # the one pass over the filters _Subscriptions narrows
WATCHED = "ota_bridge.disconnect_noted"  # a session's attribute: its state machine notes its disconnects
TAKEOVER_WAIT_SECONDS = 5.0  # how long a replaced connection gets to wind down (its will sent)

# The client's next whole packet, fixed header included (b"" at the end of its stream).
PacketSource = Callable[[], Awaitable[bytes]]
# What a LocalClient is handed for each message routed to it: topic, payload, retained.
Receive = Callable[[str, bytes, bool], None]


class AdmittedPlugin(BaseAuthPlugin):
    """Every connection amqtt sees was admitted by the front, which checked the credentials."""

    async def authenticate(self, *, session: Any) -> bool:
        return bool(session.username)


def policy_allows(policy: TopicPolicy, session: Any, topic: str | None, action: Action | None) -> bool:
    """TopicPolicy on an amqtt session; a refused subscribe or publish is logged."""
    allowed = session is not None and topic is not None and action is not None and policy.allows(
        session.username or "", topic, action)
    if not allowed and action != Action.RECEIVE:
        log.warning("MQTT %s on %r refused for user %r", action, topic, session and session.username)
    return allowed


class TopicPolicyPlugin(BaseTopicPlugin):
    """The policy as amqtt's plugin. _IsolatingBroker checks it without amqtt's plugin machinery;
    the plugin stays, so a broker whose override no longer applies still enforces the policy."""

    @dataclass
    class Config:
        policy: Any = None

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return policy_allows(self.config.policy, session, topic, action)


PUBACK_TIMEOUT_SECONDS = 5  # as amqtt's QoS 1 flow: then the message is given up and the failure logged
# The events amqtt fires for the packets and messages the fast path handles: while a plugin listens
# to one of them, every packet goes through amqtt's own loop so that it hears them all.
FAST_PATH_EVENTS = (MQTTEvents.PACKET_RECEIVED, MQTTEvents.PACKET_SENT, BrokerEvents.MESSAGE_RECEIVED,
                    BrokerEvents.MESSAGE_BROADCAST, BrokerEvents.RETAINED_MESSAGE)
PINGREQ_PACKET, PINGRESP_PACKET = b"\xc0\x00", b"\xd0\x00"
PUBLISH_TYPE, PUBACK_TYPE = 3, 4


class _FrontReader(ReaderAdapter):
    """The front's whole packets, handed to amqtt as it reads them (a few bytes at a time), less
    those the fast path took."""

    def __init__(self, source: PacketSource, fast: _FastPath | None) -> None:
        self._source, self._fast = source, fast
        self._packet, self._offset = b"", 0

    async def read(self, n: int = -1) -> bytes:
        if self._offset >= len(self._packet):
            packet = await self._source()
            while packet and self._fast is not None and self._fast.took(packet, self):
                packet = await self._source()
            self._packet, self._offset = packet, 0
        end = len(self._packet) if n < 0 else min(self._offset + n, len(self._packet))
        chunk, self._offset = self._packet[self._offset:end], end
        return chunk

    def feed_eof(self) -> None:
        pass


class _FastPath:
    """One connection's PUBLISH (QoS 0 and 1), PUBACK and PINGREQ, handled as amqtt would without its
    task per packet, its queue of delivered messages and its client loop's four waiters per message.

    A PUBLISH is checked (a topic name, then TopicPolicy) and routed, retained if flagged, then
    acknowledged: once a device has its PUBACK, the message is with every subscriber's connection or
    session (the service's: handed over). A packet this path does not know how to take exactly as
    amqtt would (a topic amqtt closes the connection for, QoS 2, a DUP QoS 0, a PUBACK nobody waits
    for, a malformed packet) is handed to amqtt's reader loop unchanged.
    """

    def __init__(self, broker: _IsolatingBroker, client_id: str) -> None:
        self._broker, self._client_id = broker, client_id

    def took(self, packet: bytes, reader: _FrontReader) -> bool:
        """Handle packet if it is one of the fast path's; False hands it to amqtt."""
        kind = packet[0] >> 4
        if kind == PUBLISH_TYPE:
            taker = self._publish
        elif kind == PUBACK_TYPE:
            taker = self._puback
        elif packet == PINGREQ_PACKET:
            taker = self._pingreq
        else:
            return False
        handler = self._broker.connected_handler(self._client_id, reader)
        return handler is not None and taker(packet, handler)

    def _publish(self, packet: bytes, handler: BrokerProtocolHandler) -> bool:
        flags = packet[0] & 0x0F
        qos = flags >> 1 & 3
        if qos not in (QOS_0, QOS_1) or flags & 0x08:  # QoS 2 and 3, and DUP (amqtt drops a DUP QoS 0)
            return False
        start = header_length(packet)
        if start + 2 > len(packet):
            return False
        topic_end = start + 2 + (packet[start] << 8 | packet[start + 1])
        body = topic_end + (2 if qos else 0)
        if body > len(packet):
            return False
        try:
            topic = packet[start + 2:topic_end].decode("utf-8")
        except UnicodeDecodeError:
            return False
        if not _topic_name(topic):
            return False  # amqtt ends the connection
        session, broker = handler.session, self._broker
        if policy_allows(broker._policy, session, topic, Action.PUBLISH):
            data = packet[body:]
            broker._route(session, topic, data)
            if flags & 0x01:
                broker._retain(topic, data, qos, session)
        if qos:
            handler.writer.write(b"\x40\x02" + packet[topic_end:body])  # type: ignore[union-attr]
        return True

    @staticmethod
    def _puback(packet: bytes, handler: BrokerProtocolHandler) -> bool:
        if len(packet) != 4 or packet[:2] != b"\x40\x02":
            return False
        packet_id = packet[2] << 8 | packet[3]
        waiter = handler._puback_waiters.get(packet_id)
        if waiter is None or waiter.done():
            return False  # amqtt says so in its log
        waiter.set_result(PubackPacket.build(packet_id))
        return True

    @staticmethod
    def _pingreq(packet: bytes, handler: BrokerProtocolHandler) -> bool:
        handler.writer.write(PINGRESP_PACKET)  # type: ignore[union-attr]
        return True


class _Holders(list):  # type: ignore[type-arg]
    """One filter's (session, qos) list, iterated over a copy."""

    def __iter__(self) -> Any:
        return iter(self[:])


class _Subscriptions(dict):  # type: ignore[type-arg]
    """amqtt's filter -> holders map, iterated over a copy, its filters with wildcards kept apart.

    amqtt 0.12 iterates its subscriptions across awaits (each delivery's topic check, the
    retained messages at a connect); a subscription added meanwhile raised "dictionary changed
    size during iteration" and the message never reached the filters after it (issue 12).
    A message is routed to the holders of its own topic (one lookup) and of the wildcard filters
    it matches, instead of every filter in the broker being matched against it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wildcards: dict[str, None] = {}  # the filters holding + or #, in the order they came
        self.owned: dict[str, dict[str, None]] = {}  # client id -> the filters it holds, in the order it subscribed
        # (task, filters): what amqtt's connect pass in that task yields instead of every filter
        self._next_iteration: tuple[asyncio.Task[Any] | None, list[str]] | None = None

    def __repr__(self) -> str:
        """A count: amqtt logs repr(subscriptions) after every SUBSCRIBE, debug logging on or not."""
        return f"<{len(self)} subscription filters>"

    def own(self, client_id: str) -> list[str]:
        """The filters client_id holds."""
        return list(self.owned.get(client_id, ()))

    def iterate_once(self, filters: list[str]) -> None:
        """The next pass over the table that amqtt's connect (`Broker._handle_client_session`) makes in
        this task yields only filters (see _IsolatingBroker). Any other pass, by other code or in another
        task, sees every filter: if amqtt's order changed, a connect would cost more, never miss a filter."""
        self._next_iteration = (asyncio.current_task(), filters)

    def __setitem__(self, key: str, value: list[Any]) -> None:
        super().__setitem__(key, _Holders(value))
        if "+" in key or "#" in key:
            self.wildcards[key] = None

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.wildcards.pop(key, None)

    def clear(self) -> None:
        super().clear()
        self.wildcards.clear()
        self.owned.clear()

    def routes(self, topic: str, matches: Callable[[str, str], bool]) -> list[tuple[Any, int]]:
        """(session, qos) of every subscription matching topic: once per matching filter, as amqtt."""
        found = list(dict.get(self, topic, ()))
        for topic_filter in list(self.wildcards):
            if matches(topic, topic_filter):
                found += dict.get(self, topic_filter, ())
        return found

    def __iter__(self) -> Any:
        narrowed = self._next_iteration
        if narrowed is not None and _called_from(CONNECT_PASS) and narrowed[0] is asyncio.current_task():
            self._next_iteration = None
            return iter([topic_filter for topic_filter in narrowed[1] if dict.__contains__(self, topic_filter)])
        return iter(list(super().keys()))

    def keys(self) -> Any:
        return list(super().keys())

    def values(self) -> Any:
        return list(super().values())

    def items(self) -> Any:
        return list(super().items())


class _Sessions(dict):  # type: ignore[type-arg]
    """amqtt's client id -> (session, handler) map, the credentials of each session kept as it is stored.

    amqtt stores a session again whenever a client connects to it (after merging the CONNECT's
    credentials into a persistent one), so `logins` is up to date without a pass over the sessions;
    a session whose credentials changed since (a CONNECT being handled) is told apart by `current`.
    The login re-check finds a user's sessions in `users`, and those stored since its last round in
    `fresh`, without a pass either; the session monitor finds those disconnected since its last look
    in `disconnected` (each session's state machine notes it there as it enters that state).
    """

    def __init__(self) -> None:
        super().__init__()
        self.logins: dict[str, tuple[Login, Any]] = {}  # client id -> (its session's login, the session)
        self.users: dict[str, dict[str, None]] = {}  # username -> the client ids of its sessions
        self.fresh: dict[str, None] = {}  # client ids whose login was noted since the re-check took them
        self.disconnected: dict[str, Any] = {}  # client id -> its session, disconnected since the monitor looked

    def __setitem__(self, client_id: str, value: tuple[Any, Any]) -> None:
        super().__setitem__(client_id, value)
        self.learn(client_id)

    def learn(self, client_id: str) -> None:
        """Note client_id's session's credentials as they are now."""
        self._forget(client_id)
        session = dict.get(self, client_id, (None, None))[0]
        if session is not None:
            login = _login(session, client_id)
            self.logins[client_id] = (login, session)
            self.users.setdefault(login.username, {})[client_id] = None
            self.fresh[client_id] = None
            self._watch(client_id, session)

    def _watch(self, client_id: str, session: Any) -> None:
        """Have session noted in `disconnected` whenever it enters that state (now, if it is in it)."""
        if not session.attributes.get(WATCHED):  # once per session (a Session is not hashable)
            session.attributes[WATCHED] = True
            session.transitions.on_enter_disconnected(lambda: self.disconnected.__setitem__(client_id, session))
        if session.transitions.state == "disconnected":
            self.disconnected[client_id] = session

    def _forget(self, client_id: str) -> None:
        """What is noted of client_id's login, gone."""
        noted = self.logins.pop(client_id, None)
        self.fresh.pop(client_id, None)
        if noted is not None:
            ids = self.users.get(noted[0].username)
            if ids is not None:
                ids.pop(client_id, None)
                if not ids:
                    del self.users[noted[0].username]

    def take_fresh(self) -> list[tuple[Login, Any]]:
        """The logins noted since the last call."""
        fresh, self.fresh = self.fresh, {}
        return [self.logins[client_id] for client_id in fresh]

    def of_users(self, usernames: Collection[str]) -> list[tuple[Login, Any]]:
        """The logins of these users' sessions."""
        return [self.logins[client_id] for username in usernames for client_id in self.users.get(username, ())]

    def current(self, client_id: str, login: Login, ref: object) -> bool:
        """Whether client_id's session is still ref, with login's credentials."""
        session = dict.get(self, client_id, (None, None))[0]
        return session is ref and session is not None and _login(session, client_id) == login

    def __delitem__(self, client_id: str) -> None:
        super().__delitem__(client_id)
        self._forget(client_id)

    def pop(self, client_id: str, *default: Any) -> Any:
        self._forget(client_id)
        return super().pop(client_id, *default)

    def popitem(self) -> Any:
        client_id, value = super().popitem()
        self._forget(client_id)
        return client_id, value

    def setdefault(self, client_id: str, default: Any = None) -> Any:
        if client_id not in self:
            self[client_id] = default
        return dict.__getitem__(self, client_id)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for client_id, value in dict(*args, **kwargs).items():
            self[client_id] = value

    def clear(self) -> None:
        super().clear()
        self.logins.clear()
        self.users.clear()
        self.fresh.clear()
        self.disconnected.clear()


class _IsolatingBroker(Broker):
    """amqtt's broker, delivering retained messages only for the client's own subscriptions, checked,
    and routing each message as it comes in.

    amqtt 0.12 sends a connecting client the retained messages of every subscription in the
    broker, not its own, and without the delivery check.

    amqtt 0.12 routes a message through a queue and a loop of its own (a task and a wait for each
    message), matches it against every subscription in the broker, and asks its plugins about each
    check in tasks of their own (the publish, then each receiver). Here the policy is asked
    directly, and a message is routed when it is published (`_broadcast_message`): the holders of
    its topic and of the wildcard filters matching it, each delivery started at once, in the order
    amqtt's loop would start them. A device's messages therefore reach the service a few turns of
    the event loop sooner, and heads reach devices likewise; what is delivered to whom is unchanged.
    """

    def __init__(self, *args: Any, policy: TopicPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _Subscriptions()
        self._sessions = _Sessions()
        self._policy = policy
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._locals: list[LocalClient] = []
        self._fast = False  # set at start (fast_path)
        # QoS 1 messages written by _send_now, oldest first: (when to give up, waiter, client id, packet id)
        self._unacked: collections.deque[tuple[float, asyncio.Future[Any], str, int]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        # how many deliveries amqtt's own flow has yet to finish, by client handler: _send_now waits for them
        self._queued: dict[BrokerProtocolHandler, int] = {}

    def fast_path(self) -> bool:
        """Whether packets may skip amqtt's loop: no plugin listens to the events it would not fire."""
        listened = self.plugins_manager._event_plugin_callbacks
        return not any(listened.get(event) for event in FAST_PATH_EVENTS)

    def connected_handler(self, client_id: str, reader: ReaderAdapter) -> BrokerProtocolHandler | None:
        """The handler amqtt runs for this connection (the one reading from reader), once it is connected."""
        session, handler = self._sessions.get(client_id, (None, None))
        if (handler is None or handler.reader is not reader or handler.writer is None or handler.session is not session
                or session.transitions.state != "connected"):
            return None
        return handler

    async def _topic_filtering(self, session: Any, topic: str, action: Action) -> bool:
        return policy_allows(self._policy, session, topic, action)

    async def _broadcast_message(self, session: Any, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        if topic is not None and data is not None:
            self._route(session, topic, data, force_qos)

    def _route(self, source: Any, topic: str, data: bytes | bytearray, force_qos: int | None = None) -> None:
        """Hand a message to every subscriber allowed to receive it, now: a delivery task for each
        connected client, the session's queue for an away persistent one, the call for a local one."""
        for target, subscribed_qos in self._subscriptions.routes(topic, self._matches):
            qos = subscribed_qos if force_qos is None else force_qos  # as amqtt: the subscription's QoS
            if not policy_allows(self._policy, target, topic, Action.RECEIVE):
                continue
            if target.transitions.state != "connected":
                if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    kept = RetainedApplicationMessage(source, topic, data, qos)  # sent when it is back
                    target.retained_messages.put_nowait(kept)  # amqtt's queue is unbounded
                continue
            handler = self._get_handler(target)
            if handler is not None and not self._send_now(handler, target, topic, data, qos):
                self._deliver(handler.mqtt_publish(topic, data, qos, retain=False), handler)
        for local in self._locals:
            if local.wants(topic, self._matches) and self._policy.allows(local.username, topic, Action.RECEIVE):
                local.hand_over(topic, bytes(data), False)

    def _send_now(self, handler: BrokerProtocolHandler, session: Any, topic: str, data: bytes | bytearray,
                  qos: int) -> bool:
        """amqtt's mqtt_publish for QoS 0 and 1 without its task, lock and timed wait: the PUBLISH is
        written now; a QoS 1 message stays in the session's inflight messages, its PUBACK awaited by a
        waiter where amqtt's own would be, until it comes, the connection ends or PUBACK_TIMEOUT_SECONDS
        pass. False: amqtt's own flow must send it (QoS 2, a handler not yet or no longer attached)."""
        writer = handler.writer
        if (qos not in (QOS_0, QOS_1) or writer is None or handler.session is not session or not self._fast
                or handler._write_lock.locked() or handler in self._queued):
            return False  # amqtt's flow, and after what it is still to write to this client: the order holds
        if qos == QOS_0:
            writer.write(publish_packet(topic.encode(), data, QOS_0, 0))
            return True
        try:
            packet_id = session.next_packet_id
        except AMQTTError as e:  # 65535 messages unacknowledged
            log.error("an MQTT delivery to %r failed and is skipped: %s", session.client_id, e)
            return True
        message = OutgoingApplicationMessage(packet_id, topic, QOS_1, data, False)
        session.inflight_out[packet_id] = message
        writer.write(publish_packet(topic.encode(), data, QOS_1, packet_id))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[PubackPacket] = loop.create_future()
        handler._puback_waiters[packet_id] = waiter
        waiter.add_done_callback(lambda done: _released(done, handler, session, message))
        self._unacked.append((loop.time() + PUBACK_TIMEOUT_SECONDS, waiter, session.client_id, packet_id))
        if self._sweep is None:
            self._sweep = loop.call_later(PUBACK_TIMEOUT_SECONDS, self._give_up)
        return True

    def _give_up(self) -> None:
        """As amqtt's QoS 1 flow when no PUBACK came in time: the message is dropped from the session.
        One timer for all the messages sent, in the order sent (all wait as long)."""
        self._sweep = None
        unacked, now = self._unacked, asyncio.get_running_loop().time()
        while unacked and (unacked[0][1].done() or unacked[0][0] <= now):
            _, waiter, client_id, packet_id = unacked.popleft()
            if not waiter.done():
                log.error("an MQTT delivery to %r failed and is skipped: no PUBACK for packet ID %d in %d s",
                          client_id, packet_id, PUBACK_TIMEOUT_SECONDS)
                waiter.cancel()
        if unacked:
            self._sweep = asyncio.get_running_loop().call_later(max(unacked[0][0] - now, 0.1), self._give_up)

    def add_local(self, local: LocalClient) -> None:
        self._locals.append(local)

    def remove_local(self, local: LocalClient) -> None:
        if local in self._locals:
            self._locals.remove(local)

    def publish_local(self, local: LocalClient, topic: str, data: bytes, retain: bool, qos: int) -> None:
        """A local client's publish, checked and routed as amqtt handles a client's PUBLISH, then retained."""
        if not _topic_name(topic):
            raise ValueError(f"cannot publish on {topic!r}: not a topic name")
        if not self._policy.allows(local.username, topic, Action.PUBLISH):
            log.warning("MQTT publish on %r refused for local user %r", topic, local.username)
            return
        self._route(None, topic, data)
        if retain:
            self._retain(topic, data, qos)

    def _retain(self, topic: str, data: bytes | bytearray, qos: int, source: Any = None) -> None:
        """amqtt's retain_message without its event (no plugin here listens): an empty payload clears."""
        if data:
            self._retained_messages[topic] = RetainedApplicationMessage(source, topic, data, qos)
        else:
            self._retained_messages.pop(topic, None)

    def retained_for(self, local: LocalClient) -> list[tuple[str, bytes]]:
        """The retained messages a local client's filters match and it may receive, as at a subscribe."""
        return [(topic, bytes(retained.data)) for topic, retained in list(self._retained_messages.items())
                if local.wants(topic, self._matches) and self._policy.allows(local.username, topic, Action.RECEIVE)]

    def _deliver(self, delivery: Awaitable[Any], handler: BrokerProtocolHandler) -> None:
        task = asyncio.ensure_future(delivery)
        self._deliveries.add(task)
        self._queued[handler] = self._queued.get(handler, 0) + 1
        task.add_done_callback(lambda done: self._delivered(done, handler))

    def _delivered(self, task: asyncio.Task[Any] | None, handler: BrokerProtocolHandler) -> None:
        left = self._queued.pop(handler, 1) - 1
        if left:
            self._queued[handler] = left
        if task is None:
            return
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an MQTT delivery failed and is skipped: %r", task.exception())

    async def shutdown(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
        await super().shutdown()

    async def _session_monitor(self) -> None:
        """amqtt's session expiry monitor, looking each second only at the sessions disconnected since
        its last look (amqtt's passes over every session): a clean or anonymous one still stored is
        forgotten, as amqtt does. With a session expiry interval (this broker sets none), amqtt's own."""
        if self.config.session_expiry_interval is not None:
            await super()._session_monitor()
            return
        while True:
            gone, self._sessions.disconnected = self._sessions.disconnected, {}
            for client_id, session in gone.items():
                if (self._sessions.get(client_id, (None, None))[0] is session
                        and session.transitions.state == "disconnected"
                        and (session.is_anonymous or session.clean_session)):
                    await self._cleanup_session(client_id)
            await asyncio.sleep(1)

    async def _publish_session_retained_messages(self, session: Any) -> None:
        """amqtt's, sending what was kept for a persistent session while it was away (a task each, in
        order); meanwhile a message routed to the client goes after them, through amqtt's flow.

        amqtt 0.12 calls it only at a connect, and its next step there, with no await between, is a
        pass over every filter in the broker to send the retained messages of those the session holds
        (`_publish_retained_messages_for_subscription`, each): that pass is handed the session's own.
        Only that pass: one made by other code, or by another connection's task, sees every filter
        (`_Subscriptions.iterate_once`), so a change of amqtt's order would cost time, not messages;
        tests/test_embedded_scaling.py counts the filters a reconnect visits, so it would show."""
        handler = self._get_handler(session)
        if handler is None:
            await super()._publish_session_retained_messages(session)
        else:
            self._queued[handler] = self._queued.get(handler, 0) + 1
            try:
                await super()._publish_session_retained_messages(session)
            finally:
                self._delivered(None, handler)
        self._subscriptions.iterate_once(self._subscriptions.own(session.client_id))

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        code = await super().add_subscription(subscription, session)
        if code != 0x80:
            self._subscriptions.owned.setdefault(session.client_id, {})[subscription[0]] = None
        return code

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        deleted = super()._del_subscription(a_filter, session)
        owned = self._subscriptions.owned.get(session.client_id)
        if owned is not None and not any(s.client_id == session.client_id
                                         for s, _ in dict.get(self._subscriptions, a_filter, ())):
            owned.pop(a_filter, None)
            if not owned:
                del self._subscriptions.owned[session.client_id]
        return deleted

    async def _del_all_subscriptions(self, session: Any) -> None:
        """amqtt's, over the session's own filters rather than every filter in the broker."""
        emptied = [topic_filter for topic_filter in self._subscriptions.own(session.client_id)
                   if self._del_subscription(topic_filter, session)]
        for topic_filter in emptied:
            if topic_filter in self._subscriptions and not self._subscriptions[topic_filter]:
                del self._subscriptions[topic_filter]

    def retained_matching(self, topic_filter: str) -> list[tuple[str, RetainedApplicationMessage]]:
        """The retained messages whose topic topic_filter matches: one lookup for a filter without
        wildcards (a device's), a pass over them all only for a wildcard filter."""
        if "+" not in topic_filter and "#" not in topic_filter:
            retained = self._retained_messages.get(topic_filter)
            return [] if retained is None else [(topic_filter, retained)]
        return [(topic, retained) for topic, retained in list(self._retained_messages.items())
                if self._matches(topic, topic_filter)]

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in self.retained_matching(topic_filter):
            if await self._topic_filtering(session, topic, Action.RECEIVE):
                await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)


def _released(waiter: asyncio.Future[Any], handler: BrokerProtocolHandler, session: Any,
              message: OutgoingApplicationMessage) -> None:
    """A QoS 1 message's flow ended (acknowledged, given up, or its connection stopped): forgotten, as
    amqtt forgets it then."""
    packet_id = message.packet_id
    if handler._puback_waiters.get(packet_id) is waiter:
        del handler._puback_waiters[packet_id]
    if session.inflight_out.get(packet_id) is message:
        del session.inflight_out[packet_id]
    if not waiter.cancelled():
        message.puback_packet = waiter.result()


def _called_from(code: Any) -> bool:
    """Whether the function calling the caller is code's, past any __iter__ (a subclass's) between."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name == "__iter__":
        frame = frame.f_back
    return frame is not None and frame.f_code is code


def _topic_name(topic: str) -> bool:
    """Whether a client may publish on topic as amqtt takes it: no wildcard, not empty, not a $ topic."""
    return bool(topic) and "#" not in topic and "+" not in topic and not topic.startswith("$")


def _login(session: Any, client_id: str) -> Login:
    """The credentials amqtt keeps in a session (merged in at each CONNECT), as a Login."""
    return Login(session.username or "", session.password or "", client_id)


def _valid_filter(topic_filter: str) -> bool:
    """As amqtt's add_subscription: '#' only as the whole last level, '+' only as a whole level."""
    levels = topic_filter.split("/")
    return bool(topic_filter) and all(
        ("#" not in level or (level == "#" and i == len(levels) - 1)) and ("+" not in level or level == "+")
        for i, level in enumerate(levels))


@dataclass(frozen=True)
class SessionView:
    """What the front needs to know of a session amqtt keeps."""

    login: Login
    connected: bool
    ref: object  # the session itself: drop() acts only if the id still names this one


class LocalClient:
    """A client inside the broker's process (the service's link): its publishes are routed when made,
    messages matching its filters are handed to receive; no socket, no packet, no session in amqtt.

    The topic policy applies to it as to any client: it publishes, and receives, as username."""

    WANTS_REMEMBERED = 4096  # topics whose match against the filters is remembered, then forgotten at once

    def __init__(self, broker: _IsolatingBroker, username: str, filters: list[str], receive: Receive) -> None:
        self._broker, self.username, self.filters, self.receive = broker, username, tuple(filters), receive
        self._wanted: dict[str, bool] = {}

    def hand_over(self, topic: str, data: bytes, retained: bool) -> None:
        """receive(), its failure logged: it must not end the connection of the client that published."""
        try:
            self.receive(topic, data, retained)
        except Exception:
            log.exception("the local client %r failed to take a message on %r", self.username, topic)

    def wants(self, topic: str, matches: Callable[[str, str], bool]) -> bool:
        wanted = self._wanted.get(topic)
        if wanted is None:
            if len(self._wanted) >= self.WANTS_REMEMBERED:
                self._wanted.clear()
            wanted = self._wanted[topic] = any(matches(topic, topic_filter) for topic_filter in self.filters)
        return wanted

    def publish(self, topic: str, data: bytes, retain: bool, qos: int) -> None:
        """Route a message now, and retain it if asked. Raises ValueError for a topic no client may publish on."""
        self._broker.publish_local(self, topic, data, retain, qos)

    def retained(self) -> list[tuple[str, bytes]]:
        """The retained messages it would be sent on subscribing now: (topic, payload)."""
        return self._broker.retained_for(self)


class AmqttCore:
    """The amqtt broker, with its listeners named as the front's."""

    def __init__(self, listeners: list[str], policy: TopicPolicy) -> None:
        config = {
            "listeners": {name: {"type": "external", "max_connections": -1} for name in ["default", *listeners]},
            "plugins": {f"{__name__}.AdmittedPlugin": {}, f"{__name__}.TopicPolicyPlugin": {"policy": policy}},
        }
        self._broker = _IsolatingBroker(config, loop=asyncio.get_running_loop(), policy=policy)
        self._policy = policy

    async def start(self) -> None:
        await self._broker.start()
        self._broker._fast = self._broker.fast_path()

    async def shutdown(self) -> None:
        await self._broker.shutdown()

    async def serve(self, listener: str, client_id: str, source: PacketSource, writer: asyncio.StreamWriter) -> None:
        """Run an admitted client's connection to its end; source starts with its CONNECT."""
        fast = _FastPath(self._broker, client_id) if self._broker._fast else None
        await self._broker.external_connected(_FrontReader(source, fast), StreamWriterAdapter(writer), listener)

    def attach(self, username: str, filters: list[str], receive: Receive) -> LocalClient:
        """A local client subscribed to filters; messages routed from now on are handed to receive."""
        for topic_filter in filters:
            if not _valid_filter(topic_filter) or not self._policy.allows(username, topic_filter, Action.SUBSCRIBE):
                raise ValueError(f"user {username!r} cannot subscribe to {topic_filter!r}")
        local = LocalClient(self._broker, username, filters, receive)
        self._broker.add_local(local)
        return local

    def detach(self, local: LocalClient) -> None:
        self._broker.remove_local(local)

    def session(self, client_id: str) -> SessionView | None:
        """The session amqtt keeps for client_id, connected or not."""
        session = self._broker._sessions.get(client_id, (None, None))[0]
        if session is None:
            return None
        return SessionView(_login(session, client_id), session.transitions.state == "connected", session)

    def session_count(self) -> int:
        """How many sessions amqtt keeps, connected or not."""
        return len(self._broker._sessions)

    def logins(self) -> list[tuple[Login, object]]:
        """Every session's login, connected or not, and the session (as SessionView.ref): kept as the
        sessions are stored, not built here."""
        return list(self._broker._sessions.logins.values())

    def fresh_logins(self) -> list[tuple[Login, object]]:
        """As logins(), those of the sessions stored, or whose credentials changed, since the last call."""
        return self._broker._sessions.take_fresh()

    def logins_of(self, usernames: Collection[str]) -> list[tuple[Login, object]]:
        """As logins(), those of these users' sessions."""
        return self._broker._sessions.of_users(usernames)

    def still_holds(self, login: Login, ref: object) -> bool:
        """Whether login.client_id's session is still ref, logged in with login; if not, what is noted
        of that session's credentials is brought up to date (a CONNECT merged new ones into it)."""
        sessions = self._broker._sessions
        if sessions.current(login.client_id, login, ref):
            return True
        sessions.learn(login.client_id)
        return False

    async def disconnect(self, client_id: str) -> bool:
        """Close a client's connection (its will is sent) and wait for amqtt to see it gone."""
        session, handler = self._broker._sessions.get(client_id, (None, None))
        if session is None or handler is None or session.transitions.state != "connected":
            return False
        await handler.stop()
        deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
        while session.transitions.state == "connected" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return True

    async def drop(self, client_id: str, ref: object | None = None) -> bool:
        """Close a client's connection and forget its session; returns whether it was connected."""
        current = self._broker._sessions.get(client_id, (None, None))[0]
        if current is None or (ref is not None and current is not ref):
            return False
        was_connected = await self.disconnect(client_id)
        if self._broker._sessions.get(client_id, (None, None))[0] is current:
            await self._broker._cleanup_session(client_id)
        return was_connected
