"""POST, GET and DELETE /v1/webhook (admin): the URLs told when jobs end (ota_bridge/webhooks.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent.protocol import format_time

from ..store import webhooks
from ..store.webhooks import WebhookView
from .body import read_model
from .schemas import WebhookIn
from .views import STORE

routes = web.RouteTableDef()


@routes.post("/v1/webhook")
async def create_webhook(request: web.Request) -> web.Response:
    body = await read_model(request, WebhookIn)
    view, secret = await request.app[STORE].call(webhooks.create_webhook, body.Url)
    return web.json_response({**_webhook(view), "Secret": secret}, status=201)


@routes.get("/v1/webhook")
async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response([_webhook(v) for v in await request.app[STORE].call(webhooks.list_webhooks)])


@routes.delete("/v1/webhook/{id}")
async def delete_webhook(request: web.Request) -> web.Response:
    webhook_id = request.match_info["id"]
    await request.app[STORE].call(webhooks.delete_webhook, webhook_id)
    return web.json_response({"WebhookId": webhook_id, "Deleted": True})


def _webhook(view: WebhookView) -> dict[str, Any]:
    return {"WebhookId": view.webhook_id, "Url": view.url, "CreatedTime": format_time(view.created),
            "PendingDeliveries": view.pending, "FailedDeliveries": view.failed, "LastError": view.last_error}
