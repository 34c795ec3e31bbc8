"""Several `ota-bridge serve` instances on one PostgreSQL database: who is alive, who owns which devices.

Devices fall into BUCKETS buckets by a hash of their id. Each live instance holds a lease on its
fair share of the buckets, renewed every few seconds in the database (the database's clock, so
instances' clocks do not matter); a lease not renewed in time expires and another instance takes
the bucket. Only a bucket's owner publishes the heads of its devices (dispatch/cluster.py).

Every instance also keeps a row in the members table, with a session that changes whenever its
broker connection starts again; a change in the members (one joined, died, or reconnected) tells
the others to publish all their heads once more (docs/scale.md says why).

PostgreSQL only: cluster mode refuses SQLite at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import zlib
from datetime import datetime
from typing import Callable, Iterable

from ..models import db
from . import cluster_transaction, idempotent, queues
from . import updates as updates_module
from .updates import Update, UpdateOutcomes

log = logging.getLogger(__name__)

BUCKETS = 64
NOTIFY_CHANNEL = "ota_bridge_dirty"
NOTIFY_BYTES = 7000  # under PostgreSQL's 8000-byte NOTIFY payload limit

_TABLES = (
    "CREATE TABLE IF NOT EXISTS ota_instance (instance_id VARCHAR(64) PRIMARY KEY, session VARCHAR(64) NOT NULL, "
    "expires TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ota_bucket_lease (bucket INTEGER PRIMARY KEY, owner VARCHAR(64), "
    "expires TIMESTAMPTZ NOT NULL DEFAULT now(), epoch BIGINT NOT NULL DEFAULT 0)",
)


def bucket_of(device_id: str) -> int:
    return zlib.crc32(device_id.encode()) % BUCKETS


def prepare() -> None:
    """Make the two tables and the buckets, once, whichever instance starts first."""
    with cluster_transaction(exclusive=True):
        for ddl in _TABLES:
            db.execute_sql(ddl)
        db.execute_sql("INSERT INTO ota_bucket_lease (bucket) SELECT generate_series(0, %s) "
                       "ON CONFLICT DO NOTHING", (BUCKETS - 1,))


def heartbeat(instance_id: str, session: str, ttl: float) -> list[tuple[str, str]]:
    """Say this instance is alive for ttl seconds more; the live members, (instance, session), sorted."""
    with db.atomic():
        db.execute_sql("INSERT INTO ota_instance (instance_id, session, expires) "
                       "VALUES (%s, %s, now() + make_interval(secs => %s)) ON CONFLICT (instance_id) "
                       "DO UPDATE SET session = EXCLUDED.session, expires = EXCLUDED.expires",
                       (instance_id, session, ttl))
        db.execute_sql("DELETE FROM ota_instance WHERE expires < now() - interval '1 hour'")
        rows = db.execute_sql("SELECT instance_id, session FROM ota_instance WHERE expires > now() "
                              "ORDER BY instance_id").fetchall()
    return [(r[0], r[1]) for r in rows]


def hold_share(instance_id: str, ttl: float, share: int, give_back: Iterable[int] = ()) -> set[int]:
    """Give back `give_back`, renew this instance's other unexpired leases, take free or expired
    buckets up to `share`; the buckets it holds now, each for ttl seconds from now (maybe more
    than `share`: the caller stops publishing for the extra ones, and gives them back next time)."""
    with db.atomic():
        db.execute_sql("UPDATE ota_bucket_lease SET owner = NULL, expires = now() "
                       "WHERE owner = %s AND bucket = ANY(%s)", (instance_id, list(give_back)))
        held = {r[0] for r in db.execute_sql(
            "UPDATE ota_bucket_lease SET expires = now() + make_interval(secs => %s) "
            "WHERE owner = %s AND expires > now() RETURNING bucket", (ttl, instance_id))}
        if len(held) < share:
            held |= {r[0] for r in db.execute_sql(
                "UPDATE ota_bucket_lease SET owner = %s, expires = now() + make_interval(secs => %s), "
                "epoch = epoch + 1 WHERE bucket IN (SELECT bucket FROM ota_bucket_lease "
                "WHERE owner IS NULL OR expires <= now() ORDER BY bucket LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING bucket", (instance_id, ttl, share - len(held)))}
    return held


def leave(instance_id: str) -> None:
    """A clean stop: give back every lease and the membership at once."""
    with db.atomic():
        db.execute_sql("UPDATE ota_bucket_lease SET owner = NULL, expires = now() WHERE owner = %s", (instance_id,))
        db.execute_sql("DELETE FROM ota_instance WHERE instance_id = %s", (instance_id,))


def consistent_queues(device_ids: list[str]) -> list[queues.DeviceQueue]:
    """device_queues, with no write of any instance half-done: a Seq is in the floor only once
    its job is committed and visible (the lock waits for every write transaction in flight)."""
    with cluster_transaction(exclusive=False):
        return queues.device_queues(device_ids)


DEVICE_LOCK_CLASS = 0x07A  # pg_advisory_xact_lock(class, key): one lock per device (crc32 of its id)


@idempotent
def record_device_messages(updates: list[Update], presence: list[tuple[str, bool, datetime | None]]) -> UpdateOutcomes:
    """updates.record_device_messages, holding the cluster lock shared and each device's lock:
    instances store messages of different devices at once, of one device one after another, and
    never beside a write that holds the cluster lock alone (a new job, a cancel, a timeout)."""
    devices = sorted({zlib.crc32(d.encode()) - 2**31 for d in [*(u.device_id for u in updates),
                                                                  *(p[0] for p in presence)]})
    with cluster_transaction(exclusive=False):
        # In one order everywhere (unnest keeps the sorted array's): no deadlock. One round trip.
        db.execute_sql("SELECT count(pg_advisory_xact_lock(%s, key)) FROM unnest(%s::integer[]) AS key",
                       (DEVICE_LOCK_CLASS, devices))
        return updates_module.record_device_messages(updates, presence)


def notify(device_ids: Iterable[str]) -> None:
    """Tell every instance (the owners among them) that these devices' queues changed."""
    chunk: list[str] = []
    size = 0
    for device_id in device_ids:
        if chunk and size + len(device_id) + 1 > NOTIFY_BYTES:
            _notify_chunk(chunk)
            chunk, size = [], 0
        chunk.append(device_id)
        size += len(device_id.encode()) + 1
    if chunk:
        _notify_chunk(chunk)


def _notify_chunk(device_ids: list[str]) -> None:
    db.execute_sql("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, "\n".join(device_ids)))




def listen(url: str, stop: threading.Event, on_ids: Callable[[list[str]], None],
           on_start: Callable[[], None]) -> None:
    """On a thread of its own, with a connection of its own: hand every NOTIFY on NOTIFY_CHANNEL to
    on_ids, and call on_start each time listening (re)starts (what came meanwhile was missed)."""
    import psycopg2  # the PostgreSQL driver is there: cluster mode runs on PostgreSQL only

    while not stop.is_set():
        connection = None
        try:
            connection = psycopg2.connect(url, connect_timeout=5)
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
            on_start()
            while not stop.is_set():
                if select.select([connection], [], [], 1.0)[0]:
                    connection.poll()
                    ids = [d for n in connection.notifies for d in n.payload.split("\n") if d]
                    connection.notifies.clear()
                    if ids:
                        on_ids(ids)
        except Exception as e:  # the database went away: listen again when it is back
            log.warning("listening for queue changes of other instances failed (%s); again in 1 s", e)
            stop.wait(1.0)
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.close()
