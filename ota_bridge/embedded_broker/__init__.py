"""The embedded MQTT broker, started in the service's own process by default.

A front of our own (front.py) owns the sockets and checks every CONNECT whole before amqtt
(core.py, the only place amqtt's internals are reached into) sees the connection; it also
caps every packet's size. Every client authenticates: devices with the credentials from their
registration, operators watching topics with username "api" and an API token as the password
(the service is attached to the broker inside its process, service_link.py: its own name is
refused over a connection). Every few seconds the credentials of the sessions
whose login may have changed are checked again (those the logins name, and those that came since
the last round), and the sessions of a revoked token or a disabled, rotated or deleted device are
dropped. Every subscribe, publish and delivery is checked against
TopicPolicy: a device sees and writes only its own topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..settings import HostPort
from .core import AmqttCore
from .front import Front
from .policy import SERVICE_USERNAME, Login, Logins, TopicPolicy
from .wire import MAX_PACKET_BYTES

__all__ = ["SERVICE_USERNAME", "MAX_PACKET_BYTES", "EmbeddedBroker", "ListenError", "Login", "Logins",
           "TlsListener", "TopicPolicy", "start_broker"]

log = logging.getLogger(__name__)

RECHECK_SECONDS = 2.0  # how often the sessions' credentials are checked again


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


class EmbeddedBroker:
    """The running broker: its listeners, the amqtt core behind them, the re-check of logins."""

    def __init__(self, logins: Logins, policy: TopicPolicy, core: AmqttCore, service_in_process: bool = False) -> None:
        self.logins, self.core = logins, core
        self.front = Front(core, logins, policy, service_in_process)
        self._servers: list[asyncio.Server] = []
        self._recheck: asyncio.Task[None] | None = None
        self._everything_next = True  # the next re-check looks at every session (the first, or after a failure)

    async def listen(self, name: str, listen: HostPort, context: ssl.SSLContext | None) -> None:
        try:
            server = await asyncio.start_server(self.front.handler(name), listen.host or None, listen.port,
                                                ssl=context, reuse_address=True)
        except OSError as e:
            raise ListenError(name, e.errno, e.strerror or str(e)) from e
        self._servers.append(server)

    def start_rechecks(self) -> None:
        self._recheck = asyncio.create_task(self._recheck_forever())

    async def shutdown(self) -> None:
        for server in self._servers:
            server.close()
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        await self.core.shutdown()

    def session_count(self) -> int:
        """How many sessions the broker keeps, connected or not."""
        return self.core.session_count()

    async def disconnect_client(self, client_id: str) -> bool:
        """Drop a client's connection and session (a disabled device); returns whether it was connected."""
        return await self.core.drop(client_id)

    async def recheck(self) -> int:
        """Check again the credentials of the sessions whose login may have stopped passing: those of
        the users the logins say changed (every session when they cannot tell), and those stored or
        changed since the last round (a login checked at the front, meanwhile, against what the
        database held then). Drop those that fail. Returns how many were dropped.

        A session whose credentials changed while they were checked (its client connected again, the
        new ones checked at the front) is left to the next round, which checks the new ones."""
        fresh = self.core.fresh_logins()  # before the changes are read: a change after it is read next round
        everything, self._everything_next = self._everything_next, True  # until this round is through
        changed = await self.logins.changed()
        if changed is None or everything:
            held = self.core.logins()
        else:
            held = list({login.client_id: (login, ref) for login, ref in [*fresh, *self.core.logins_of(changed)]}
                        .values())
        verdicts = await self.logins.still_valid([login for login, _ in held]) if held else []
        dropped = 0
        for (login, ref), valid in zip(held, verdicts, strict=True):
            if not valid and self.core.still_holds(login, ref):
                log.info("dropping MQTT session %r of user %r: its credentials no longer pass",
                         login.client_id, login.username)
                await self.core.drop(login.client_id, ref)
                dropped += 1
        self._everything_next = False
        return dropped

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            try:
                await self.recheck()
            except Exception:  # a database hiccup: try again next round
                log.exception("re-checking the MQTT sessions' credentials failed")


def server_tls_context(tls: TlsListener) -> ssl.SSLContext:
    """TLS 1.2 or later, asking for no client certificate: devices log in with passwords."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certfile, tls.keyfile)
    return context


async def start_broker(listen: HostPort, logins: Logins, policy: TopicPolicy,
                       tls: TlsListener | None = None, *, service_in_process: bool = False) -> EmbeddedBroker:
    """Start the broker on listen (and tls); the caller shuts it down. With service_in_process (the
    service attaches with service_link.ServiceLink), a login in the service's name over a connection is
    refused before the logins are asked.

    Raises ListenError, naming the listener, when one cannot bind or its certificate cannot be read.
    """
    core = AmqttCore(["default", "tls"], policy)
    await core.start()
    broker = EmbeddedBroker(logins, policy, core, service_in_process)
    try:
        await broker.listen("default", listen, None)
        if tls is not None:
            try:
                context = server_tls_context(tls)
            except (OSError, ssl.SSLError) as e:
                raise ListenError("tls", getattr(e, "errno", None), str(e)) from e
            await broker.listen("tls", tls.listen, context)
    except BaseException:
        await broker.shutdown()
        raise
    broker.start_rechecks()
    log.info("embedded MQTT broker listening on %s%s", listen, f", TLS on {tls.listen}" if tls else "")
    return broker
