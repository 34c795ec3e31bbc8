"""Uploading and fetching artifacts over plain HTTP (urllib), as curl or a device would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlencode

from tests.support.processes import Api


@dataclass
class Answer:
    status: int
    body: bytes
    headers: Message  # case-insensitive: headers["etag"] finds ETag

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def send(url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Answer(resp.status, resp.read(), resp.headers)
    except urllib.error.HTTPError as e:
        with e:
            return Answer(e.code, e.read(), e.headers)


def multipart(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, value, filename) parts, in order; and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for name, value, filename in parts:
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        body += f"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream".encode() if filename else b""
        body += b"\r\n\r\n" + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def upload(api: Api, name: str, version: str, data: bytes, raw: bool = False, file_first: bool = False) -> Answer:
    """POST /v1/artifact as curl -F would (or a raw body with the fields in the query)."""
    auth = {"Authorization": f"Bearer {api.token}"}
    if raw:
        query = urlencode({"Name": name, "Version": version})
        return send(f"{api.base}/v1/artifact?{query}", "POST", data,
                    {**auth, "Content-Type": "application/octet-stream"})
    fields: list[tuple[str, bytes, str | None]] = [("Name", name.encode(), None), ("Version", version.encode(), None)]
    file = [("File", data, "upload.bin")]
    body, kind = multipart(file + fields if file_first else fields + file)
    return send(f"{api.base}/v1/artifact", "POST", body, {**auth, "Content-Type": kind})


def uploaded(api: Api, name: str, data: bytes, version: str = "1") -> dict[str, Any]:
    answer = upload(api, name, version, data)
    assert answer.status == 201, answer
    return answer.json


def get(api: Api, path: str, headers: dict[str, str] | None = None) -> Answer:
    return send(api.base + path, headers={"Authorization": f"Bearer {api.token}", **(headers or {})})
