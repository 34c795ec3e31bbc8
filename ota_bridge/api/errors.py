"""Every error as JSON {"Error": ..., "Detail": ...} with its status code (the API middleware asks)."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..errors import OtaBridgeError
from .body import MAX_BODY_BYTES

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, title: str, detail: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"Error": title, "Detail": detail}, status=status, headers=headers)


def error_answer(request: web.Request, error: Exception) -> web.Response:
    """The JSON answer for an error a request met; an HTTPException under 400 (a redirect) is raised again."""
    if isinstance(error, OtaBridgeError):
        retry_after = getattr(error, "retry_after", None)
        return error_response(error.status, error.title, error.detail,
                              {"Retry-After": str(retry_after)} if retry_after else None)
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return error_response(413, "Body too large", f"the request body is over the limit of {MAX_BODY_BYTES} "
                                                     f"bytes ({MAX_BODY_BYTES // 1024 // 1024} MiB)")
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        return error_response(error.status, error.reason, f"{request.method} {request.path}: {error.reason}")
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return error_response(500, "Internal error", "the server failed; its log has the details")
