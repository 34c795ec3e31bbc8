"""Path ids and query parameters: their shapes, checked before any handler runs or reads the store.

The OpenAPI document (openapi.py) reads the same patterns, so what it promises is what is enforced.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

from aiohttp import web

from agent.protocol import DEVICE_ID_PATTERN

from ..errors import InvalidRequest, OtaBridgeError

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
UUID_EXAMPLE = "231ec702-5f6e-4b4d-9c1a-0d2c8e3f4a5b"
# The {id} under /v1/<kind>/ has the shape of that kind's ids: (pattern, how a person would say it).
PATH_ID_SHAPES: dict[str, tuple[str, str]] = {
    "workflow": (UUID_PATTERN, f"UUIDs in lowercase hex, like {UUID_EXAMPLE}"),
    "job": (UUID_PATTERN, f"UUIDs in lowercase hex, like {UUID_EXAMPLE}"),
    "webhook": (UUID_PATTERN, f"UUIDs in lowercase hex, like {UUID_EXAMPLE}"),
    "artifact": (UUID_PATTERN, f"UUIDs in lowercase hex, like {UUID_EXAMPLE}"),
    "device": (f"^{DEVICE_ID_PATTERN}$", "1 to 128 of A-Z a-z 0-9 . _ : -, starting with a letter or digit"),
}
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE"})
WHOLE_NUMBER = re.compile(r"[0-9]{1,10}")


class MalformedId(OtaBridgeError):
    """A path id that cannot name anything: 404, like any id that names nothing, saying why."""

    status = 404
    title = "Not found"


def id_kind(canonical_path: str) -> str | None:
    """The kind of id a route's {id} holds: 'job' for '/v1/job/{id}/childjobs'."""
    parts = canonical_path.split("/")
    return parts[2] if "{id}" in parts and len(parts) > 2 else None


def check_request_shape(request: web.Request) -> None:
    """Refuse a body where the method takes none, and a path id of the wrong shape (before the handler runs)."""
    if request.method in BODYLESS_METHODS and request.body_exists:
        raise InvalidRequest(f"{request.method} requests take no body; send the request without one")
    resource = request.match_info.route.resource
    kind = _shaped_kind(resource.canonical) if resource is not None else None
    if kind is not None:
        _check_id(kind, request.match_info["id"])


@functools.cache
def _shaped_kind(canonical_path: str) -> str | None:
    """The kind of id a route's {id} holds, if PATH_ID_SHAPES has its shape; once per route."""
    kind = id_kind(canonical_path)
    return kind if kind in PATH_ID_SHAPES else None


_ID_PATTERNS = {kind: re.compile(pattern) for kind, (pattern, _) in PATH_ID_SHAPES.items()}


def _check_id(kind: str, value: str) -> None:
    _, shape = PATH_ID_SHAPES[kind]
    if not _ID_PATTERNS[kind].fullmatch(value):
        raise MalformedId(f"{_shown(value)!r} is not a {kind} id, so no such {kind} exists: {kind} ids are {shape}")


def _shown(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def query(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    """The query parameters a handler takes, by their canonical names (any letter case is accepted).

    An unknown parameter or one given twice is a 400, so a typo never goes unnoticed.
    """
    canonical = {name.lower(): name for name in names}
    found: dict[str, str] = {}
    for key, value in request.query.items():
        name = canonical.get(key.lower())
        if name is None:
            raise InvalidRequest(f"unknown query parameter {_shown(key, 40)!r}; this endpoint takes "
                                 f"{', '.join(names)}")
        if name in found:
            raise InvalidRequest(f"query parameter {name} is given more than once")
        found[name] = value
    return found


def whole_number(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not WHOLE_NUMBER.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"query parameter {name} must be a whole number from {low} to {high}, "
                             f"got {_shown(raw, 40)!r}")
    return int(raw)
