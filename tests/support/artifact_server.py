"""A real HTTP server for the agent's download tests, in a thread: it serves files with Range
support, records each request's path and Range header, and can be told to misbehave.

- `cut_after = N` (with `cuts = K`): the next K responses stop after N bytes of body and the
  connection closes, as a flaky link would cut it;
- `ignore_range = True`: answers 200 with the whole file whatever the Range;
- `refuse = 403`: answers every request with that status;
- `trickle = S`: sleeps S seconds between 64 KiB chunks, so a download is still running when a
  test acts on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Seen:
    path: str
    range: str | None


class ArtifactServer:
    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.requests: list[Seen] = []
        self.cut_after: int | None = None
        self.cuts = 0
        self.ignore_range = False
        self.refuse: int | None = None
        self.trickle = 0.0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name: str, path: Path) -> str:
        """Serve the file at /name; its URL."""
        self.files["/" + name] = path
        return f"{self.base_url}/{name}"

    def take_cut(self) -> int | None:
        """The body cap for the response being made, if a cut is still due."""
        with self._lock:
            if self.cut_after is None or self.cuts <= 0:
                return None
            self.cuts -= 1
            return self.cut_after

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(server: ArtifactServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            server.requests.append(Seen(self.path, self.headers.get("Range")))
            path = server.files.get(self.path)
            if server.refuse is not None or path is None:
                self.send_error(server.refuse or 404)
                return
            size = path.stat().st_size
            first = _range_start(self.headers.get("Range"))
            if first is not None and not server.ignore_range and first >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            partial = first is not None and not server.ignore_range
            first = first if partial else 0
            self.send_response(206 if partial else 200)
            if partial:
                self.send_header("Content-Range", f"bytes {first}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - first))
            self.end_headers()
            self._send_body(path, first, server.take_cut())

        def _send_body(self, path: Path, first: int, cap: int | None) -> None:
            left = cap if cap is not None else None
            with open(path, "rb") as f, contextlib.suppress(OSError):
                f.seek(first)
                while chunk := f.read(CHUNK if left is None else min(CHUNK, left)):
                    self.wfile.write(chunk)
                    if left is not None:
                        left -= len(chunk)
                    if server.trickle:
                        time.sleep(server.trickle)
            self.close_connection = True

    return Handler


def _range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes=([0-9]+)-", value or "")
    return int(match.group(1)) if match else None


def make_file(path: Path, size: int, seed: bytes = b"artifact") -> str:
    """Write `size` pseudo-random bytes to path, a MiB at a time; their SHA-256 hex."""
    hasher = hashlib.sha256()
    block = hashlib.sha512(seed).digest() * (1024 * 1024 // 64)
    with open(path, "wb") as f:
        written, counter = 0, 0
        while written < size:
            chunk = (counter.to_bytes(8, "big") + block)[: min(len(block), size - written)]
            f.write(chunk)
            hasher.update(chunk)
            written += len(chunk)
            counter += 1
    return hasher.hexdigest()


@contextlib.contextmanager
def artifact_server() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    try:
        yield server
    finally:
        server.close()
