"""Cluster mode: this instance's leases on device buckets, its membership, and word from the others.

Only the owner of a device's bucket publishes its head and queue, and only while its lease has
SAFETY_SECONDS or more left by its own clock (the lease was renewed at most RENEW_SECONDS ago, and
lasts LEASE_SECONDS from the moment the database renewed it, which is after this instance asked).
Another instance takes a bucket only once the database says its lease has expired, so two owners
never publish for one device at the same time. Docs: docs/scale.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from typing import Callable

from .store import Store, leases

log = logging.getLogger(__name__)

RENEW_SECONDS = 2.0
LEASE_SECONDS = 10.0
SAFETY_SECONDS = 4.0  # stop publishing this long before the lease could expire
NOTIFY_BATCH_SECONDS = 0.01


class Coordinator:
    def __init__(self, db: Store, instance_id: str) -> None:
        self.store = db
        self.instance_id = instance_id
        self.session = uuid.uuid4().hex
        self.owned: frozenset[int] = frozenset()
        self._valid_until = 0.0  # monotonic: publish for owned buckets until then
        self._members: list[tuple[str, str]] | None = None
        self._give_back: frozenset[int] = frozenset()  # above this instance's share: released next renewal
        self._outbox: dict[str, None] = {}
        self._outbox_ready = asyncio.Event()
        self._tick_now = asyncio.Event()
        self._stop_listening = threading.Event()
        # Set by the dispatcher: buckets gained (publish their devices), lost (forget them), the
        # members changed (publish every owned head again), devices named by another instance.
        self.on_gained: Callable[[frozenset[int]], None] = lambda buckets: None
        self.on_lost: Callable[[frozenset[int]], None] = lambda buckets: None
        self.on_members_changed: Callable[[], None] = lambda: None
        self.on_notified: Callable[[list[str]], None] = lambda ids: None

    def owns(self, device_id: str) -> bool:
        return time.monotonic() < self._valid_until and leases.bucket_of(device_id) in self.owned

    def tell_owners(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self._outbox[device_id] = None
        if self._outbox:
            self._outbox_ready.set()

    def new_session(self) -> None:
        """The broker connection started again (a clean session: messages in flight to us are gone)."""
        self.session = uuid.uuid4().hex
        self._tick_now.set()

    async def start(self) -> None:
        await self.store.call(leases.prepare)

    async def run_leases(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._tick(started)
            except Exception as e:
                log.error("renewing this instance's leases failed: %s", e)
            if time.monotonic() >= self._valid_until and self.owned:
                log.warning("this instance's leases may have expired: it stops publishing for %d buckets",
                            len(self.owned))
                self._set_owned(frozenset())
            self._tick_now.clear()
            try:
                await asyncio.wait_for(self._tick_now.wait(), RENEW_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def _tick(self, started: float) -> None:
        members = await self.store.call(leases.heartbeat, self.instance_id, self.session, LEASE_SECONDS)
        share = math.ceil(leases.BUCKETS / max(1, len(members)))
        held = sorted(await self.store.call(leases.hold_share, self.instance_id, LEASE_SECONDS, share,
                                            self._give_back))
        # Stop publishing for the buckets above the share now; release them only at the next
        # renewal, so that no publish of ours is still on its way when the next owner starts.
        self._give_back = frozenset(held[share:])
        owned = frozenset(held[:share])
        if time.monotonic() >= self._valid_until:  # publishing paused, marks were dropped: start afresh
            self._set_owned(frozenset())
        self._valid_until = started + LEASE_SECONDS - SAFETY_SECONDS
        changed = self._members is not None and members != self._members
        if members != self._members:
            log.info("instances: %s", ", ".join(m for m, _ in members))
        self._members = members
        self._set_owned(owned)
        if changed:
            self.on_members_changed()

    def _set_owned(self, owned: frozenset[int]) -> None:
        gained, lost = owned - self.owned, self.owned - owned
        self.owned = owned
        if lost:
            self.on_lost(lost)
        if gained:
            log.info("instance %s now publishes for %d of %d device buckets", self.instance_id, len(owned),
                     leases.BUCKETS)
            self.on_gained(gained)

    async def run_outbox(self) -> None:
        while True:
            await self._outbox_ready.wait()
            await asyncio.sleep(NOTIFY_BATCH_SECONDS)  # coalesce
            self._outbox_ready.clear()
            device_ids, self._outbox = list(self._outbox), {}
            try:
                await self.store.call(leases.notify, device_ids)
            except Exception as e:
                log.error("could not tell the other instances about %d devices: %s", len(device_ids), e)
                self.tell_owners(device_ids)
                await asyncio.sleep(1)

    def start_listening(self, url: str) -> None:
        loop = asyncio.get_running_loop()

        def call(fn: Callable[..., None], *args: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(fn, *args)

        threading.Thread(target=leases.listen, name="ota-listen", daemon=True, args=(
            url, self._stop_listening, lambda ids: call(self.on_notified, ids),
            lambda: call(self.on_members_changed))).start()

    async def aclose(self) -> None:
        self._stop_listening.set()
        try:
            await self.store.call(leases.leave, self.instance_id)
        except Exception as e:
            log.warning("could not give back this instance's leases (they expire in %.0f s): %s", LEASE_SECONDS, e)
