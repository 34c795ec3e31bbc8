"""The embedded MQTT broker (amqtt), started in the service's own process by default.

Every client authenticates: devices with the credentials from their registration (checked against
the database), the service with a secret made at start-up, operators watching topics with
username "api" and an API token as the password. Anonymous clients are refused.

Every subscribe, publish and delivery is checked against TopicPolicy: a device sees and writes
only its own topics. amqtt 0.12 sends a connecting client the retained messages of every
subscription in the broker, not its own, and without the delivery check; IsolatingBroker closes
that hole.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from agent.protocol import OPERATOR_USERNAME, SERVICE_CLIENT_ID, Topics

from .settings import HostPort

log = logging.getLogger(__name__)

SERVICE_USERNAME = SERVICE_CLIENT_ID  # reserved: no device can take this id

# (username, password, client_id) -> allowed?
Authenticator = Callable[[str, str, str], Awaitable[bool]]


@dataclass(frozen=True)
class TopicPolicy:
    """Who may subscribe to, publish on and receive which topic."""

    topics: Topics

    def allows(self, username: str, topic: str, action: str) -> bool:
        if username == SERVICE_USERNAME:
            return True
        if username == OPERATOR_USERNAME:  # operators watch; they never write
            return action != Action.PUBLISH
        if action == Action.PUBLISH:
            return topic in (self.topics.status(username), self.topics.presence(username))
        return topic.startswith(self.topics.device(username, ""))  # its own subtree: ids hold no wildcards

    def allows_will(self, username: str, will_topic: str | None) -> bool:
        """A device's last will may only speak for its own presence."""
        return will_topic is None or self.allows(username, will_topic, Action.PUBLISH)


class DatabaseAuthPlugin(BaseAuthPlugin):
    """Lets a client in only when the service's authenticator says yes, and its will is its own."""

    @dataclass
    class Config:
        authenticator: Any = None
        policy: Any = None

    async def authenticate(self, *, session: Any) -> bool:
        username, password = session.username or "", session.password or ""
        will = session.will_topic if session.will_flag else None
        allowed = (bool(username) and self.config.policy.allows_will(username, will)
                   and await self.config.authenticator(username, password, session.client_id or ""))
        if not allowed:
            log.warning("MQTT login refused for user %r (client id %r)", username, session.client_id)
        return allowed


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


class IsolatingBroker(Broker):
    """amqtt's broker, delivering retained messages only for the client's own subscriptions, checked."""

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

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        """amqtt's context, at TLS 1.2 or later and asking for no client certificate.

        amqtt asks for one (CERT_OPTIONAL) and checks it against the system's CAs, so a device
        presenting a certificate from a private CA would be refused; devices log in with passwords.
        """
        context = Broker._create_ssl_context(listener)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_NONE
        return context

    async def disconnect_client(self, client_id: str) -> bool:
        """Drop a client's connection (a disabled device); returns whether it was connected."""
        session, handler = self._sessions.get(client_id, (None, None))
        if session is None or handler is None or session.transitions.state != "connected":
            return False
        await handler.stop()
        return True


@dataclass(frozen=True)
class TlsListener:
    """A second listener of the embedded broker, over TLS, with the server's certificate and key."""

    listen: HostPort
    certfile: Path
    keyfile: Path


class ListenError(OSError):
    """A listener could not start; `listener` is "default" or "tls"."""

    def __init__(self, listener: str, errno: int | None, text: str) -> None:
        super().__init__(errno, text)
        self.listener = listener


def broker_config(listen: HostPort, authenticator: Authenticator, policy: TopicPolicy,
                  tls: TlsListener | None = None) -> dict[str, Any]:
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": str(listen), "max_connections": -1}}
    if tls is not None:
        listeners["tls"] = {"type": "tcp", "bind": str(tls.listen), "max_connections": -1,
                            "ssl": True, "certfile": str(tls.certfile), "keyfile": str(tls.keyfile)}
    return {
        "listeners": listeners,
        "plugins": {
            f"{__name__}.DatabaseAuthPlugin": {"authenticator": authenticator, "policy": policy},
            f"{__name__}.TopicPolicyPlugin": {"policy": policy},
        },
    }


async def start_broker(listen: HostPort, authenticator: Authenticator, policy: TopicPolicy,
                       tls: TlsListener | None = None) -> IsolatingBroker:
    """Start an amqtt broker on listen (and tls); the caller shuts it down.

    Raises ListenError, naming the listener, when one cannot bind.
    """
    config = broker_config(listen, authenticator, policy, tls)
    broker = IsolatingBroker(config, loop=asyncio.get_running_loop())
    amqtt_log = logging.getLogger("amqtt.broker")
    level, amqtt_log.level = amqtt_log.level, logging.CRITICAL  # our caller reports a failure in one line
    try:
        await broker.start()
    except BrokerError as e:
        failed = next((name for name in config["listeners"] if name not in broker._servers), "default")
        raise ListenError(failed, getattr(e.__cause__, "errno", None), str(e.__cause__ or e)) from e
    finally:
        amqtt_log.setLevel(level)
    log.info("embedded MQTT broker listening on %s%s", listen, f", TLS on {tls.listen}" if tls else "")
    return broker
