"""Everything the service reads or writes in the database, and nowhere else.

One module per subject: `tokens`, `workflows`, `devices`, `jobs`, `queues` (what the dispatcher
publishes) and `updates` (what devices report). Their functions are blocking; `Store.call` runs
them on the store's own thread so the event loop never waits on the database. With SQLite that
one thread is also the one writer, so writes never contend; a write that spans several rows is
one transaction, so nothing is half-written.

A lost connection (the server closed it, restarted or failed over, the network cut it) is
replaced by a new one on the next call. The call that met the loss runs once more on a new
connection when that cannot write twice: it had sent no COMMIT (nor a write outside a
transaction) yet, so the database rolled it back; or it is marked `@idempotent`. Otherwise, or
when the database is still away, it raises StoreUnavailable (503).

This module holds only the Store and the helpers the subject modules share; it imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Iterable, Iterator, TypeVar

import peewee as pw

from agent.protocol import PENDING_STATUSES, JobStatus

from ..errors import StoreUnavailable
from ..models import (
    ChildJob,
    GuardedDatabase,
    connection_broken,
    connection_lost,
    connection_stale,
    db,
    describe,
    discard_connection,
    explain,
    now,
    open_database,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
PENDING = [s.value for s in PENDING_STATUSES]
CHUNK = 500  # rows per INSERT: under SQLite's bound-variable limit for every table here
PROBE_SECONDS = 3.0  # how long the health check waits for the database's answer
WRITE_FAILURE_SECONDS = 30.0  # a failed write (a full disk) counts as unavailable this long, unless a write succeeds
UNAVAILABLE = (pw.OperationalError, pw.InterfaceError)


def idempotent(fn: F) -> F:
    """Mark a store function that may run twice: after a COMMIT whose outcome was lost, it runs again."""
    fn.idempotent = True
    return fn


def ping() -> None:
    db.execute_sql("SELECT 1")


class Store:
    """The database, opened once, used from one worker thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = describe(url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ota-store")
        self.database: GuardedDatabase = self._executor.submit(open_database, url).result()
        # Called on the store's thread when a COMMIT's outcome was lost: what it changed may be stored
        # although its caller heard of a failure (the service republishes every queue).
        self.on_doubt: Callable[[], None] | None = None
        self._failing: str | None = None  # why the last call failed, until one succeeds
        self._write_failure: tuple[float, str] | None = None  # (when, why) a write failed on a live connection
        self._probe: asyncio.Future[None] | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) on the store's thread.

        Raises StoreUnavailable when the database cannot be reached or stays locked.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._run, fn, args, kwargs))

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the store's thread from code that is not on the event loop (the CLI)."""
        return self._executor.submit(partial(self._run, fn, args, kwargs)).result()

    def close(self) -> None:
        self._executor.submit(discard_connection, self.database).result()
        self._executor.shutdown(wait=True)

    async def unavailable(self) -> str | None:
        """Why the database cannot be used now, or None: a SELECT 1 within PROBE_SECONDS, and no recent failed write.

        The answer names no host or file (health checks need no token); the log has the cause.
        One probe at a time: checks that come while it runs wait for the same answer.
        """
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self.call(ping))
            self._probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), PROBE_SECONDS)
        except asyncio.TimeoutError:
            return f"no answer within {PROBE_SECONDS:g} s"
        except Exception:  # StoreUnavailable, or anything else: the check itself must answer
            return "cannot be reached, or refused the query; the service's log says why"
        failed = self._write_failure
        if failed is not None and time.monotonic() - failed[0] < WRITE_FAILURE_SECONDS:
            return f"a write failed {time.monotonic() - failed[0]:.0f} s ago and none succeeded since: {failed[1]}"
        return None

    # The store's thread from here on.

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if connection_stale(self.database):
            log.info("the connection to the %s was closed while idle; opening a new one", self.where)
            discard_connection(self.database)
        try:
            return self._attempt(fn, args, kwargs)
        except UNAVAILABLE as e:
            if not connection_lost(self.database) or not self._may_repeat(fn):
                raise self._failed(fn, e) from e
            if self.database.wrote:
                self._doubt()
            discard_connection(self.database)
            log.warning("lost the connection to the %s in %s (%s); running it again on a new connection",
                        self.where, fn.__name__, explain(self.database, e))
        try:
            return self._attempt(fn, args, kwargs)
        except UNAVAILABLE as e:
            raise self._failed(fn, e) from e

    def _attempt(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        database = self.database
        database.wrote = database.began = False
        try:
            result = fn(*args, **kwargs)
        except UNAVAILABLE:
            raise
        except BaseException:
            if connection_broken(database):
                discard_connection(database)
            raise
        if self._failing is not None:
            log.info("the %s answers again", self.where)
            self._failing = None
        if database.wrote or database.began:
            self._write_failure = None
        return result

    def _may_repeat(self, fn: Callable[..., Any]) -> bool:
        """Running fn again cannot write twice: nothing was committed yet, or it does not matter."""
        return not self.database.wrote or getattr(fn, "idempotent", False)

    def _doubt(self) -> None:
        log.warning("the outcome of a COMMIT on the %s is unknown", self.where)
        if self.on_doubt is not None:
            self.on_doubt()

    def _failed(self, fn: Callable[..., Any], error: Exception) -> StoreUnavailable:
        """Log what failed where and why (once while it keeps failing the same way); the error for the caller."""
        database = self.database
        reason = explain(database, error)
        lost, wrote = connection_lost(database), database.wrote
        if not lost and not database.is_closed() and (wrote or database.began):
            self._write_failure = (time.monotonic(), reason)  # the database itself refused: a full disk, say
        if connection_broken(database):
            discard_connection(database)
        log.log(logging.DEBUG if reason == self._failing else logging.ERROR, "%s failed on the %s: %s",
                fn.__name__, self.where, reason)
        self._failing = reason
        if lost and wrote:
            self._doubt()
            return StoreUnavailable(f"the connection to the database was lost while a change was being committed, "
                                    f"so it may or may not have been saved: check before you send it again ({reason})")
        return StoreUnavailable(f"the database is unavailable: {reason}")


# Several instances on one PostgreSQL database (cluster mode, store/leases.py): every write
# transaction takes this advisory lock, so writes stay one at a time as with one store thread, and
# the publishers' queue reads take it shared, so they never see a Seq handed out but not committed.
# (Device messages take it shared too, with a lock per device: leases.record_device_messages.)
CLUSTER_LOCK_KEY = 0x07A_B41D
_writes_serialized = False
_lock_held = False  # the store's one thread is in a cluster_transaction: nested ones take nothing more


def serialize_writes() -> None:
    """Cluster mode: from now on every write transaction holds CLUSTER_LOCK_KEY (PostgreSQL only)."""
    global _writes_serialized
    _writes_serialized = True


def write_transaction() -> Any:
    """A write transaction that takes SQLite's write lock up front (no upgrade deadlocks)."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return cluster_transaction(exclusive=True) if _writes_serialized and not _lock_held else db.atomic()


@contextlib.contextmanager
def cluster_transaction(exclusive: bool) -> Iterator[Any]:
    """A transaction holding CLUSTER_LOCK_KEY until it ends: exclusive to write, shared to read."""
    global _lock_held
    with db.atomic() as transaction:
        db.execute_sql(f"SELECT pg_advisory_xact_lock{'' if exclusive else '_shared'}(%s)", (CLUSTER_LOCK_KEY,))
        _lock_held = True
        try:
            yield transaction
        finally:
            _lock_held = False


def finalize(status: JobStatus, reason: str, *where: Any) -> int:
    """The service makes jobs final itself; a device's later report is kept beside (see updates._apply_late)."""
    return (ChildJob.update(status=status.value, end_time=now(), updated=now(), reason=reason,
                            finalized_by_service=True).where(*where).execute())


def chunks(items: list[T], size: int = CHUNK) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
