"""MQTT 3.1.1 on the wire, as the broker's front reads it: packet framing and the CONNECT packet;
and the PUBLISH packet the core writes to a device itself (core._FastPath).

Plain stdlib; the front validates a client with these before amqtt sees a single byte of it.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from agent.protocol import MAX_STATUS_MESSAGE_BYTES

# The largest packet a client may send: the largest message the service accepts (1 MiB, as
# `message_size_limit` in the sample mosquitto.conf) plus room for its topic and headers.
MAX_PACKET_BYTES = MAX_STATUS_MESSAGE_BYTES + 64 * 1024
# A CONNECT carries ids, credentials and a small will; nothing larger is read from a stranger.
MAX_CONNECT_BYTES = 64 * 1024

CONNECT_TYPE = 1
PROTOCOL_LEVEL = 4  # MQTT 3.1.1, the only one amqtt speaks

# CONNACK return codes
UNACCEPTABLE_PROTOCOL, IDENTIFIER_REJECTED, NOT_AUTHORIZED = 0x01, 0x02, 0x05


class WireError(Exception):
    """The client broke MQTT (a malformed packet): close without an answer."""


class PacketTooLarge(WireError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a {size}-byte packet is over the limit of {limit} bytes")
        self.size, self.limit = size, limit


class Refused(Exception):
    """A well-formed CONNECT the broker answers with this CONNACK return code, then closes."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


async def read_packet(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One whole packet, fixed header included; None at an end of stream before its first byte.

    Raises PacketTooLarge from the fixed header alone, before any of the body is read, and
    asyncio.IncompleteReadError when the stream ends inside a packet.
    """
    first = await reader.read(1)
    if not first:
        return None
    header, length = bytearray(first), 0
    for shift in (0, 7, 14, 21):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise WireError("the remaining length runs over four bytes")
    if len(header) + length > limit:
        raise PacketTooLarge(len(header) + length, limit)
    return bytes(header) + await reader.readexactly(length)


class PacketFramer:
    """Whole packets cut from a stream read as it comes (up to CHUNK bytes at a time), each packet's
    size checked from its fixed header before it is waited for: read_packet's rules with one read
    for many small packets instead of three or four awaits for each."""

    CHUNK = 64 * 1024

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader, self._limit = reader, limit
        self._buffer = bytearray()

    async def next(self) -> bytes | None:
        """As read_packet: a whole packet; None at an end of stream between packets; raises
        PacketTooLarge (or WireError) from the fixed header, asyncio.IncompleteReadError at an end
        of stream inside a packet."""
        buffer = self._buffer
        while True:
            size = self._size()
            if size is not None and len(buffer) >= size:
                packet = bytes(buffer[:size])
                del buffer[:size]
                return packet
            chunk = await self._reader.read(self.CHUNK)
            if not chunk:
                if buffer:
                    raise asyncio.IncompleteReadError(bytes(buffer), None)
                return None
            buffer += chunk

    def _size(self) -> int | None:
        """The size of the packet at the buffer's start, once its fixed header is there."""
        buffer, length = self._buffer, 0
        for index, shift in ((1, 0), (2, 7), (3, 14), (4, 21)):
            if len(buffer) <= index:
                return None
            byte = buffer[index]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if index + 1 + length > self._limit:
                    raise PacketTooLarge(index + 1 + length, self._limit)
                return index + 1 + length
        raise WireError("the remaining length runs over four bytes")


def connack(code: int) -> bytes:
    return bytes((0x20, 2, 0, code))


@dataclass(frozen=True)
class Will:
    topic: str
    message: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connect:
    """A validated CONNECT; encode() is the canonical packet handed on to the broker."""

    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None
    password: str | None
    will: Will | None

    def encode(self) -> bytes:
        flags = (self.clean_session << 1 | (self.will is not None) << 2 | (self.password is not None) << 6
                 | (self.username is not None) << 7)
        payload = _text(self.client_id)
        if self.will is not None:
            flags |= self.will.qos << 3 | self.will.retain << 5
            payload += _text(self.will.topic) + _binary(self.will.message)
        if self.username is not None:
            payload += _text(self.username)
        if self.password is not None:
            payload += _text(self.password)
        body = _text("MQTT") + bytes((PROTOCOL_LEVEL, flags)) + struct.pack("!H", self.keep_alive) + payload
        return bytes((CONNECT_TYPE << 4,)) + remaining_length(len(body)) + body


def parse_connect(packet: bytes) -> Connect:
    """Read and check a CONNECT packet. Raises WireError, or Refused for a wrong protocol level."""
    if packet[0] != CONNECT_TYPE << 4:
        raise WireError(f"the first packet is of type {packet[0] >> 4} with flags {packet[0] & 15}, not a CONNECT")
    cursor = _Cursor(packet, header_length(packet))
    name, level, flags = cursor.text(), cursor.byte(), cursor.byte()
    if name != "MQTT" or level != PROTOCOL_LEVEL:
        if name in ("MQTT", "MQIsdp"):
            raise Refused(UNACCEPTABLE_PROTOCOL, f"protocol {name} level {level}; only MQTT 3.1.1 is spoken")
        raise WireError(f"unknown protocol name {name!r}")
    if flags & 0x01 or (not flags & 0x04 and flags & 0x38) or (flags >> 3 & 3) == 3 or (flags & 0xC0) == 0x40:
        raise WireError(f"invalid CONNECT flags {flags:#04x}")
    keep_alive = struct.unpack("!H", cursor.take(2))[0]
    client_id = cursor.text()
    will = Will(cursor.text(), cursor.binary(), flags >> 3 & 3, bool(flags & 0x20)) if flags & 0x04 else None
    username = cursor.text() if flags & 0x80 else None
    password = cursor.password() if flags & 0x40 else None
    cursor.end()
    return Connect(client_id, bool(flags & 0x02), keep_alive, username, password, will)


def header_length(packet: bytes) -> int:
    """A whole packet's fixed header's length: where its variable header starts."""
    index = 1
    while packet[index] & 0x80:
        index += 1
    return index + 1


class _Cursor:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise WireError("the CONNECT packet ends early")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def binary(self) -> bytes:
        return self.take(struct.unpack("!H", self.take(2))[0])

    def text(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError("a CONNECT string is not UTF-8") from e
        if "\x00" in text:
            raise WireError("a CONNECT string holds a NUL character")
        return text

    def password(self) -> str:
        """Passwords may be any bytes in MQTT; every secret here is text, so others never match."""
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def end(self) -> None:
        if self.offset != len(self.data):
            raise WireError(f"{len(self.data) - self.offset} bytes follow the CONNECT payload")


def _text(value: str) -> bytes:
    return _binary(value.encode("utf-8"))


def _binary(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def remaining_length(length: int) -> bytes:
    """A fixed header's remaining length field for length."""
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def publish_packet(topic: bytes, data: bytes | bytearray, qos: int, packet_id: int) -> bytes:
    """A PUBLISH (QoS 0 or 1, not retained, not DUP) of data on topic; packet_id only with QoS 1."""
    variable = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"")
    return bytes((0x30 | qos << 1,)) + remaining_length(len(variable) + len(data)) + variable + bytes(data)
