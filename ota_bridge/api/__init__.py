"""The REST API (aiohttp): SocketXP-compatible workflows and jobs, plus devices."""

from __future__ import annotations

import logging

from aiohttp import web

from .. import store
from ..dispatch import Dispatcher
from ..errors import Unauthorized
from ..signing import JobSigner
from .body import MAX_BODY_BYTES
from .errors import Handler, error_middleware
from .views import DISPATCHER, SIGNER, STORE, routes

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/v1/health"})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send the header 'Authorization: Bearer <token>'")
        if not await request.app[STORE].call(store.check_token, token.strip()):
            log.warning("refused an unknown API token from %s for %s %s", request.remote, request.method, request.path)
            raise Unauthorized("the API token is not valid")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    link = request.app[DISPATCHER].link
    broker = link is not None and link.connected.is_set()
    return web.json_response({"Status": "ok", "BrokerConnected": broker})


def make_app(db: store.Store, dispatcher: Dispatcher, signer: JobSigner) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES)
    app[STORE] = db
    app[DISPATCHER] = dispatcher
    app[SIGNER] = signer
    app.router.add_get("/v1/health", health)
    app.add_routes(routes)
    return app
