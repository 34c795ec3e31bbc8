"""The release loop: every second, held (SCHEDULED) children that are due are released, and
each active rollout decides what it releases, aborts or ends.

The decisions live in the database (store/rollouts.py); this loop only asks for them on the
service's clock (clock.py) and tells the dispatcher which queues changed. Every instance of a
cluster runs it: a release is a conditional UPDATE, so no child is released twice.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from . import clock
from .dispatch import Dispatcher
from .store import Store
from .store import rollouts as held

log = logging.getLogger(__name__)

RELEASE_INTERVAL = 1.0  # seconds between two rounds of release decisions


class Releaser:
    def __init__(self, store: Store, dispatcher: Dispatcher) -> None:
        self.store = store
        self.dispatcher = dispatcher

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_INTERVAL)
            try:
                await self.release_round()
            except Exception:
                log.exception("releasing held jobs failed; the next round tries again")

    async def release_round(self) -> None:
        """Release every child due on the service's clock, and what each active rollout decides,
        one transaction per batch."""
        current = clock.now()
        while True:
            device_ids = await self.store.call(held.release_due, current)
            self.dispatcher.mark(device_ids)
            if not device_ids:
                break
        for job_id in await self.store.call(held.active_rollouts):
            await self._advance(job_id, current)

    async def _advance(self, job_id: str, current: datetime) -> None:
        more = True
        while more:
            decided = await self.store.call(held.advance, job_id, current)
            known = {q.device_id for q in decided.queues}  # built by the decision: published as they are
            self.dispatcher.mark(d for d in decided.device_ids if d not in known)
            self.dispatcher.mark_read(decided.queues)
            more = decided.more
