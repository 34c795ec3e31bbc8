"""The REST API (aiohttp): SocketXP-compatible workflows and jobs, plus devices and the audit log."""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web

from ..dispatch import Dispatcher
from ..errors import Forbidden, Unauthorized
from ..roles import Role, needed_role
from ..signing import JobSigner
from ..store import Store
from ..store.tokens import TokenIdentity
from .artifacts import DEVICE_ARTIFACT_ROUTE
from .artifacts import routes as artifact_routes
from .audit import CALLER, audit_request, list_audit
from .body import MAX_BODY_BYTES
from .console import CONSOLE_PATHS
from .console import add_routes as add_console_routes
from .errors import Handler, error_answer
from .events import EVENTS_PATH, redeem_ticket
from .events import add_routes as add_event_routes
from .health import ALIVE_PATH, HEALTH_PATH, LIVE_PATH, READY_PATH
from .health import add_routes as add_health_routes
from .metrics import add_routes as add_metrics_routes
from .metrics import count_request
from .openapi import OPENAPI_PATH, serve_openapi
from .params import check_request_shape
from .tokens import TokenCache
from .views import DISPATCHER, SIGNER, STORE, add_held_gets, routes
from .webhooks import routes as webhook_routes

log = logging.getLogger(__name__)

# Routes that take no API token (by their canonical path): a device's artifact link is its own credential.
PUBLIC_PATHS = frozenset({HEALTH_PATH, READY_PATH, LIVE_PATH, ALIVE_PATH, OPENAPI_PATH, DEVICE_ARTIFACT_ROUTE,
                          *CONSOLE_PATHS})
TOKENS = web.AppKey("tokens", TokenCache)
MAX_TOKEN_CHARS = 1024  # tokens made here have 43; a longer one is refused before it is hashed
TOKEN_CHARS = re.compile(r"[!-~]+")  # printable ASCII, no spaces or control characters


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request, in one layer (one coroutine instead of five), outermost first: counted by
    route and status (metrics), audited once answered if it changes state (audit), its errors
    answered as JSON (errors), its token and role checked (auth), its path id and body checked (params)."""
    started = time.perf_counter()
    status = 500
    try:
        try:
            await check_caller(request)
            check_request_shape(request)
            response = await handler(request)
        except Exception as e:
            response = error_answer(request, e)
        await audit_request(request, response)
        status = response.status
        return response
    except web.HTTPException as e:  # a redirect, which error_answer raises again
        status = e.status
        raise
    finally:
        count_request(request, status, started)


async def check_caller(request: web.Request) -> None:
    """401 without a valid token; 403 when the token's role may not call the route (roles.NEEDS)."""
    if request.path not in PUBLIC_PATHS and _route(request) not in PUBLIC_PATHS:
        caller = await _identify(request)
        if caller is None:
            log.warning("refused an unknown API token from %s for %s %s", request.remote, request.method, request.path)
            raise Unauthorized("the API token is not valid")
        request[CALLER] = caller
        _check_role(request, caller.name, caller.role)


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


async def _identify(request: web.Request) -> TokenIdentity | None:
    """The bearer token's owner; for the event stream, which EventSource opens without headers, its ticket's."""
    if request.path == EVENTS_PATH:
        return await redeem_ticket(request)
    cache, header = request.app[TOKENS], request.headers.get("Authorization", "")
    return cache.remembered(header) or await cache.identify(bearer_token(header), header)


def _check_role(request: web.Request, name: str, role: Role) -> None:
    resource = request.match_info.route.resource
    if resource is None:  # no such route: the router answers 404 or 405
        return
    needed = needed_role(request.method, resource.canonical)
    if not role.allows(needed):
        operation = f"{request.method} {resource.canonical}"
        log.warning("refused %s %s to token %r (role %s) from %s", request.method, request.path, name, role.value,
                    request.remote)
        raise Forbidden(name, role.value, operation, [r.value for r in needed.holders()])


def bearer_token(header: str) -> str:
    """The token of an 'Authorization: Bearer <token>' header, or a 401 that says what is wrong with it."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"send the header 'Authorization: Bearer <token>' ({_what_came(header, scheme, token)})")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized(f"the API token is {len(token)} characters long; no API token is over {MAX_TOKEN_CHARS}")
    if not TOKEN_CHARS.fullmatch(token):
        raise Unauthorized("the API token has characters no API token has (spaces, control or non-ASCII characters)")
    return token


def _what_came(header: str, scheme: str, token: str) -> str:
    if not header.strip():
        return "the Authorization header is missing or empty"
    if scheme.lower() == "bearer":
        return "the token after 'Bearer' is empty"
    return f"got the scheme {scheme[:20]!r}" if token else "got a value with no scheme"


def make_app(db: Store, dispatcher: Dispatcher, signer: JobSigner) -> web.Application:
    app = web.Application(middlewares=[api_middleware], client_max_size=MAX_BODY_BYTES)
    app[STORE] = db
    app[DISPATCHER] = dispatcher
    app[SIGNER] = signer
    app[TOKENS] = TokenCache(db)
    add_health_routes(app)
    add_metrics_routes(app)
    app.router.add_get(OPENAPI_PATH, serve_openapi)
    app.router.add_get("/v1/audit", list_audit)
    app.add_routes(routes)
    add_held_gets(app)
    app.add_routes(webhook_routes)
    app.add_routes(artifact_routes)
    add_event_routes(app)
    add_console_routes(app)
    return app
