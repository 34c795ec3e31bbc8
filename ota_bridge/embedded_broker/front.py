"""The broker's front door: it owns the sockets, and amqtt sees only clients it let in.

For each TCP (or TLS) connection the front reads the CONNECT packet itself, at most
MAX_CONNECT_BYTES and within CONNECT_TIMEOUT_SECONDS, and checks it whole: MQTT 3.1.1, a
client id, credentials through the service's Logins, the will's topic through TopicPolicy.
A refused client gets its CONNACK return code and the connection is closed: no session, no
state anywhere. When the service is attached to the broker in-process (service_link.py), its
username is refused over a connection whatever the password. Only then, and only for an
admitted client, it makes room for the session (a session of the same client id held by another
user is dropped, never merged into; a connected one is disconnected first, its will sent) and
hands the connection to amqtt in the same process, replaying the CONNECT as it checked it.

Every later packet is read whole by the front too (wire.PacketFramer), its size checked from
the fixed header before the rest of it is waited for: a client sending a packet over
MAX_PACKET_BYTES is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
from typing import Callable

from .core import AmqttCore
from .policy import SERVICE_USERNAME, Login, Logins, TopicPolicy
from .wire import (
    IDENTIFIER_REJECTED,
    MAX_CONNECT_BYTES,
    MAX_PACKET_BYTES,
    NOT_AUTHORIZED,
    Connect,
    PacketFramer,
    Refused,
    WireError,
    connack,
    parse_connect,
    read_packet,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
KEEP_ALIVE_FACTOR = 1.5  # a client silent this many times its keep-alive is disconnected (MQTT-3.1.2-24)


class PacketReader:
    """A client's stream, read a whole packet at a time (size checked first), and its keep-alive
    enforced: a client silent for one and a half times its keep-alive is disconnected
    (MQTT-3.1.2-24), so its will is sent.

    amqtt is handed the CONNECT with a keep-alive of 0 (`Front._connection`). Its own keep-alive
    timer cost a task and a timer for every packet read and a timer for every packet sent, and
    enforced nothing: on a timeout amqtt 0.12's broker starts the read again. Here one timer per
    connection looks at when the last packet came.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes, who: str,
                 keep_alive: int) -> None:
        self._framer, self._writer, self._who = PacketFramer(reader, MAX_PACKET_BYTES), writer, who
        self._first: bytes | None = first
        self._loop = asyncio.get_running_loop()
        self._limit = keep_alive * KEEP_ALIVE_FACTOR
        self._last = self._loop.time()
        self._timer = self._loop.call_later(self._limit, self._check) if keep_alive > 0 else None

    async def packet(self) -> bytes:
        """The next whole packet (the CONNECT first); b"" at the end of the stream, or with the
        connection closed when the client breaks the rules."""
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            packet = await self._framer.next() or b""
        except (WireError, asyncio.IncompleteReadError, ConnectionError) as e:
            if isinstance(e, WireError):
                log.warning("MQTT client %s disconnected: %s", self._who, e)
            self._writer.transport.abort()
            return b""
        self._last = self._loop.time()
        return packet

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        silent = self._loop.time() - self._last
        if silent < self._limit:
            self._timer = self._loop.call_later(self._limit - silent, self._check)
            return
        self._timer = None
        log.info("MQTT client %s disconnected: nothing from it for %.0f s, 1.5 times its keep-alive", self._who, silent)
        self._writer.transport.abort()


class Front:
    """Accepts connections on listeners and admits clients to the core."""

    def __init__(self, core: AmqttCore, logins: Logins, policy: TopicPolicy, service_in_process: bool = False) -> None:
        self.core, self.logins, self.policy = core, logins, policy
        self.service_in_process = service_in_process  # then the service's name never logs in over a socket

    def handler(self, listener: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await self._connection(listener, reader, writer)
            finally:
                writer.close()  # after what is written (a refusal's CONNACK) is sent

        return accept

    async def _connection(self, listener: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        _no_delay(writer)
        try:
            connect = await asyncio.wait_for(_read_connect(reader), CONNECT_TIMEOUT_SECONDS)
            await self._admit(connect)
        except Refused as e:
            log.warning("MQTT login from %s refused: %s", peer, e)
            writer.write(connack(e.code))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return
        except (WireError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            log.info("MQTT connection from %s closed before login: %s", peer, e or type(e).__name__)
            return
        amqtts = dataclasses.replace(connect, keep_alive=0).encode()  # the keep-alive is the PacketReader's
        packets = PacketReader(reader, writer, amqtts, f"{connect.client_id!r} ({peer})", connect.keep_alive)
        try:
            await self.core.serve(listener, connect.client_id, packets.packet, writer)
        finally:
            packets.close()

    async def _admit(self, connect: Connect) -> None:
        """Raises Refused unless the client may connect; then makes room for its session."""
        if connect.username is None or connect.password is None:
            raise Refused(NOT_AUTHORIZED, f"no username or password (client id {connect.client_id!r})")
        if self.service_in_process and connect.username == SERVICE_USERNAME:
            raise Refused(NOT_AUTHORIZED, f"user {SERVICE_USERNAME!r} is attached in-process, never over a connection "
                                          f"(client id {connect.client_id!r})")
        login = Login(connect.username, connect.password, connect.client_id)
        will_topic = connect.will.topic if connect.will else None
        if not self.policy.allows_will(login.username, will_topic):
            raise Refused(NOT_AUTHORIZED, f"user {login.username!r} may not leave a will on {will_topic!r}")
        if not await self.logins.check(login):
            raise Refused(NOT_AUTHORIZED, f"bad credentials for user {login.username!r} "
                                          f"(client id {login.client_id!r})")
        await self._make_room(login)

    async def _make_room(self, login: Login) -> None:
        held = self.core.session(login.client_id)
        if held is None:
            return
        if held.login.username != login.username:
            log.info("dropping the session of %r held by user %r for user %r", login.client_id,
                     held.login.username, login.username)
            await self.core.drop(login.client_id, held.ref)
        elif held.connected:
            await self.core.disconnect(login.client_id)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Nagle off on the client's socket, whatever the event loop's default: every MQTT exchange is
    small and waits for its answer (asyncio's selector loop sets it too; this says it is wanted)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _read_connect(reader: asyncio.StreamReader) -> Connect:
    packet = await read_packet(reader, MAX_CONNECT_BYTES)
    if packet is None:
        raise WireError("no CONNECT")
    connect = parse_connect(packet)
    if connect.client_id:
        return connect
    if not connect.clean_session:
        raise Refused(IDENTIFIER_REJECTED, "an empty client id asks for a persistent session")
    return Connect(f"auto-{secrets.token_hex(12)}", True, connect.keep_alive, connect.username,
                   connect.password, connect.will)
