"""One middleware turns every error into JSON {"Error": ..., "Detail": ...} with its status code."""

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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OtaBridgeError as e:
        retry_after = getattr(e, "retry_after", None)
        return error_response(e.status, e.title, e.detail, {"Retry-After": str(retry_after)} if retry_after else None)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "Body too large", f"the request body is over the limit of {MAX_BODY_BYTES} "
                                                     f"bytes ({MAX_BODY_BYTES // 1024 // 1024} MiB)")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        detail = f"{request.method} {request.path}: {e.reason}"
        return error_response(e.status, e.reason, detail)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "Internal error", "the server failed; its log has the details")
