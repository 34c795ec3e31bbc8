"""The API's one middleware (ota_bridge/api/__init__.py): its concerns in their order, on a real
aiohttp server and a real SQLite store. A handler that fails unexpectedly is answered as JSON 500,
that answer is what the audit log records and what the request metrics count; a refused token
never reaches the handler; a malformed id is refused after the token is checked."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from ota_bridge import metrics
from ota_bridge.api import TOKENS, api_middleware, make_app
from ota_bridge.api.tokens import TokenCache
from ota_bridge.api.views import STORE
from ota_bridge.roles import Role
from ota_bridge.store import Store, audit, tokens

JOB = "231ec702-5f6e-4b4d-9c1a-0d2c8e3f4a5b"


def _count(method: str, route: str, status: str) -> float:
    return metrics.REGISTRY.get_sample_value("ota_bridge_http_requests_total",
                                             {"method": method, "route": route, "status": status}) or 0.0


async def _serve(store: Store, calls: list[str]) -> tuple[TestServer, str]:
    async def failing(request: web.Request) -> web.Response:
        calls.append(request.match_info["id"])
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[api_middleware])
    app[STORE] = store
    app[TOKENS] = TokenCache(store)
    app.router.add_post("/v1/job/{id}/cancel", failing)
    server = TestServer(app)
    await server.start_server()
    return server, await store.call(tokens.create_token, "ops", Role.OPERATOR)


def test_each_concern_of_the_one_middleware_in_its_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ota.db'}")
    calls: list[str] = []
    route = "/v1/job/{id}/cancel"

    async def main() -> list[Any]:
        server, token = await _serve(store, calls)
        try:
            async with ClientSession(str(server.make_url("/"))) as client:
                answers = []
                for headers, job in (({"Authorization": f"Bearer {token}"}, JOB), ({}, JOB),
                                     ({"Authorization": f"Bearer {token}"}, "not-a-uuid")):
                    async with client.post(f"/v1/job/{job}/cancel", headers=headers) as response:
                        answers.append((response.status, await response.json()))
                return answers
        finally:
            await server.close()

    before = {status: _count("POST", route, status) for status in ("500", "401", "404")}
    try:
        with caplog.at_level(logging.ERROR, logger="ota_bridge.api.errors"):
            failed, refused, malformed = asyncio.run(main())
        entries, total = asyncio.run(store.call(audit.list_entries, 10, 0))
    finally:
        store.close()
    assert failed == (500, {"Error": "Internal error", "Detail": "the server failed; its log has the details"})
    assert "unhandled error in POST" in caplog.text and "RuntimeError: a bug" in caplog.text
    assert refused[0] == 401 and refused[1]["Error"] == "Unauthorized", refused
    assert malformed[0] == 404 and "is not a job id" in malformed[1]["Detail"], malformed
    assert calls == [JOB], "only the request with a valid token and a well-formed id reaches the handler"
    assert {status: _count("POST", route, status) - before[status] for status in before} == \
        {"500": 1, "401": 1, "404": 1}
    assert total == 3
    by_status = {e.record.status: e.record for e in entries}
    assert by_status[500].outcome == "Internal error" and by_status[500].token_name == "ops"
    assert by_status[500].target_id == JOB
    assert by_status[401].token_name is None and by_status[401].outcome == "Unauthorized"


def test_the_job_poll_is_the_first_route_tried_under_v1_job() -> None:
    """aiohttp tries the resources that share a path's static prefix in the order they were added:
    GET /v1/job/{id}, the most frequent call, is tried first (no other resource's match before it)."""
    app = make_app(SimpleNamespace(), SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
    under_jobs = [r for r in app.router.resources() if r.canonical.startswith("/v1/job")]
    assert under_jobs[0].canonical == "/v1/job/{id}" and "GET" in {route.method for route in under_jobs[0]}
