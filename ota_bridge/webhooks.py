"""Webhook delivery: a signed POST to every registered URL when a job or child job ends.

The sender polls the database (store/webhooks.py): jobs that ended become deliveries in an
outbox table, which survive a restart and are shared by every instance on the database. Each
POST carries the event as JSON and these headers:

    X-Ota-Event: childjob.ended | job.ended
    X-Ota-Delivery: <a number, the same on every attempt of one delivery>
    X-Ota-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the webhook's secret>

Any 2xx answer is success. Otherwise (another status, a timeout, a refused connection) it is
tried again after 5 s, doubling up to an hour, 16 times in all (over about 6 hours), and
then kept as failed (GET /v1/webhook counts them). A receiver may see a delivery twice (a sender
that died after the POST and before recording it): X-Ota-Delivery tells.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from . import __version__, metrics
from .store import Store
from .store import webhooks as stored

log = logging.getLogger(__name__)

SIGNATURE_HEADER, EVENT_HEADER, DELIVERY_HEADER = "X-Ota-Signature", "X-Ota-Event", "X-Ota-Delivery"


@dataclass(frozen=True)
class Timing:
    poll_seconds: float = 1.0  # how often the database is asked for ended jobs and due deliveries
    settle_seconds: float = 2.0  # how long after its end a job is read (see store.webhooks.enqueue_ended)
    first_retry_seconds: float = 5.0
    max_retry_seconds: float = 3600.0
    max_attempts: int = 16
    request_seconds: float = 10.0  # one POST, connecting included
    batch: int = 20  # deliveries POSTed at once

    @property
    def lease_seconds(self) -> float:
        return self.request_seconds * 3


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Ota-Signature value: receivers compute the same HMAC and compare (docs/operations.md#webhooks)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def retry_delay(timing: Timing, attempts: int) -> float:
    """Seconds before the next try, after `attempts` failed ones (1 or more)."""
    return min(timing.first_retry_seconds * 2 ** (attempts - 1), timing.max_retry_seconds)


def shown(url: str) -> str:
    """The URL for logs: without a user name and password in it."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class WebhookSender:
    def __init__(self, db: Store, timing: Timing = Timing()) -> None:
        self.db, self.timing = db, timing

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timing.request_seconds)
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": f"ota-bridge/{__version__}"}) as s:
            while True:
                try:
                    await self.db.call(stored.enqueue_ended, self.timing.settle_seconds)
                    due = await self.db.call(stored.take_due, self.timing.batch, self.timing.lease_seconds)
                    await asyncio.gather(*(self._send(s, d) for d in due))
                except Exception as e:  # the database is away, say: the outbox waits
                    log.warning("webhook deliveries wait: %s", e)
                    due = []
                if len(due) < self.timing.batch:
                    await asyncio.sleep(self.timing.poll_seconds)

    async def _send(self, session: aiohttp.ClientSession, delivery: stored.Delivery) -> None:
        body = delivery.body.encode()
        headers = {"Content-Type": "application/json", EVENT_HEADER: json.loads(body)["Event"],
                   DELIVERY_HEADER: str(delivery.delivery_id),
                   SIGNATURE_HEADER: sign(delivery.secret, int(time.time()), body)}
        try:
            async with session.post(delivery.url, data=body, headers=headers, allow_redirects=False) as answer:
                error = None if 200 <= answer.status < 300 else f"answered HTTP {answer.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        await self._record(delivery, error)

    async def _record(self, delivery: stored.Delivery, error: str | None) -> None:
        attempts = delivery.attempts + 1
        if error is None:
            metrics.webhook_delivery("delivered")
            await self.db.call(stored.delivered, delivery.delivery_id)
        elif attempts >= self.timing.max_attempts:
            metrics.webhook_delivery("failed")
            log.error("webhook delivery %d to %s failed %d times, the last: %s; given up",
                      delivery.delivery_id, shown(delivery.url), attempts, error)
            await self.db.call(stored.give_up, delivery.delivery_id, error)
        else:
            metrics.webhook_delivery("retry")
            delay = retry_delay(self.timing, attempts)
            log.warning("webhook delivery %d to %s failed (%s); trying again in %.3g s",
                        delivery.delivery_id, shown(delivery.url), error, delay)
            await self.db.call(stored.retry_later, delivery.delivery_id, error, delay)
