"""Health checks for supervisors and load balancers: the database and the broker, each on its own.

`/v1/health` and `/readyz` answer 200 when both are usable and 503 when either is not, with a
body that says which. `/livez` (and its alias `/healthz`) answers 200 while the process serves HTTP at all: the service
recovers from database and broker outages by itself, so they are no reason to restart it.
These paths need no token, so their details name no hosts; the service's log has the causes.
"""

from __future__ import annotations

from aiohttp import web

from ..store import PROBE_SECONDS
from .views import DISPATCHER, STORE

HEALTH_PATH, READY_PATH, LIVE_PATH, ALIVE_PATH = "/v1/health", "/readyz", "/livez", "/healthz"
OK, UNAVAILABLE = "ok", "unavailable"


async def health(request: web.Request) -> web.Response:
    database = await _database(request)
    broker = _broker(request)
    ok = database["Status"] == broker["Status"] == OK
    body = {"Status": OK if ok else UNAVAILABLE, "Database": database, "Broker": broker,
            "BrokerConnected": broker["Status"] == OK}
    return web.json_response(body, status=200 if ok else 503)


async def live(_request: web.Request) -> web.Response:
    return web.json_response({"Status": OK})


async def _database(request: web.Request) -> dict[str, str]:
    problem = await request.app[STORE].unavailable()
    if problem is None:
        return {"Status": OK, "Detail": f"answered a query within {PROBE_SECONDS:g} s"}
    return {"Status": UNAVAILABLE, "Detail": problem}


def _broker(request: web.Request) -> dict[str, str]:
    link = request.app[DISPATCHER].link
    if link is not None and link.connected.is_set():
        return {"Status": OK, "Detail": "connected"}
    return {"Status": UNAVAILABLE, "Detail": "the service is not connected to the MQTT broker; it keeps trying"}


def add_routes(app: web.Application) -> None:
    for path in (HEALTH_PATH, READY_PATH):
        app.router.add_get(path, health)
    for path in (LIVE_PATH, ALIVE_PATH):
        app.router.add_get(path, live)
