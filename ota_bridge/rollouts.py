"""The release loop: every second, held (SCHEDULED) children that are due are released.

The decisions live in the database (store/rollouts.py); this loop only asks for them on the
service's clock (clock.py) and tells the dispatcher which queues changed. Every instance of a
cluster runs it: a release is a conditional UPDATE, so no child is released twice.
"""

from __future__ import annotations

import asyncio
import logging

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
        """Release every child due on the service's clock, one transaction per batch."""
        current = clock.now()
        while True:
            device_ids = await self.store.call(held.release_due, current)
            self.dispatcher.mark(device_ids)
            if not device_ids:
                return
