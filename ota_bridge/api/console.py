"""The web console: its three files at / (public: the page asks for a token and keeps it in the
browser's session storage), and the one read it needs beyond the SocketXP API, a device's queue.

The files are package data (ota_bridge/console/), hand-written, with no build step; they load
nothing from anywhere else, and a strict Content-Security-Policy keeps it so.
"""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

from agent.protocol import format_time

from ..errors import DeviceNotFound
from ..store import devices, queues
from .views import STORE

# path -> (file in ota_bridge/console/, content type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}
CONSOLE_PATHS = frozenset(FILES)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _file(name: str) -> bytes:
    return resources.files("ota_bridge.console").joinpath(name).read_bytes()


async def serve_file(request: web.Request) -> web.Response:
    name, content_type = FILES[request.match_info.route.resource.canonical]
    return web.Response(body=_file(name), headers={**SECURITY_HEADERS, "Content-Type": content_type})


async def device_queue(request: web.Request) -> web.Response:
    """A device's pending jobs in the order it runs them, head first (the first QUEUE_LIST_LIMIT)."""
    device_id = request.match_info["id"]
    db = request.app[STORE]
    if not await db.call(devices.device_exists, device_id):
        raise DeviceNotFound(device_id)
    (queue,) = await db.call(queues.device_queues, [device_id])
    jobs = [{"JobId": e.job_id, "ParentJobId": e.parent_id, "JobName": e.name, "Command": e.command,
             "Status": e.status, "Seq": e.seq, "CreatedTime": format_time(e.submitted),
             **({"Reason": e.reason} if e.held else {})} for e in queue.entries]
    return web.json_response({"DeviceId": device_id, "Total": queue.total, "Jobs": jobs})


def add_routes(app: web.Application) -> None:
    for path in FILES:
        app.router.add_get(path, serve_file)
    app.router.add_get("/v1/device/{id}/queue", device_queue)



