"""amqtt 0.12, reached into here and nowhere else: the broker behind the front.

amqtt listens on no socket of its own: its listeners are "external", so the only way in is
`AmqttCore.serve`, which the front calls for a connection whose CONNECT it has already checked.
What amqtt does with a CONNECT before its own login check (deleting a clean session's
namesake, merging a will and credentials into an existing session, taking over a connected
one, keeping a session for every refused client) therefore only ever happens to a client
that passed the front.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from .policy import Login, TopicPolicy

log = logging.getLogger(__name__)

TAKEOVER_WAIT_SECONDS = 5.0  # how long a replaced connection gets to wind down (its will sent)

# Reads up to n bytes of the client's stream ("" at its end), whole packets at a time.
PacketSource = Callable[[int], Awaitable[bytes]]


class AdmittedPlugin(BaseAuthPlugin):
    """Every connection amqtt sees was admitted by the front, which checked the credentials."""

    async def authenticate(self, *, session: Any) -> bool:
        return bool(session.username)


class TopicPolicyPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        policy: Any = None

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        allowed = session is not None and topic is not None and self.config.policy.allows(
            session.username or "", topic, action)
        if not allowed and action != Action.RECEIVE:
            log.warning("MQTT %s on %r refused for user %r", action, topic, session and session.username)
        return allowed


class _FrontReader(ReaderAdapter):
    def __init__(self, source: PacketSource) -> None:
        self._source = source

    async def read(self, n: int = -1) -> bytes:
        return await self._source(n)

    def feed_eof(self) -> None:
        pass


class _Holders(list):  # type: ignore[type-arg]
    """One filter's (session, qos) list, iterated over a copy."""

    def __iter__(self) -> Any:
        return iter(self[:])


class _Subscriptions(dict):  # type: ignore[type-arg]
    """amqtt's filter -> holders map, iterated over a copy.

    amqtt 0.12 iterates its subscriptions across awaits (each delivery's topic check, the
    retained messages at a connect); a subscription added meanwhile raised "dictionary changed
    size during iteration" and the message never reached the filters after it (issue 12).
    """

    def __setitem__(self, key: str, value: list[Any]) -> None:
        super().__setitem__(key, _Holders(value))

    def __iter__(self) -> Any:
        return iter(list(super().keys()))

    def keys(self) -> Any:
        return list(super().keys())

    def values(self) -> Any:
        return list(super().values())

    def items(self) -> Any:
        return list(super().items())


class _IsolatingBroker(Broker):
    """amqtt's broker, delivering retained messages only for the client's own subscriptions, checked.

    amqtt 0.12 sends a connecting client the retained messages of every subscription in the
    broker, not its own, and without the delivery check.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _Subscriptions()

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(session, topic, Action.RECEIVE):
                await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)


@dataclass(frozen=True)
class SessionView:
    """What the front needs to know of a session amqtt keeps."""

    login: Login
    connected: bool
    ref: object  # the session itself: drop() acts only if the id still names this one


class AmqttCore:
    """The amqtt broker, with its listeners named as the front's."""

    def __init__(self, listeners: list[str], policy: TopicPolicy) -> None:
        config = {
            "listeners": {name: {"type": "external", "max_connections": -1} for name in ["default", *listeners]},
            "plugins": {f"{__name__}.AdmittedPlugin": {}, f"{__name__}.TopicPolicyPlugin": {"policy": policy}},
        }
        self._broker = _IsolatingBroker(config, loop=asyncio.get_running_loop())

    async def start(self) -> None:
        await self._broker.start()

    async def shutdown(self) -> None:
        await self._broker.shutdown()

    async def serve(self, listener: str, source: PacketSource, writer: asyncio.StreamWriter) -> None:
        """Run an admitted client's connection to its end; source starts with its CONNECT."""
        await self._broker.external_connected(_FrontReader(source), StreamWriterAdapter(writer), listener)

    def sessions(self) -> dict[str, SessionView]:
        """Every session amqtt keeps, connected or not, by client id."""
        return {client_id: SessionView(Login(s.username or "", s.password or "", client_id),
                                       s.transitions.state == "connected", s)
                for client_id, (s, _) in list(self._broker._sessions.items())}

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
