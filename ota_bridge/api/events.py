"""Live changes for the web console: a server-sent event stream, opened with a one-use ticket.

EventSource cannot send an Authorization header, and the long-lived token must never go in a URL,
so a page first asks POST /v1/events/ticket (with its token) for a ticket valid TICKET_SECONDS,
and opens GET /v1/events?Ticket=... with it. A ticket is signed with the hash of the token that
asked for it (any instance sharing the database can check it; revoking the token voids it) and is
used once per instance.

The events come from the database, not from this process, so every instance sees every change:
one poller per process reads what changed every POLL_SECONDS while a stream is open
(store/changes.py) and sends each open stream compact events; the page then reads what it shows
through the REST API. Events: `job` {JobId} for a new job, `child` {JobId, ParentJobId, DeviceId,
Status} for a child job that changed, `device` {DeviceId, Online, LastSeen} for a device whose
presence changed, and `resync` {} when more changed at once than is sent row by row (re-read all).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from agent.protocol import format_time

from ..errors import Unauthorized
from ..models import now
from ..store import Store, StoreUnavailable, changes
from ..store import tokens as stored_tokens
from ..store.tokens import TokenIdentity
from .audit import CALLER
from .params import query
from .views import STORE

log = logging.getLogger(__name__)

EVENTS_PATH = "/v1/events"
TICKET_PATH = "/v1/events/ticket"
TICKET_SECONDS = 30
POLL_SECONDS = 0.5
PRESENCE_EVERY = 4  # polls: presence is read whole, so less often (every 2 s)
OVERLAP = timedelta(seconds=2)  # re-read this far back: rows written late by another instance or clock
HEARTBEAT_SECONDS = 15
MAX_BACKLOG = 5000  # events a slow stream may fall behind before it is closed (the page reconnects)


# --- tickets --------------------------------------------------------------------------------


def _mac(token_hash: str, body: str) -> str:
    digest = hmac.new(token_hash.encode(), body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class Tickets:
    used: dict[str, float] = field(default_factory=dict)  # nonce -> expiry, this process's redeemed tickets

    def issue(self, caller: TokenIdentity) -> str:
        body = f"{caller.token_hash[:16]}.{int(time.time()) + TICKET_SECONDS}.{secrets.token_urlsafe(16)}"
        return f"{body}.{_mac(caller.token_hash, body)}"

    def redeem(self, ticket: str, identities: list[TokenIdentity]) -> TokenIdentity:
        """The token a valid, unexpired, unused ticket stands for; marks it used."""
        prefix, expires, nonce, mac = (ticket.split(".") + ["", "", "", ""])[:4]
        if not expires.isdigit() or not int(expires) >= time.time():
            raise Unauthorized(f"the event stream's ticket is malformed or expired; get a new one with "
                               f"POST {TICKET_PATH} (each is valid {TICKET_SECONDS} s, once)")
        body = f"{prefix}.{expires}.{nonce}"
        for identity in identities:
            if identity.token_hash.startswith(prefix) and hmac.compare_digest(_mac(identity.token_hash, body), mac):
                self._use(nonce, float(expires))
                return identity
        raise Unauthorized(f"the event stream's ticket is not valid (or its token was revoked); "
                           f"get one with POST {TICKET_PATH}")

    def _use(self, nonce: str, expires: float) -> None:
        moment = time.time()
        self.used = {n: e for n, e in self.used.items() if e >= moment}
        if nonce in self.used:
            raise Unauthorized(f"the event stream's ticket was used already; get a new one with POST {TICKET_PATH}")
        self.used[nonce] = expires


TICKETS = web.AppKey("event_tickets", Tickets)


async def redeem_ticket(request: web.Request) -> TokenIdentity:
    """The caller of GET /v1/events, by the ticket in its query (the auth check asks)."""
    ticket = query(request, ("Ticket",)).get("Ticket")
    if not ticket:
        raise Unauthorized(f"{EVENTS_PATH} takes no token: send ?Ticket= with a ticket from POST {TICKET_PATH}")
    identities = await request.app[STORE].call(stored_tokens.token_identities)
    return request.app[TICKETS].redeem(ticket[:300], identities)


async def issue_ticket(request: web.Request) -> web.Response:
    ticket = request.app[TICKETS].issue(request[CALLER])
    return web.json_response({"Ticket": ticket, "ExpiresInSeconds": TICKET_SECONDS})


# --- the change feed ------------------------------------------------------------------------


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class Cursor:
    """Where the poller has read to, and what it sent lately (a row re-read in the overlap is sent once)."""

    since: datetime
    sent: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    presence: dict[str, tuple[bool, datetime | None]] | None = None
    polls: int = 0

    def fresh(self, key: str, state: str, at: datetime) -> bool:
        if self.sent.get(key) == (state, at):
            return False
        self.sent[key] = (state, at)
        return True

    def advance(self, latest: datetime, overlap: bool = True) -> None:
        self.since = max(self.since, latest - OVERLAP if overlap else latest)
        self.sent = {k: v for k, v in self.sent.items() if v[1] > self.since}


def read_changes(cursor: Cursor) -> list[bytes]:
    """The events since the cursor (in the store's thread); moves the cursor on."""
    out: list[bytes] = []
    latest = cursor.since
    new_jobs = changes.new_jobs(cursor.since)
    for job_id, created in new_jobs:
        latest = max(latest, created)
        if cursor.fresh(job_id, "new", created):
            out.append(sse("job", {"JobId": job_id}))
    children, truncated = changes.child_changes(cursor.since)
    for c in children:
        latest = max(latest, c.updated)
        if cursor.fresh(c.job_id, c.status, c.updated):
            out.append(sse("child", {"JobId": c.job_id, "ParentJobId": c.parent_id, "DeviceId": c.device_id,
                                     "Status": c.status}))
    if cursor.polls % PRESENCE_EVERY == 0:
        out.extend(_presence_changes(cursor))
    cursor.polls += 1
    burst = truncated or len(new_jobs) == changes.MAX_ROWS
    if burst:  # the page re-reads what it shows instead; the next poll starts after the burst
        out.append(sse("resync", {}))
    cursor.advance(latest, overlap=not burst)
    return out


def _presence_changes(cursor: Cursor) -> list[bytes]:
    current, before = changes.presence(), cursor.presence
    cursor.presence = current
    if before is None:
        return []
    return [sse("device", {"DeviceId": d, "Online": online, "LastSeen": format_time(seen)})
            for d, (online, seen) in current.items() if before.get(d) != (online, seen)]


class ChangeFeed:
    """One poller per process, running while at least one stream is open."""

    def __init__(self) -> None:
        self.streams: set[asyncio.Queue[bytes | None]] = set()
        self.task: asyncio.Task[None] | None = None

    def subscribe(self, db: Store) -> asyncio.Queue[bytes | None]:
        stream: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=MAX_BACKLOG)
        self.streams.add(stream)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._poll(db))
        return stream

    def unsubscribe(self, stream: asyncio.Queue[bytes | None]) -> None:
        self.streams.discard(stream)
        if not self.streams and self.task is not None:
            self.task.cancel()
            self.task = None

    async def close(self, _app: web.Application | None = None) -> None:
        for stream in list(self.streams):
            self._end(stream)
        if self.task is not None:
            self.task.cancel()

    def _end(self, stream: asyncio.Queue[bytes | None]) -> None:
        self.streams.discard(stream)
        while True:  # make room for the end mark
            try:
                stream.put_nowait(None)
                return
            except asyncio.QueueFull:
                stream.get_nowait()

    async def _poll(self, db: Store) -> None:
        cursor = Cursor(since=now() - OVERLAP)
        while True:
            try:
                events = await db.call(read_changes, cursor)
            except StoreUnavailable as e:
                log.warning("the event stream could not read changes: %s", e)
                events = []
            for stream in list(self.streams):
                self._send(stream, events)
            await asyncio.sleep(POLL_SECONDS)

    def _send(self, stream: asyncio.Queue[bytes | None], events: list[bytes]) -> None:
        try:
            for event in events:
                stream.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("closed an event stream that fell %d events behind", MAX_BACKLOG)
            self._end(stream)


FEED = web.AppKey("change_feed", ChangeFeed)


async def stream_events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    feed = request.app[FEED]
    stream = feed.subscribe(request.app[STORE])
    with contextlib.suppress(ConnectionResetError):
        try:
            await response.write(b"retry: 3000\n" + sse("ready", {}))
            while (event := await _next(stream)) is not None:
                await response.write(event)
        finally:
            feed.unsubscribe(stream)
    return response


async def _next(stream: asyncio.Queue[bytes | None]) -> bytes | None:
    try:
        return await asyncio.wait_for(stream.get(), HEARTBEAT_SECONDS)
    except asyncio.TimeoutError:
        return b": still here\n\n"


def add_routes(app: web.Application) -> None:
    app[TICKETS] = Tickets()
    app[FEED] = ChangeFeed()
    app.on_shutdown.append(app[FEED].close)
    app.router.add_post(TICKET_PATH, issue_ticket)
    app.router.add_get(EVENTS_PATH, stream_events, allow_head=False)  # a HEAD would hold a stream open
