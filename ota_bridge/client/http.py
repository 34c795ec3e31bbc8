"""The one place that talks HTTP to the service.

The stdlib's urllib, not aiohttp's client: the CLI makes one blocking request at a time, so an event
loop per command buys nothing, and urllib takes an ssl context for --ca-file just the same.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ..settings import ClientSettings, named
from . import ClientError, ServiceRefused, Unreachable

ADMIN_TOKEN_FILE = "admin-token"  # written by `ota-bridge serve` on its first start
TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Answer:
    body: Any
    headers: dict[str, str]


def path(*parts: str) -> str:
    """/v1/... with each part quoted, so an id can never reach another path."""
    return "/v1/" + "/".join(quote(p, safe="") for p in parts)


class ServiceClient:
    def __init__(self, config: ClientSettings) -> None:
        self.server = config.server
        self.token, self.token_source = _token(config)
        self.context = _tls_context(config.ca_file) if config.server.startswith("https:") else None

    def get(self, url: str, **query: object) -> Any:
        return self.get_answer(url, **query).body

    def get_answer(self, url: str, **query: object) -> Answer:
        """GET with its headers (X-Total-Count of a page); query values that are None are left out."""
        params = {k: v for k, v in query.items() if v is not None}
        return self.request("GET", url + (f"?{urlencode(params)}" if params else ""))

    def post(self, url: str, body: Any = None) -> Any:
        return self.request("POST", url, body).body

    def patch(self, url: str, body: Any) -> Any:
        return self.request("PATCH", url, body).body

    def delete(self, url: str) -> Any:
        return self.request("DELETE", url).body

    def request(self, method: str, url: str, body: Any = None) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        return self._send(method, url, data, {"Content-Type": "application/json"} if data is not None else {})

    def upload(self, url: str, file: Path) -> Any:
        """POST a file's bytes as they are read (never whole in memory), as application/octet-stream."""
        try:
            data = file.open("rb")
        except OSError as e:
            raise ClientError(f"cannot read {file}: {e.strerror or e}") from None
        with data:
            size = os.fstat(data.fileno()).st_size
            return self._send("POST", url, data, {"Content-Type": "application/octet-stream",
                                                  "Content-Length": str(size)}).body

    def _send(self, method: str, url: str, data: Any, headers: dict[str, str]) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **headers}
        req = urllib.request.Request(self.server + url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_SECONDS, context=self.context) as resp:
                answer = Answer(_json(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise Unreachable(self._unreachable(e)) from None
        if isinstance(answer.body, str):
            raise ClientError(f"{self.server} answered {method} {url} with something that is not JSON: "
                              f"is it an ota-bridge service? Set {named('server')}")
        return answer

    def _refused(self, e: urllib.error.HTTPError) -> ServiceRefused:
        body = _json(e.read())
        if isinstance(body, dict) and "Error" in body:
            error, detail = str(body["Error"]), str(body.get("Detail") or "")
        else:  # not the service's JSON: a proxy's page, aiohttp's plain-text 400, another server
            error, detail = f"HTTP {e.code} {e.reason}", _plain_line(body)
            detail = detail or f"not an answer of ota-bridge's; is {named('server')} right?"
        if e.code == 401:
            detail += f" (the token came from {self.token_source})"
        return ServiceRefused(e.code, error, detail)

    def _unreachable(self, e: Exception) -> str:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        where = f"cannot reach the service at {self.server}"
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"{where}: its certificate is not trusted ({reason.verify_message}); give {named('ca_file')}"
        if isinstance(reason, ssl.SSLError):
            return f"{where}: TLS failed ({reason.reason or reason}); is it http:// rather than https://?"
        if isinstance(reason, ConnectionRefusedError):
            return f"{where}: connection refused; is it running there? Set {named('server')}"
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"{where}: no answer within {TIMEOUT_SECONDS} s"
        if isinstance(reason, socket.gaierror):
            return f"{where}: unknown host; set {named('server')}"
        if isinstance(reason, (http.client.HTTPException, ConnectionResetError)):
            return f"{where}: it does not speak HTTP ({type(reason).__name__}); is {named('server')} right?"
        return f"{where}: {getattr(reason, 'strerror', None) or reason}; set {named('server')}"


def _token(config: ClientSettings) -> tuple[str, str]:
    if config.token:
        return config.token, config.token_source
    file = config.data_dir / ADMIN_TOKEN_FILE
    try:
        token = file.read_text().strip()
    except OSError as e:
        raise ClientError(f"no API token: give {named('token')}, or the {named('data_dir')} that holds "
                          f"{ADMIN_TOKEN_FILE} ({file}: {e.strerror})") from None
    if not token:
        raise ClientError(f"no API token: {file} is empty")
    return token, str(file)


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"cannot use {named('ca_file')} {ca_file}: {getattr(e, 'strerror', None) or e}") from None


def _plain_line(body: Any) -> str:
    """The first line of a plain-text body, short; nothing of an HTML page."""
    line = body.strip().splitlines()[0] if isinstance(body, str) and body.strip() else ""
    return "" if line.startswith("<") else line[:200]


def _json(raw: bytes) -> Any:
    text = raw.decode(errors="replace")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text
