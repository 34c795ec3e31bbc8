"""A TCP proxy in front of an HTTP server that sees each request and can hold a response halfway.

`requests` lists, for every request through it, its request line and its Range header: what the
server behind it was asked. `hold(match, after)` makes the next response to a request whose
request line holds `match` stop after `after` bytes (headers included) until `release()`: the
client has part of the body and waits, as on a link that went quiet, so a test can act then
(kill the client). One request per connection, as urllib makes them. Unlike TcpProxy, the end of
a connection is passed on gracefully; cut() still resets what is open.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass

from tests.support.tcp_proxy import TcpProxy


@dataclass(frozen=True)
class Request:
    line: str
    range: str | None


class HttpTap(TcpProxy):
    def __init__(self, target_host: str, target_port: int) -> None:
        self.requests: list[Request] = []
        self._hold_match: str | None = None
        self._hold_after = 0
        self._held: set[socket.socket] = set()  # server sockets whose response is held
        self._released = threading.Event()
        super().__init__(target_host, target_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, match: str, after: int) -> None:
        self._hold_match, self._hold_after = match, after
        self._released.clear()

    def release(self) -> None:
        self._hold_match = None
        self._released.set()

    def close(self) -> None:
        self.release()
        super().close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            from_server = src.getpeername() == self.target
        except OSError:
            from_server = False
        if from_server:
            self._hold_response(src, dst)
        else:
            self._read_request(src, dst)
        self._forward(src, dst)

    @staticmethod
    def _forward(src: socket.socket, dst: socket.socket) -> None:
        """Copy to the end, then pass the end on gracefully (TcpProxy resets, which would drop the
        response's last bytes still on their way)."""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        src.close()

    def _read_request(self, client: socket.socket, server: socket.socket) -> None:
        """Forward the request head, noting its line and Range; mark the response to hold."""
        head = b""
        try:
            while b"\r\n\r\n" not in head and (data := client.recv(65536)):
                head += data
            text = head.decode("latin-1")
            line = text.split("\r\n", 1)[0]
            found = re.search(r"^Range: *(.*?)\r$", text, flags=re.M | re.I)
            self.requests.append(Request(line, found.group(1) if found else None))
            if self._hold_match is not None and self._hold_match in line:
                self._hold_match = None  # only the next such response
                self._held.add(server)
            server.sendall(head)
        except OSError:
            pass

    def _hold_response(self, server: socket.socket, client: socket.socket) -> None:
        """Forward the first bytes of a response, then, if it is held, wait for release(). Whether it
        is held is known once its first byte came: the request was marked before it was forwarded."""
        sent = 0
        try:
            while data := server.recv(65536 if server not in self._held else max(1, self._hold_after - sent)):
                client.sendall(data)
                sent += len(data)
                if server not in self._held:
                    return
                if sent >= self._hold_after:
                    self._released.wait(60)
                    return
        except OSError:
            return
