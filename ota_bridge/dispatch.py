"""The per-device queues over MQTT: publish each device's head and pending list, take its updates.

The database is the truth. Code that changes a device's queue calls `dispatcher.mark(device_ids)`;
one publisher task reads those queues back and publishes them, so what the broker retains is
always the database's latest state, and a device's next job is published only once its current
one is final (the head is the first job not yet final). Device updates are applied in batches,
one transaction each, and acknowledged to the broker only after they are stored.

On a single instance the queues last published are remembered, so that a batch that only moved
heads (a job started, a job ended) publishes from memory instead of reading the queues again; a
final moves the head along the remembered queue only when the store proves that queue current
(its epoch: no other store call since the queue was read; store/__init__.py).

In cluster mode (coordination.py) this instance publishes only the devices whose bucket it
leases, and tells the owners of the others; device messages come through shared subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from datetime import datetime
from typing import Callable, Iterable, Optional

from agent.protocol import QUEUE_LIST_LIMIT, MessageError, Topics

from . import metrics
from .coordination import Coordinator
from .device_messages import ArtifactUrl, head_message, is_progress_report, parse_presence, parse_update, queue_message
from .errors import StoreUnavailable
from .models import now
from .mqtt_link import Incoming, Link
from .store import Store, devices, jobs, leases, queues
from .store.updates import Update, UpdateOutcomes, record_device_messages

log = logging.getLogger(__name__)

BATCH = 500  # devices per queue read; updates per transaction
Presence = tuple[str, bool, Optional[datetime]]  # (device id, online, seen at; None keeps LastSeen)
INBOX_LIMIT = 20_000
SHARE_GROUP = "$share/ota-bridge"  # cluster mode: the instances share the device messages
# A head keeps its IssuedAt (so an unchanged head is not published again) for at most this long;
# a device that comes online with an older head gets it signed again with a fresh IssuedAt, so
# an agent without state (which runs only heads issued within HEAD_VALIDITY_SECONDS) can run it.
REFRESH_AFTER_SECONDS = 3600.0
# The queues last published are remembered (single instance only) so that a device's report that
# its head started changes the retained list without reading the queue again; at most this many
# queue entries are held, the oldest queues forgotten first (they are then read, as before).
REMEMBER_ENTRIES = 50_000
# The publisher reads this many of a device's pending jobs, twice what the list shows, so that the
# queue it remembers can lose its head to a final this many times over before it runs short.
READ_WINDOW = 2 * QUEUE_LIST_LIMIT
PUBLISH_SLICE = 100  # queues published between two turns of the event loop (API requests meanwhile)
# A batch of device messages that are all progress reports (IN_PROGRESS, DOWNLOADING) waits this long
# for more before it is stored: nothing waits on progress, and the devices of a group job report it
# within milliseconds of each other. One transaction (and one hand-over to the store's thread) for
# them instead of one each was a tenth of the service's CPU per group job. A final, or a presence
# message, that comes meanwhile ends the wait: it is stored at once, with the progress before it.
PROGRESS_LINGER_SECONDS = 0.003


class Dispatcher:
    def __init__(self, db: Store, topics: Topics, sign: Callable[[bytes], str] | None = None,
                 timeout_grace: float = 60, failpoints: frozenset[str] = frozenset(),
                 cluster: Coordinator | None = None, artifact_url: ArtifactUrl | None = None) -> None:
        self.store = db
        self.artifact_url = artifact_url
        self.cluster = cluster
        self.topics = topics
        self.sign = sign
        self.timeout_grace = timeout_grace
        self.failpoints = failpoints
        self.link: Link | None = None  # BrokerLink over TCP, or the embedded broker's ServiceLink
        self._dirty: dict[str, None] = {}  # an ordered set of device ids to publish
        self._known: dict[str, queues.DeviceQueue] = {}  # dirty devices whose queue need not be read (mark_read)
        self._wake = asyncio.Event()
        self._published: dict[str, int] = {}  # topic -> hash of the payload last published
        self._issued: dict[str, tuple[int, datetime]] = {}  # device -> (hash of its head's content, IssuedAt)
        self._last_queue: dict[str, queues.DeviceQueue] = {}  # device -> its queue as published, no change since
        self._remembered_entries = 0
        self._gone: set[str] = set()  # devices deleted since the publisher took its batch
        self._inbox: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=INBOX_LIMIT)
        self._lingering: asyncio.Future[None] | None = None  # a batch of progress reports waiting for more
        self._in_sync = False
        self._resync_task: asyncio.Task[None] | None = None
        if cluster is not None:
            cluster.on_gained = lambda buckets: self._republish_buckets(buckets)
            cluster.on_lost = self._forget_buckets
            cluster.on_members_changed = lambda: self._republish_buckets(None)
            cluster.on_notified = lambda ids: self.mark(ids, relay=False)

    @property
    def subscriptions(self) -> list[str]:
        """Every device's status and presence; in cluster mode shared, so each goes to one instance."""
        topics = [self.topics.all_devices(Topics.STATUS), self.topics.all_devices(Topics.PRESENCE)]
        return [f"{SHARE_GROUP}/{t}" for t in topics] if self.cluster is not None else topics

    @property
    def read_window(self) -> int | None:
        """How many pending jobs of each device a queue read handed to mark_read must hold (those the
        publisher would read); None in cluster mode, where each device's owner reads its queue."""
        return READ_WINDOW if self.cluster is None else None

    def attach(self, link: Link) -> None:
        self.link = link

    # --- publishing ---------------------------------------------------------------------

    def mark(self, device_ids: Iterable[str], relay: bool = True) -> None:
        """These devices' queues changed: publish them again (soon, coalesced).

        In cluster mode only the devices this instance owns; the owners of the others are told
        (relay), unless the word came from another instance."""
        others: list[str] = []
        for device_id in device_ids:
            self._known.pop(device_id, None)  # changed again: read it
            self._forget_queue(device_id)
            if self.cluster is None or self.cluster.owns(device_id):
                self._dirty[device_id] = None
            elif relay:
                others.append(device_id)
        if others and self.cluster is not None:
            self.cluster.tell_owners(others)
        if self._dirty:
            self._wake.set()

    def mark_read(self, read: list[queues.DeviceQueue]) -> None:
        """These queues changed and were read in the same transaction: publish them as they are,
        unless they change again first (then `mark` makes the publisher read them). Call it as soon
        as the store returns them, before anything else can mark those devices."""
        if self.cluster is not None:  # the owners read them (consistent_queues)
            self.mark(q.device_id for q in read)
            return
        for queue in read:
            self._forget_queue(queue.device_id)  # the remembered one is out of date
            self._dirty[queue.device_id] = None
            self._known[queue.device_id] = queue
        if read:
            self._wake.set()

    def _republish_buckets(self, buckets: frozenset[int] | None) -> None:
        """Cluster mode: publish the heads of these buckets' devices (None: every owned one) again,
        even if unchanged: an agent that hears its head again resends a result the broker lost."""
        asyncio.get_running_loop().create_task(self._republish(buckets))

    async def _republish(self, buckets: frozenset[int] | None) -> None:
        try:
            device_ids = await self.store.call(devices.all_device_ids)
        except Exception:
            log.exception("could not read the devices to republish; the next change of members tries again")
            return
        assert self.cluster is not None
        wanted = self.cluster.owned if buckets is None else buckets
        chosen = [d for d in device_ids if leases.bucket_of(d) in wanted]
        self._forget_published(chosen)
        self.mark(chosen, relay=False)

    def _forget_buckets(self, buckets: frozenset[int]) -> None:
        """Cluster mode: another instance publishes for these buckets now."""
        gone = [d for d in self._dirty if leases.bucket_of(d) in buckets]
        for device_id in gone:
            del self._dirty[device_id]
        self._published = {t: h for t, h in self._published.items()
                           if (p := self.topics.parse(t)) is None or leases.bucket_of(p[0]) not in buckets}

    def _forget_published(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self._published.pop(self.topics.job(device_id), None)
            self._published.pop(self.topics.queue(device_id), None)

    def on_connected(self) -> None:
        """After every (re)connect, republish every device from the database."""
        self._published.clear()
        if self.cluster is not None:  # a new clean session: the other instances publish theirs again too
            self.cluster.new_session()
        self._in_sync = False
        self._resync_task = asyncio.get_running_loop().create_task(self._resync())

    async def _resync(self) -> None:
        """Forget presence, restart the silence clocks (devices could not report while we were away),
        then republish.

        Presence is forgotten first, before the retained presence the broker holds (if any) comes
        back through the inbox, which uses the same store thread after it.
        """
        delay = 0.5
        while True:
            try:
                if self.cluster is None:  # in cluster mode the devices of other instances stay online
                    await self.store.call(devices.forget_presence)
                await self.store.call(jobs.restart_silence_clocks)
                device_ids = await self.store.call(devices.all_device_ids)
                break
            except Exception:
                log.exception("could not read the devices to republish; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        log.info("republishing the queues of %d devices", len(device_ids))
        self.mark(device_ids)
        self._in_sync = True

    @property
    def in_touch(self) -> bool:
        """Connected to the broker, and the silence clocks restarted since: devices can report."""
        return self._in_sync and self.link is not None and self.link.connected.is_set()

    def forget(self, device_id: str) -> None:
        """A deleted device: clear its retained job and queue messages."""
        self._dirty.pop(device_id, None)
        self._known.pop(device_id, None)
        self._issued.pop(device_id, None)
        self._gone.add(device_id)  # the publisher's batch in hand, if it holds it, leaves it out
        self._forget_queue(device_id)
        for topic in (self.topics.job(device_id), self.topics.queue(device_id)):
            self._publish(topic, b"")
            self._published.pop(topic, None)

    async def run_publisher(self) -> None:
        while True:
            if not self._dirty:
                await self._wake.wait()
            self._wake.clear()
            self._gone.clear()
            batch = list(self._dirty)[:BATCH]
            for device_id in batch:
                del self._dirty[device_id]
            if self.cluster is not None:
                batch = [d for d in batch if self.cluster.owns(d)]  # lost since: the new owner publishes
            if self.link is not None:
                await self.link.room()  # a batch adds at most 2 x BATCH unacknowledged publishes
            started = time.perf_counter()
            known = {d: q for d in batch if (q := self._known.pop(d, None)) is not None}
            unknown = [d for d in batch if d not in known]
            try:
                read = [*known.values(), *(await self._read_queues(unknown) if unknown else [])]
            except Exception:
                log.exception("reading device queues failed; retrying")
                self.mark(batch, relay=False)
                await asyncio.sleep(1)
                continue
            await self._publish_queues(read)
            metrics.published(len(read), time.perf_counter() - started)

    async def _publish_queues(self, read: list[queues.DeviceQueue]) -> None:
        """Publish these queues' heads and lists, letting the event loop run every PUBLISH_SLICE
        queues, so that the API answers meanwhile (a batch of 500 signed heads holds the loop tens of
        ms; a POST that handed over its queues waited for all of them). Nothing newer of these devices can be published
        meanwhile: they are not remembered until published here, so a change marks them again and
        the next batch publishes it; a device deleted meanwhile (forget) is left out."""
        current = now()
        for i, queue in enumerate(read):
            if i and i % PUBLISH_SLICE == 0:
                await asyncio.sleep(0)
            if queue.device_id in self._gone:
                continue
            if self.cluster is not None and not self.cluster.owns(queue.device_id):
                continue  # the lease may run out: the next owner reads the queue again
            head = head_message(queue.device_id, queue.head, queue.floor, self._issue_time(queue, current),
                                self.sign, self.artifact_url)
            self._publish_changed(self.topics.job(queue.device_id), head)
            self._publish_changed(self.topics.queue(queue.device_id), queue_message(queue))
            self._remember_queue(queue)

    def _remember_queue(self, queue: queues.DeviceQueue) -> None:
        """Keep the queue just published, unless it changed since it was read (the device is marked
        again), it is empty, or several instances change queues (then only the database knows)."""
        self._forget_queue(queue.device_id)
        if self.cluster is not None or queue.head is None or queue.device_id in self._dirty:
            return
        self._last_queue[queue.device_id] = queue
        self._remembered_entries += len(queue.entries)
        while self._remembered_entries > REMEMBER_ENTRIES:
            self._forget_queue(next(iter(self._last_queue)))

    def _forget_all_queues(self) -> None:
        self._last_queue.clear()
        self._remembered_entries = 0

    def _forget_queue(self, device_id: str) -> None:
        forgotten = self._last_queue.pop(device_id, None)
        if forgotten is not None:
            self._remembered_entries -= len(forgotten.entries)

    def _publish_from_memory(self, outcomes: UpdateOutcomes, current: datetime) -> list[str]:
        """Publish the queues of devices whose changes in this batch were only their head's, from
        the queue remembered as published, without reading it (single instance only: nothing is
        remembered in cluster mode). A head's progress (e.g. IN_PROGRESS) changes its status in the
        list; a final moves the head to the next entry, which needs proof that the remembered queue
        is the database's: the store's epoch has not moved since it was read (no other write since),
        and nothing but the head changed (no retry, no rollback child: `reshaped`).
        Returns the devices that changed otherwise, whose queues must be read (`mark`)."""
        changes: dict[str, list[Update]] = {}
        for update in outcomes.applied:
            changes.setdefault(update.device_id, []).append(update)
        others = []
        for device_id, changed in changes.items():
            queue = self._last_queue.get(device_id)
            moved = None
            if queue is not None and device_id not in self._dirty and device_id not in outcomes.reshaped:
                moved = _moved_along(queue, changed, outcomes)
            if moved is None:
                others.append(device_id)
                continue
            if (moved.floor, moved.head and moved.head.job_id) != (queue.floor, queue.head and queue.head.job_id):
                self._publish_changed(self.topics.job(device_id), head_message(
                    device_id, moved.head, moved.floor, self._issue_time(moved, current), self.sign, self.artifact_url))
            self._publish_changed(self.topics.queue(device_id), queue_message(moved))
            self._remember_queue(moved)
        return others

    async def _read_queues(self, device_ids: list[str]) -> list[queues.DeviceQueue]:
        if self.cluster is not None:
            return await self.store.call(leases.consistent_queues, device_ids)
        return await self.store.call(queues.device_queues, device_ids, READ_WINDOW)

    def _issue_time(self, queue: queues.DeviceQueue, current: datetime) -> datetime:
        """The head's IssuedAt: kept while its content is unchanged and it is recent, else `current`
        (now, taken once per batch: reading the clock costs more than the rest of this)."""
        head = queue.head
        content = hash((head.job_id if head else None, head.attempt if head else 0, queue.floor))
        kept = self._issued.get(queue.device_id)
        if kept is not None and kept[0] == content and (current - kept[1]).total_seconds() < REFRESH_AFTER_SECONDS:
            return kept[1]
        self._issued[queue.device_id] = (content, current)
        return current

    def refresh_old_heads(self, device_ids: Iterable[str], current: datetime) -> None:
        """These devices came online: sign their head again if its IssuedAt is old."""
        self.mark(d for d in device_ids if (kept := self._issued.get(d)) is not None
                  and (current - kept[1]).total_seconds() >= REFRESH_AFTER_SECONDS)

    def _publish_changed(self, topic: str, payload: bytes) -> None:
        digest = hash(payload)
        if self._published.get(topic) == digest:
            return
        self._published[topic] = digest
        self._publish(topic, payload)

    def _publish(self, topic: str, payload: bytes) -> None:
        """QoS 1, or in cluster mode QoS 0: a publish never sent again after a reconnect, when
        this instance may no longer own the device (after a reconnect it publishes all it owns)."""
        if self.link is not None:
            self.link.publish(topic, payload, retain=True, qos=1 if self.cluster is None else 0)

    # --- server-side timeouts -----------------------------------------------------------

    async def run_timeouts(self) -> None:
        """Every few seconds, end jobs whose device went silent past timeout plus grace."""
        interval = max(0.5, min(5.0, self.timeout_grace / 4))
        while True:
            await asyncio.sleep(interval)
            if not self.in_touch:  # an outage of ours or the broker's never times a device out
                continue
            try:
                silent = await self.store.call(jobs.expire_silent_jobs, self.timeout_grace)
            except Exception:
                log.exception("checking for silent jobs failed")
                continue
            for device_id in silent:
                log.warning("device %s: its running job timed out with no result; its queue moves on", device_id)
            self.mark(silent)

    # --- device messages ----------------------------------------------------------------

    def deliver(self, message: Incoming) -> None:
        """Called on the event loop for every message from the broker."""
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            # Not acknowledged: the broker delivers it again after the next reconnect.
            log.error("inbox full (%d messages); dropped a message on %s", INBOX_LIMIT, message.topic)
        lingering = self._lingering
        if lingering is not None and not lingering.done() and (
                self._inbox.qsize() + 1 >= BATCH or not self._progress(message)):
            lingering.set_result(None)  # a final (or a full batch) is not held

    async def run_inbox(self) -> None:
        while True:
            batch = await self._take_batch()
            started = time.perf_counter()
            try:
                await self._handle(batch)
                metrics.dispatched(time.perf_counter() - started)
            except Exception:
                log.exception("handling %d device messages failed; they are dropped", len(batch))
                self._forget_all_queues()  # what was stored may not have reached them
            if self.link is not None:
                for message in batch:
                    self.link.ack(message)

    async def _take_batch(self) -> list[Incoming]:
        """The messages waiting, at least one; if they are all progress reports, with those that come
        within PROGRESS_LINGER_SECONDS, or until a final comes (it is taken along at once: deliver)."""
        batch = [await self._inbox.get()]
        self._take_waiting(batch)
        if len(batch) < BATCH and all(self._progress(message) for message in batch):
            loop = asyncio.get_running_loop()
            self._lingering = lingering = loop.create_future()
            timer = loop.call_later(PROGRESS_LINGER_SECONDS, _resolve, lingering)
            try:
                await lingering
            finally:
                timer.cancel()
                self._lingering = None
            self._take_waiting(batch)
        return batch

    def _take_waiting(self, batch: list[Incoming]) -> None:
        while len(batch) < BATCH and not self._inbox.empty():
            batch.append(self._inbox.get_nowait())

    def _progress(self, message: Incoming) -> bool:
        parsed = self.topics.parse(message.topic)
        return parsed is not None and parsed[1] == Topics.STATUS and is_progress_report(message.payload)

    async def _handle(self, batch: list[Incoming]) -> None:
        updates, presence = self._parse(batch)
        outcomes = await self._store(updates, presence)
        metrics.device_updates(applied=len(outcomes.applied), late=len(outcomes.late), dropped=len(outcomes.dropped))
        for update, why in outcomes.dropped:
            log.warning("device %s: job %s: dropped %s: %s", update.device_id, update.job_id, update.status.value, why)
        _log_applied(outcomes.applied)
        for update in outcomes.late:
            log.info("device %s: job %s reported %s late; result kept, state unchanged",
                     update.device_id, update.job_id, update.status.value)
        if "exit-after-store" in self.failpoints and any(u.status.is_final for u in outcomes.applied):
            log.error("failpoint exit-after-store: exiting before publishing the next heads")
            os._exit(137)
        if self.link is not None:
            await self.link.room()  # the head progress below publishes without the publisher
        current = now()
        self.mark(self._publish_from_memory(outcomes, current))
        self.mark(outcomes.first_seen)  # a new device's first head (not at registration: see api/views.py)
        self.refresh_old_heads((device for device, online, seen in presence if online and seen is not None), current)

    async def _store(self, updates: list[Update], presence: list[Presence]) -> UpdateOutcomes:
        """Store a batch. A database outage is waited out; a message the database refuses is dropped alone."""
        delay = 0.5
        while True:
            try:
                record = record_device_messages if self.cluster is None else leases.record_device_messages
                return await self.store.call(record, updates, presence)
            except StoreUnavailable as e:
                log.error("%s; retrying in %.1f s", e.detail, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            except Exception:
                if len(updates) + len(presence) > 1:
                    return await self._store_one_by_one(updates, presence)
                log.exception("the database refused a device message; it is dropped")
                return UpdateOutcomes(dropped=[(u, "the database refused it") for u in updates])

    async def _store_one_by_one(self, updates: list[Update], presence: list[Presence]) -> UpdateOutcomes:
        outcomes = UpdateOutcomes()
        epochs = set()  # other writes may come between these calls: one epoch for all, or none
        for one in [([u], []) for u in updates] + [([], [p]) for p in presence]:
            result = await self._store(*one)
            outcomes.applied += result.applied
            outcomes.late += result.late
            outcomes.dropped += result.dropped
            outcomes.reshaped |= result.reshaped
            outcomes.highest_seq = max(outcomes.highest_seq, result.highest_seq)
            outcomes.first_seen += result.first_seen
            epochs.add(result.epoch)
        outcomes.epoch = epochs.pop() if len(epochs) == 1 else -1
        return outcomes

    def _parse(self, batch: list[Incoming]) -> tuple[list[Update], list[Presence]]:
        updates: list[Update] = []
        presence: list[Presence] = []
        current = now()
        for message in batch:
            parsed = self.topics.parse(message.topic)
            if parsed is None:
                continue
            device_id, leaf = parsed
            try:
                if leaf == Topics.STATUS:
                    updates.append(parse_update(device_id, message.payload))
                    presence.append((device_id, True, current))
                elif leaf == Topics.PRESENCE and message.payload:
                    report = parse_presence(device_id, message.payload)
                    presence.append((device_id, report.online, None if message.retained else current))
            except MessageError as e:
                log.warning("ignored a bad message from device %s on %s: %s", device_id, leaf, e)
        latest = {entry[0]: entry for entry in presence}  # one presence write per device and batch: the last
        return updates, list(latest.values())


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _log_applied(applied: list[Update]) -> None:
    """One INFO line per job result (a final); a job's progress (IN_PROGRESS, DOWNLOADING, ...) at
    DEBUG: a line per report cost the service as much as parsing the report did."""
    debug = log.isEnabledFor(logging.DEBUG)
    for update in applied:
        if debug or update.status.is_final:
            log.log(logging.INFO if update.status.is_final else logging.DEBUG,
                    "device %s: job %s is %s", update.device_id, update.job_id, update.status.value)


def _moved_along(queue: queues.DeviceQueue, changed: list[Update],
                 outcomes: UpdateOutcomes) -> queues.DeviceQueue | None:
    """The remembered queue after these applied updates of its head, in order; None when only a
    read can tell (a report about another job, a held head, a final with the queue not proven current,
    or a final that leaves fewer entries than the list shows while more are pending)."""
    for update in changed:
        head = queue.head
        if head is None or update.job_id != head.job_id:
            return None
        if not update.status.is_final:
            queue = replace(queue, entries=(replace(head, status=update.status.value), *queue.entries[1:]))
            continue
        rest = queue.entries[1:]
        if queue.epoch == -1 or queue.epoch != outcomes.epoch or len(rest) < min(queue.total - 1, QUEUE_LIST_LIMIT):
            return None
        queue = replace(queue, entries=rest, total=queue.total - 1,
                        floor=rest[0].seq - 1 if rest else outcomes.highest_seq)
    return queue
