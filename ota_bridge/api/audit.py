"""The audit log's two ends: what records every state-changing request, and GET /v1/audit.

Each POST, PATCH, PUT or DELETE (anything but GET, HEAD and OPTIONS) is recorded once its answer
is known, refusals (401, 403, any 4xx) included: the token's name and role, the client's address,
method, path, the id it acted on, the status and a short outcome (the error's title). Neither the
body nor the token is ever recorded, so no secret reaches the log. The row is one insert on the
store's thread; if it fails the answer still goes out, and the failure is logged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from agent.protocol import format_time

from ..store import audit
from ..store.audit import AuditRecord, AuditView
from ..store.tokens import TokenIdentity
from .views import STORE, page

log = logging.getLogger(__name__)

CALLER = web.RequestKey("caller", TokenIdentity)  # set by the auth check (check_caller) for a valid token
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CREATED_ID_FIELDS = ("WorkflowId", "JobId", "DeviceId", "WebhookId", "ArtifactId")  # what a POST without {id} made


async def audit_request(request: web.Request, response: web.StreamResponse) -> None:
    """Record a request once its answer is known, if it is not read-only (the API middleware asks)."""
    if request.method not in READ_ONLY_METHODS:
        try:
            await request.app[STORE].call(audit.record, _record(request, response))
        except Exception:  # the change is made; the answer must still go out
            log.exception("could not write the audit log for %s %s (status %s)", request.method, request.path,
                          response.status)


def _record(request: web.Request, response: web.StreamResponse) -> AuditRecord:
    caller = request.get(CALLER)
    body = _json_body(response)
    return AuditRecord(
        token_name=caller.name if caller else None,
        role=caller.role.value if caller else None,
        remote=(request.remote or "")[:64] or None,
        method=request.method[:16],
        path=request.path[:300],
        target_id=_target(request, response, body),
        status=response.status,
        outcome="ok" if response.status < 400 else str(body.get("Error", response.reason))[:100],
    )


def _target(request: web.Request, response: web.StreamResponse, body: dict[str, Any]) -> str | None:
    if "id" in request.match_info:
        return request.match_info["id"][:128]
    if response.status < 400:
        found = next((body[f] for f in CREATED_ID_FIELDS if isinstance(body.get(f), str)), None)
        return found[:128] if found else None
    return None


def _json_body(response: web.StreamResponse) -> dict[str, Any]:
    raw = response.body if isinstance(response, web.Response) else None
    if not isinstance(raw, bytes):
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def list_audit(request: web.Request) -> web.Response:
    """GET /v1/audit: the log, newest first, paged like GET /v1/job."""
    entries, total = await request.app[STORE].call(audit.list_entries, *page(request))
    return web.json_response([_entry(e) for e in entries], headers={"X-Total-Count": str(total)})


def _entry(view: AuditView) -> dict[str, Any]:
    r = view.record
    return {"Time": format_time(view.time), "TokenName": r.token_name, "Role": r.role, "Remote": r.remote,
            "Method": r.method, "Path": r.path, "TargetId": r.target_id, "Status": r.status, "Outcome": r.outcome}
