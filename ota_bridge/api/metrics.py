"""GET /metrics (Prometheus text format, a viewer token), and what counts every request."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from .. import metrics
from ..store import stats
from .views import DISPATCHER, STORE

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
READINGS = web.AppKey("readings", metrics.Readings)
UNMATCHED = "unmatched"  # the route label of a request that matched no route: one label, whatever the path


def count_request(request: web.Request, status: int, started: float) -> None:
    """Count an answer, errors and refusals included, by route (never by raw path); `started` is
    time.perf_counter() when the request came (the API middleware asks, outermost)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else UNMATCHED
    metrics.http_request(request.method, route, status, time.perf_counter() - started)


async def serve_metrics(request: web.Request) -> web.Response:
    readings = request.app[READINGS]
    if readings.stale():
        try:
            readings.remember(await request.app[STORE].call(readings.read_stats))
        except Exception as e:  # the scrape still answers, with database_up 0
            log.warning("reading the fleet figures for /metrics failed: %s", e)
            readings.remember(None)
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    dispatcher = app[DISPATCHER]

    def broker_connected() -> bool:
        link = getattr(dispatcher, "link", None)
        return link is not None and link.connected.is_set()

    readings = metrics.Readings(stats.fleet_stats, broker_connected)
    app[READINGS] = readings
    metrics.watch(readings)
    app.router.add_get(METRICS_PATH, serve_metrics)
