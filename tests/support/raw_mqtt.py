"""MQTT 3.1.1 by hand over a plain socket, for tests that must send what no client library would.

Packets are built byte by byte (a CONNECT with any client id, credentials, will and clean flag;
SUBSCRIBE; PUBLISH, or just a PUBLISH's fixed header claiming any length) and every read is
bounded by a timeout, so a broker that hangs fails the test instead of the suite.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 2, 3, 4, 9, 13


def remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


@dataclass(frozen=True)
class Will:
    topic: str
    message: bytes = b""
    qos: int = 1
    retain: bool = True


def connect_packet(client_id: str, username: str | None = None, password: str | None = None, *,
                   clean: bool = True, will: Will | None = None, keep_alive: int = 60) -> bytes:
    flags = clean << 1 | (username is not None) << 7 | (password is not None) << 6
    payload = _text(client_id)
    if will is not None:
        flags |= 0x04 | will.qos << 3 | will.retain << 5
        payload += _text(will.topic) + _text(will.message)
    if username is not None:
        payload += _text(username)
    if password is not None:
        payload += _text(password)
    body = _text("MQTT") + bytes((4, flags)) + struct.pack("!H", keep_alive) + payload
    return b"\x10" + remaining_length(len(body)) + body


def subscribe_packet(topic: str, qos: int = 1, packet_id: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + _text(topic) + bytes((qos,))
    return b"\x82" + remaining_length(len(body)) + body


def publish_header(topic: str, payload_length: int, *, qos: int = 0, retain: bool = False,
                   packet_id: int = 1) -> bytes:
    """A PUBLISH's fixed and variable header, for a payload of payload_length bytes to follow."""
    variable = _text(topic) + (struct.pack("!H", packet_id) if qos else b"")
    first = 0x30 | qos << 1 | retain
    return bytes((first,)) + remaining_length(len(variable) + payload_length) + variable


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 1) -> bytes:
    return publish_header(topic, len(payload), qos=qos, retain=retain, packet_id=packet_id) + payload


@dataclass(frozen=True)
class Packet:
    kind: int
    flags: int
    body: bytes

    def publish(self) -> tuple[str, bytes]:
        """(topic, payload) of a PUBLISH."""
        size = struct.unpack("!H", self.body[:2])[0]
        topic = self.body[2:2 + size].decode()
        skip = 2 + size + (2 if self.flags & 0x06 else 0)
        return topic, self.body[skip:]


class Closed(Exception):
    """The broker closed the connection."""


class RawClient:
    """One TCP connection to a broker; the caller sends raw packets and reads what comes back."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.session_present = False  # from the CONNACK
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str, username: str | None = None, password: str | None = None, *,
                clean: bool = True, will: Will | None = None, keep_alive: int = 60) -> int | None:
        """Send a CONNECT; the CONNACK's return code, or None when the broker closed without one."""
        self.send(connect_packet(client_id, username, password, clean=clean, will=will, keep_alive=keep_alive))
        try:
            packet = self.read(CONNACK)
        except Closed:
            return None
        self.session_present = bool(packet.body[0] & 1)
        return packet.body[1]

    def subscribe(self, topic: str, qos: int = 1) -> int:
        self.send(subscribe_packet(topic, qos))
        return self.read(SUBACK).body[2]

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        self.send(publish_packet(topic, payload, qos=qos, retain=retain))
        if qos:
            self.read(PUBACK)

    def alive(self) -> bool:
        """Whether the broker still answers a PINGREQ on this connection."""
        try:
            self.send(b"\xc0\x00")
            self.read(PINGRESP)
        except (Closed, OSError):
            return False
        return True

    def messages(self, wait: float) -> list[tuple[str, bytes]]:
        """Every PUBLISH (topic, payload) that arrives within wait seconds, acknowledged."""
        got, deadline = [], time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                packet = self.read(PUBLISH, timeout=left)
            except (socket.timeout, Closed):
                break
            got.append(packet.publish())
        return got

    def closed_by_broker(self, timeout: float = 10) -> bool:
        """Whether the broker closes this connection within timeout seconds (what it sends is skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False

    def read(self, kind: int, timeout: float | None = None) -> Packet:
        """The next packet of this kind (others are skipped; QoS 1 PUBLISHes are acknowledged)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            packet = self._next_packet(deadline)
            if packet.kind == PUBLISH and packet.flags & 0x02:
                size = struct.unpack("!H", packet.body[:2])[0]
                self.send(b"\x40\x02" + packet.body[2 + size:4 + size])
            if packet.kind == kind:
                return packet

    def _next_packet(self, deadline: float) -> Packet:
        first = self._take(1, deadline)[0]
        length, shift = 0, 0
        while True:
            byte = self._take(1, deadline)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return Packet(first >> 4, first & 0x0F, self._take(length, deadline))

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self._buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no packet in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self._buffer)))
            except ConnectionError as e:
                raise Closed(str(e)) from e
            if not chunk:
                raise Closed("the broker closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def close(self) -> None:
        self.sock.close()
