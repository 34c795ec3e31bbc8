"""The embedded MQTT broker (amqtt), started in the service's own process by default.

Every client authenticates: devices with the credentials from their registration (checked against
the database), the service with a secret made at start-up, operators watching topics with
username "api" and an API token as the password. Anonymous clients are refused.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin

from .settings import HostPort

log = logging.getLogger(__name__)

SERVICE_USERNAME = "$ota-bridge"  # '$' cannot start a device id, so no device can take this name

# (username, password, client_id) -> allowed?
Authenticator = Callable[[str, str, str], Awaitable[bool]]


class DatabaseAuthPlugin(BaseAuthPlugin):
    """Lets a client in only when the service's authenticator says yes."""

    @dataclass
    class Config:
        authenticator: Any = None

    async def authenticate(self, *, session: Any) -> bool:
        username, password = session.username or "", session.password or ""
        allowed = bool(username) and await self.config.authenticator(username, password, session.client_id or "")
        if not allowed:
            log.warning("MQTT login refused for user %r (client id %r)", username, session.client_id)
        return allowed


def broker_config(listen: HostPort, authenticator: Authenticator) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{listen.host}:{listen.port}", "max_connections": -1}},
        "plugins": {f"{__name__}.DatabaseAuthPlugin": {"authenticator": authenticator}},
    }


async def start_broker(listen: HostPort, authenticator: Authenticator) -> Broker:
    """Start an amqtt broker on listen; the caller shuts it down. Raises OSError when it cannot bind."""
    broker = Broker(broker_config(listen, authenticator), loop=asyncio.get_running_loop())
    amqtt_log = logging.getLogger("amqtt.broker")
    level, amqtt_log.level = amqtt_log.level, logging.CRITICAL  # our caller reports a failure in one line
    try:
        await broker.start()
    except BrokerError as e:
        raise OSError(getattr(e.__cause__, "errno", None), str(e.__cause__ or e)) from e
    finally:
        amqtt_log.setLevel(level)
    log.info("embedded MQTT broker listening on %s", listen)
    return broker
