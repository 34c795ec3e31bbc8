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

Functions that only read (the API's GETs) may run with `Store.read` instead, on one of a few
reader threads, each with its own connection, so they never queue behind writes: each read is one
snapshot (a read-only transaction, SQLite's WAL lets it run beside the writer) that sees every
write committed before it began. A reader whose connection was lost opens a new one and reads again.
A function marked `@single_statement` makes one statement, which sees one moment by itself, so it
runs without BEGIN and ROLLBACK (it opens a snapshot with `snapshot` if it needs more); on SQLite
it runs on the event loop itself, which WAL never makes wait for the writer. If it needs a snapshot
after all (`GET /v1/job/{id}` of a group job) the loop reads that too, in one read-only transaction
on its own connection, unless the read outgrows LOOP_READ_STEPS (a group of thousands of devices) or
meets a lock (the loop's connection never waits for one): then a reader thread reads it. On
PostgreSQL a `@reads_rows` function's one statement is sent by the event loop itself on
connections of its own (`pg_async`), prepared on the server, and its rows are turned into the
answer there: no reader thread, no hand-off to one and back.

This module holds only the Store and the helpers the subject modules share; it imports none of them
(`pg_async` is the Store's, not a subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import peewee as pw

from agent.protocol import UNFINISHED_STATUSES, JobStatus

from ..errors import StoreUnavailable
from ..models import (
    ChildJob,
    GuardedDatabase,
    close_connection,
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
from .endings import Endings

if TYPE_CHECKING:
    from .pg_async import AsyncReads

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
# Not final, held (SCHEDULED) jobs included: every query that orders, blocks, counts or cancels a
# device's queue reads these. Only the head the dispatcher publishes skips a held job (queues.py).
PENDING = [s.value for s in UNFINISHED_STATUSES]
CHUNK = 500  # rows per INSERT: under SQLite's bound-variable limit for every table here
PROBE_SECONDS = 3.0  # how long the health check waits for the database's answer
WRITE_FAILURE_SECONDS = 30.0  # a failed write (a full disk) counts as unavailable this long, unless a write succeeds
UNAVAILABLE = (pw.OperationalError, pw.InterfaceError)
READERS = 4  # threads answering Store.read, each with its own connection
# SQLite: the most virtual-machine steps a snapshot read on the event loop may take, counted by
# STEPS_PER_CHECK (a group job's counts take ~21 per child: ~2,400 children; 10,000 took 3 ms at load 10).
# A read that would take more is interrupted and made by a reader thread (and that job's reads after it).
LOOP_READ_STEPS = 50_000
STEPS_PER_CHECK = 1_000
BIG_READS_KEPT = 1024  # the reads remembered as too big for the loop (the oldest forgotten first)
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_INTERRUPT = 5, 6, 9
# A read for a reader thread: the caller's loop, the future it awaits there, the work. The answer goes
# back with one call_soon_threadsafe (no concurrent.futures.Future, its lock and its chaining).
Read = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


def idempotent(fn: F) -> F:
    """Mark a store function that may run twice: after a COMMIT whose outcome was lost, it runs again."""
    fn.idempotent = True
    return fn


def reports_queue_changes(fn: F) -> F:
    """Mark a store function whose every change to a device's queue its caller learns from its
    result (the dispatcher's queue reads and device updates): it leaves the epoch as it is."""
    fn.reports_queue_changes = True
    return fn


def writes_no_jobs(fn: F) -> F:
    """Mark a store function that writes no job and no device's queue (the audit log, the webhooks'
    outbox): it leaves the epoch as it is, so the dispatcher still moves the queues it remembers
    along without reading them again, and it wakes no held GET (it can make no job final). Every
    POST writes an audit row after its submission's queues were read: unmarked, that made every
    final of the job read its device's queue again, a store call each."""
    fn.reports_queue_changes = True
    fn.writes_no_jobs = True
    return fn


# Store calls that may change device queues in ways the dispatcher does not see: every call but
# those marked @reports_queue_changes. Each gets an id; the epoch is the id of the last one that
# changed rows (on SQLite: the connection's count of changed rows moved; elsewhere: any such call).
# On one instance the store's one thread is the only writer of child jobs, so a queue read while the
# epoch was E is still the database's as long as the epoch is E (plus what the marked calls reported).
# Several instances never rely on it.
_epoch = 0
_calls = 0  # ids handed out
_running: int | None = None  # the id of the unmarked call running on the store's thread now


def epoch() -> int:
    """What a queue read now is stamped with, and what a device update compares it to: inside an
    unmarked call its own id (the call's changes so far are in what it reads)."""
    return _epoch if _running is None else _running


# What the call running on the store's thread says its writes may have made final: None, any job
# (what a call that says nothing may have done); else only these job ids (see endings.py).
_may_have_ended: frozenset[str] | None = None
_NOTHING: frozenset[str] = frozenset()


def only_these_may_end(job_ids: Iterable[str]) -> None:
    """Called by a store function on the store's thread: its writes can have made final only these
    jobs (parent or child job ids; none, say, for a batch of progress reports), so a held GET of
    another job need not read it again."""
    global _may_have_ended
    _may_have_ended = frozenset(job_ids)


def ping() -> None:
    db.execute_sql("SELECT 1")


class Store:
    """The database, opened once, used from one worker thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = describe(url)
        self._thread = _StoreThread("ota-store_0")
        self.database: GuardedDatabase = self._thread.run_sync(partial(open_database, url))
        # Called on the store's thread when a COMMIT's outcome was lost: what it changed may be stored
        # although its caller heard of a failure (the service republishes every queue).
        self.on_doubt: Callable[[], None] | None = None
        self._failing: str | None = None  # why the last call failed, until one succeeds
        self._write_failure: tuple[float, str] | None = None  # (when, why) a write failed on a live connection
        self._probe: asyncio.Future[None] | None = None
        # SQLite: a @single_statement read runs on the caller's thread (the event loop), with its own
        # connection. WAL never makes a reader wait for the writer, and one small statement costs less
        # than handing it to a reader thread and back (two wake-ups, the GIL passed twice).
        self._inline = isinstance(self.database, pw.SqliteDatabase)
        # PostgreSQL: a `reads_rows` read's statement goes out from the event loop on its own connections.
        # (Without asyncpg installed, they go to the reader threads.)
        self._on_loop: AsyncReads | None = None
        if not self._inline:
            from . import pg_async  # here: asyncpg is imported for PostgreSQL only

            self._on_loop = pg_async.AsyncReads(self.database) if pg_async.AVAILABLE else None
        self._rows_here = self._inline or self._on_loop is not None
        self._reads: queue.SimpleQueue[Read | None] = queue.SimpleQueue()
        self._big: dict[tuple[Any, ...], None] = {}  # SQLite: snapshot reads too big for the loop (in order)
        self._checks_left = 0  # SQLite: progress checks the loop's snapshot read now may still pass
        # The calls that committed a write (or may have), with what they may have made final.
        self._endings = Endings()
        self._readers = [threading.Thread(target=self._reader, name=f"ota-store-read_{i}", daemon=True)
                         for i in range(READERS)]
        for reader in self._readers:
            reader.start()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) on the store's thread.

        Raises StoreUnavailable when the database cannot be reached or stays locked.
        """
        try:
            return await self._thread.run(partial(self._counted, fn, args, kwargs))
        finally:
            self._endings.hear()

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the store's thread from code that is not on the event loop (the CLI)."""
        return self._thread.run_sync(partial(self._counted, fn, args, kwargs))

    @property
    def endings(self) -> int:
        """How many store calls have committed a write that may have made some job final so far (read
        it before a read of the job; see ended_since)."""
        self._endings.hear()
        return self._endings.generation

    async def ended_since(self, job_id: str, seen: int, timeout: float) -> None:
        """Return once a store call of this process that may have made job_id final commits after
        `endings` was `seen`, or after timeout seconds (writes of other processes, such as other
        instances, are not heard of). A write whose call said which jobs it may have ended
        (`only_these_may_end`: a batch of device reports) wakes only the waits for those."""
        await self._endings.wait(job_id, seen, timeout)

    def may_have_ended(self, job_id: str, seen: int) -> bool:
        """Whether a store call that committed after `endings` was `seen` may have made job_id final."""
        return self._endings.may_have_ended(job_id, seen)

    def release_ending_waiters(self) -> None:
        """End every ended_since now (the service is stopping)."""
        self._endings.release()

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs), which must only read, on a reader thread: one snapshot, never
        behind a write (on SQLite a @single_statement fn here, unless it needs a snapshot; on
        PostgreSQL a `reads_rows` fn's statement from here too). Raises StoreUnavailable as `call` does."""
        if hasattr(fn, "statement") and not kwargs and self._rows_here:  # @reads_rows: its rows read here,
            # the answer made here
            try:
                if self._inline:
                    return _on_loop(self._loop_snapshot, fn.from_rows, self._inline_rows(fn, args), *args)
                return _on_loop(True, fn.from_rows, await self._rows_on_loop(fn, args), *args)
            except _NeedsSnapshot:
                pass  # PostgreSQL: more than one statement (a group job's counts); SQLite: too big, or locked
        elif self._inline and getattr(fn, "single_statement", False):
            try:
                return _on_loop(self._loop_snapshot, self._read, fn, args, kwargs)
            except _NeedsSnapshot:
                pass
            except sqlite3.OperationalError as e:  # a row fetched outside peewee's wrapper met a lock
                if not _locked(e):
                    raise
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._reads.put((loop, done, partial(self._read, fn, args, kwargs)))
        return await done

    def _inline_rows(self, fn: Any, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """SQLite: a @reads_rows fn's rows, on the event loop's own read-only connection (the
        driver's, without peewee's execute around it)."""
        key, sql, bound, query = _bound(*fn.statement, args)
        try:
            with pw.__exception_wrapper__:
                rows = _read_only_connection(self.database, on_loop=True).execute(sql, bound).fetchall()
        except UNAVAILABLE as e:
            if _locked(e):
                raise _NeedsSnapshot from None  # a reader thread waits for the lock (busy_timeout), not the loop
            raise self._read_failed(fn, e) from e
        return _converted(key, query, rows)

    def _loop_snapshot(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """SQLite: `snapshot(fn, *args)` on the event loop: fn in one read-only transaction on the
        loop's own connection (WAL: never behind the writer), each statement bounded by
        LOOP_READ_STEPS. Raises _NeedsSnapshot, for a reader thread to read it, if it would take
        more (a big group) or meets a lock or any other failure (the reader's errors are the answer)."""
        key = (fn, *args)
        if key in self._big:
            raise _NeedsSnapshot
        database = self.database
        try:
            with pw.__exception_wrapper__:
                conn = _read_only_connection(database, on_loop=True)
            return _in_transaction(database, conn, self._bounded, (conn, fn, args), {})
        except (*UNAVAILABLE, sqlite3.Error) as e:  # sqlite3's own: a row fetched outside peewee's wrapper
            if _sqlite_error(e) == SQLITE_INTERRUPT:
                self._big[key] = None
                if len(self._big) > BIG_READS_KEPT:
                    del self._big[next(iter(self._big))]
            if connection_lost(database):
                _drop_connection(database)
            raise _NeedsSnapshot from None

    async def _rows_on_loop(self, fn: Any, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """PostgreSQL: a @reads_rows fn's rows, sent by the event loop on its own connections (pg_async)."""
        try:
            if fn.batched is not None and len(args) == 1:  # with the other reads of it waiting for a connection
                name, build = fn.batched
                key, sql, _, query = _bound(name, build, args)
                rows = await self._on_loop.rows_of(f"{name}_1", sql, lambda keys: _bound(name, build, (keys,))[2],
                                                   args[0])
            else:
                key, sql, bound, query = _bound(*fn.statement, args)
                rows = await self._on_loop.rows(f"{key[0]}_{key[1]}", sql, bound)
            return _converted(key, query, rows)
        except UNAVAILABLE as e:
            raise self._unavailable(fn, e) from e

    def _bounded(self, conn: Any, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """fn(*args), interrupted past LOOP_READ_STEPS (BEGIN and ROLLBACK around it never are). SQLite
        counts a statement's steps over all its runs (a cached statement's too), so the handler is
        called every STEPS_PER_CHECK steps and this read's calls are counted here."""
        self._checks_left = LOOP_READ_STEPS // STEPS_PER_CHECK
        conn.set_progress_handler(self._progress, STEPS_PER_CHECK)
        try:
            return fn(*args)
        finally:
            conn.set_progress_handler(None, 0)

    def _progress(self) -> int:
        """SQLite's progress handler during a snapshot read on the loop: non-zero (interrupt) past its budget."""
        self._checks_left -= 1
        return self._checks_left < 0

    def close(self) -> None:
        for _ in self._readers:
            self._reads.put(None)
        for reader in self._readers:
            reader.join()
        _drop_connection(self.database)  # this thread's, if reads ran on it (SQLite, @single_statement)
        if self._on_loop is not None:
            self._on_loop.close()
        self._thread.run_sync(partial(discard_connection, self.database))
        self._thread.stop()

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

    def _counted(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        try:
            return self._run(fn, args, kwargs)
        finally:
            if self.database.wrote and _may_have_ended != _NOTHING and not getattr(fn, "writes_no_jobs", False):
                self._endings.tell(_may_have_ended)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if getattr(fn, "reports_queue_changes", False):
            return self._run_call(fn, args, kwargs)
        global _calls, _running, _epoch
        _calls += 1
        _running = _calls
        before = self._changes()
        changed = True
        try:
            result = self._run_call(fn, args, kwargs)
            changed = before is None or self._changes() != before
            return result
        finally:
            if changed:
                _epoch = _running
            _running = None

    def _changes(self) -> tuple[Any, int] | None:
        """The store's SQLite connection and the rows it has changed so far; None where that cannot
        be told (no connection open, PostgreSQL): a call then counts as a change."""
        database = self.database
        if isinstance(database, pw.SqliteDatabase) and not database.is_closed():
            connection = database.connection()
            return connection, connection.total_changes
        return None

    def _run_call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
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
        global _may_have_ended
        database = self.database
        database.wrote = database.began = False
        _may_have_ended = None
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

    # The reader threads from here on. They share the database object with the store's thread (peewee
    # keeps one connection per thread) but never touch its `wrote`, `began` or `rollback_error`: those
    # are the store thread's. A read opens its transaction on the driver's connection itself.

    def _reader(self) -> None:
        try:
            while (work := self._reads.get()) is not None:
                _answer_on_loop(*work)
        finally:
            _drop_connection(self.database)

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        database = self.database
        if connection_stale(database):
            _drop_connection(database)
        try:
            return _snapshot(database, fn, args, kwargs)
        except UNAVAILABLE as e:
            if getattr(_READ_ONLY, "on_loop", False) and _locked(e):
                raise _NeedsSnapshot from None  # on the event loop: a reader thread waits for the lock
            if not connection_lost(database):
                raise self._read_failed(fn, e) from e
            _drop_connection(database)
            log.warning("lost the connection to the %s in %s (%s); reading again on a new connection",
                        self.where, fn.__name__, explain(database, e))
        try:
            return _snapshot(database, fn, args, kwargs)
        except UNAVAILABLE as e:
            raise self._read_failed(fn, e) from e

    def _read_failed(self, fn: Callable[..., Any], error: Exception) -> StoreUnavailable:
        """_unavailable, after dropping this thread's connection if it was lost."""
        unavailable = self._unavailable(fn, error)
        if connection_lost(self.database):
            _drop_connection(self.database)
        return unavailable

    def _unavailable(self, fn: Callable[..., Any], error: Exception) -> StoreUnavailable:
        """The error a read that failed with a driver's error raises, logged once."""
        reason = explain(self.database, error)
        log.error("%s failed on the %s: %s", fn.__name__, self.where, reason)
        return StoreUnavailable(f"the database is unavailable: {reason}")


class _StoreThread:
    """The store's one thread: runs what it is handed one at a time, in the order handed. An awaited
    call's answer goes back with one call_soon_threadsafe, as a reader thread's does: no
    concurrent.futures.Future with its lock and condition, chained to an asyncio one by callbacks on
    both threads (run_in_executor), which cost the service more per device-report batch than the
    batch's own queries. A call whose caller was cancelled before it began does not run (as with
    run_in_executor)."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[Read | tuple[None, Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, work: Callable[[], T]) -> T:
        """work() on the store's thread, awaited on the caller's loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._work.put((loop, done, work))
        return await done

    def run_sync(self, work: Callable[[], T]) -> T:
        """work() on the store's thread, from a thread that may block (not the event loop)."""
        done: Future[T] = Future()
        self._work.put((None, done, work))
        return done.result()

    def stop(self) -> None:
        """Run what was handed so far, then end the thread."""
        self._work.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            loop, done, work = item
            if loop is None:
                _run_blocking(done, work)
            else:
                _answer_on_loop(loop, done, work)


def _answer_on_loop(loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any], work: Callable[[], Any]) -> None:
    """On a store or reader thread: work(), its answer or error handed to the caller's loop with one
    call_soon_threadsafe; nothing if the caller went away before it began (a benign race: it may
    still run)."""
    if done.cancelled():
        return
    try:
        answer = partial(_resolve, done, work(), None)
    except BaseException as e:
        answer = partial(_resolve, done, None, e)
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(answer)


def _run_blocking(done: Future[Any], work: Callable[[], Any]) -> None:
    """work() for a blocking caller (run_sync): its answer or error into done."""
    if not done.set_running_or_notify_cancel():
        return
    try:
        done.set_result(work())
    except BaseException as e:
        done.set_exception(e)


def _on_loop(snapshots: Callable[[Callable[..., Any], tuple[Any, ...]], Any] | bool, fn: Callable[..., T],
             *args: Any) -> T:
    """fn(*args) on the event loop, where `snapshot(f, *a)` is snapshots(f, a) (SQLite: Store._loop_snapshot),
    or with True raises _NeedsSnapshot (PostgreSQL: it would block)."""
    _READ_ONLY.on_loop = snapshots
    try:
        return fn(*args)
    finally:
        _READ_ONLY.on_loop = False


def _sqlite_error(error: Exception) -> int | None:
    """The primary SQLite result code of a driver's error peewee wrapped, if it is SQLite's."""
    driver = error.args[0] if error.args and isinstance(error.args[0], Exception) else error
    code = getattr(driver, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _locked(error: Exception) -> bool:
    """Whether a driver's error is SQLite's "database is locked" (BUSY or LOCKED): on the event loop a
    reader thread makes such a read, waiting for the lock there (busy_timeout), never the loop."""
    return _sqlite_error(error) in (SQLITE_BUSY, SQLITE_LOCKED)


def _resolve(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the event loop: a read's answer to its caller, unless the caller is gone."""
    if done.cancelled():
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


_READ_ONLY = threading.local()  # the reader thread's connection once it is made read-only


def _snapshot(database: GuardedDatabase, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    """fn in one read-only transaction on this thread's connection; a @single_statement fn without
    one (it opens one itself, with `snapshot`, if it needs more than one statement)."""
    with pw.__exception_wrapper__:
        conn = _read_only_connection(database, on_loop=bool(getattr(_READ_ONLY, "on_loop", False)))
    if not getattr(fn, "single_statement", False):
        return _in_transaction(database, conn, fn, args, kwargs)
    _READ_ONLY.lazy = True
    try:
        return fn(*args, **kwargs)
    finally:
        _READ_ONLY.lazy = False


def _read_only_connection(database: GuardedDatabase, on_loop: bool = False) -> Any:
    """This thread's driver connection, made read-only the first time it is used for reads; on the
    event loop's (SQLite) also made never to wait for a lock: SQLITE_BUSY at once, no busy_timeout sleep."""
    conn = database.connection()
    if getattr(_READ_ONLY, "conn", None) is not conn:
        sqlite = isinstance(database, pw.SqliteDatabase)
        _raw(conn, "PRAGMA query_only = 1" if sqlite else "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        if sqlite and on_loop:
            _raw(conn, "PRAGMA busy_timeout = 0")
        _READ_ONLY.conn = conn
    return conn


def _in_transaction(database: GuardedDatabase, conn: Any, fn: Callable[..., T], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> T:
    with pw.__exception_wrapper__:
        _raw(conn, "BEGIN" if isinstance(database, pw.SqliteDatabase) else "BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        try:
            _raw(conn, "ROLLBACK")
        except Exception:  # a connection that cannot roll back is not trusted again
            _drop_connection(database)
        raise
    with pw.__exception_wrapper__:
        _raw(conn, "ROLLBACK")
    return result


def single_statement(fn: F) -> F:
    """Mark a reading function that makes one statement, or calls `snapshot` before it makes more.

    One statement sees one moment by itself, so Store.read runs such a function without BEGIN and
    ROLLBACK around it: one round trip instead of three on PostgreSQL.
    """
    fn.single_statement = True
    return fn


class _NeedsSnapshot(Exception):
    """A read on the event loop cannot be made there (PostgreSQL: it needs a snapshot; SQLite: its
    snapshot is too big for the loop, or it met a lock): a reader thread makes it."""


def snapshot(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in one read-only transaction, from a @single_statement function that Store.read
    runs; anywhere else (the store's thread, a read already in one) fn(*args) as it is."""
    snapshots = getattr(_READ_ONLY, "on_loop", False)
    if snapshots is True:
        raise _NeedsSnapshot
    if snapshots:
        _READ_ONLY.on_loop = False  # inside it, fn(*args) as it is
        try:
            return snapshots(fn, args)
        finally:
            _READ_ONLY.on_loop = snapshots
    if not getattr(_READ_ONLY, "lazy", False):
        return fn(*args)
    database = db.obj
    _READ_ONLY.lazy = False
    try:
        return _in_transaction(database, database.connection(), fn, args, {})
    finally:
        _READ_ONLY.lazy = True


def _raw(conn: Any, sql: str) -> None:
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def _drop_connection(database: GuardedDatabase) -> None:
    """Close this reader thread's connection, whatever state it is in (not the store thread's flags)."""
    _READ_ONLY.conn = None
    close_connection(database)


class Arg:
    """Where a prepared query takes the index-th argument it is run with."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def arg(index: int) -> pw.Value:
    """A placeholder for a prepared query; its argument is passed as the driver takes it (not converted)."""
    return pw.Value(Arg(index), converter=False)


_PREPARED: dict[tuple[str, int, type], tuple[str, list[Any] | None, Any]] = {}


def prepared(name: str, build: Callable[[int], Any], *values: Any) -> Any:
    """Run the query build(len(values)) makes, its arg(i) placeholders taking values[i]; its rows
    as peewee gives them (models, tuples, ...), or its cursor for a write.

    peewee turns a query into SQL text on every run, which costs more than SQLite running it; this
    builds it once per name, number of values and kind of database, then only binds new values.
    A query over a list is built once per length (`padded` keeps the lengths few).
    """
    cursor, query = _run_prepared(name, build, values)
    if isinstance(query, pw.SelectBase):
        return query._get_cursor_wrapper(cursor)  # peewee's own conversion of the rows
    return cursor


def _run_prepared(name: str, build: Callable[[int], Any], values: tuple[Any, ...]) -> tuple[Any, Any]:
    """The driver's cursor after running the prepared query (see `prepared`), and the query."""
    _, sql, bound, query = _bound(name, build, values)
    return db.execute_sql(sql, bound), query


def _prepare(key: tuple[str, int, type], build: Callable[[int], Any]) -> tuple[str, list[Any] | None, Any]:
    query = build(key[1])
    sql, params = query.sql()
    in_order = [p.index if isinstance(p, Arg) else None for p in params] == list(range(key[1]))
    entry = _PREPARED[key] = (sql, None if in_order else params, query)  # None: the values as they come
    return entry


_CONVERTERS: dict[tuple[str, int, type], list[tuple[int, Callable[[Any], Any]]]] = {}
_AS_DRIVERS_GIVE = (pw.CharField, pw.TextField, pw.IntegerField)  # str and int already: nothing to convert


def prepared_rows(name: str, build: Callable[[int], Any], *values: Any) -> list[tuple[Any, ...]]:
    """The rows of a prepared SELECT (see `prepared`) as plain tuples, converting only the columns
    whose values the driver does not give as the model does (dates, booleans, ...). peewee's
    conversion calls a function for every value of every row, which costs more than SQLite
    running the query when a read returns thousands of rows."""
    cursor, query = _run_prepared(name, build, values)  # no peewee cursor wrapper: it is built per query
    return _converted((name, len(values), type(db.obj)), query, cursor.fetchall())


def _converted(key: tuple[str, int, type], query: Any, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    converters = _CONVERTERS.get(key)
    if converters is None:
        converters = _CONVERTERS[key] = [(i, _converter(c)) for i, c in enumerate(query._returning)
                                         if isinstance(c, pw.Field) and not _as_driver_gives(c)]
    if not converters:
        return rows
    converted = []
    for row in rows:
        row = list(row)
        for i, convert in converters:
            if row[i] is not None:  # NULL is None to every field (and most of an outer join's columns)
                row[i] = convert(row[i])
        converted.append(tuple(row))
    return converted


def reads_rows(name: str, build: Callable[[int], Any],
               batched: Callable[[int], Any] | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Mark a read made of one prepared SELECT and what follows from its rows: the store function
    f(*values) is from_rows(prepared_rows(name, build, *values), *values), a @single_statement read.
    On PostgreSQL Store.read sends the statement from the event loop itself (pg_async) and runs
    from_rows there; from_rows may still call `snapshot` (then a reader thread runs f; on SQLite the
    loop reads that snapshot too, unless it is too big: Store._loop_snapshot).
    `batched` (PostgreSQL, a read of one value): the same SELECT for a list of values (arg(0) = ANY),
    its first column the value, which the event loop sends for the reads that wait for a connection
    together (pg_async.AsyncReads.rows_of)."""
    def mark(from_rows: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(from_rows)
        def read(*values: Any) -> T:
            return from_rows(prepared_rows(name, build, *values), *values)
        read.single_statement = True  # type: ignore[attr-defined]
        read.statement = (name, build)  # type: ignore[attr-defined]
        read.batched = (f"{name}_any", batched) if batched is not None else None  # type: ignore[attr-defined]
        read.from_rows = from_rows  # type: ignore[attr-defined]
        return read
    return mark


def _bound(name: str, build: Callable[[int], Any], values: tuple[Any, ...]) -> tuple[Any, str, list[Any], Any]:
    """A prepared query's key, SQL, values in the order its placeholders take them, and the query (see `prepared`)."""
    key = (name, len(values), type(db.obj))
    sql, params, query = _PREPARED.get(key) or _prepare(key, build)
    return key, sql, list(values) if params is None else [values[p.index] if isinstance(p, Arg) else p
                                                            for p in params], query


def _as_driver_gives(field: pw.Field) -> bool:
    """The driver gives this column's values as the model holds them (a key to a str or int column too)."""
    return isinstance(field.rel_field if isinstance(field, pw.ForeignKeyField) else field, _AS_DRIVERS_GIVE)


def as_models(row: tuple[Any, ...], *models: type[pw.Model]) -> list[Any]:
    """A row of a select(*models) (each model's fields in its own order) as one instance per model,
    None where the primary key is NULL (an outer join that found nothing). What peewee makes, without
    matching the cursor's columns to fields again on every query. Convert the row first (prepared_rows)."""
    found, start = [], 0
    for model in models:
        names, key = _LAYOUTS.get(model) or _LAYOUTS.setdefault(model, _layout(model))
        values = row[start:start + len(names)]
        start += len(names)
        if values[key] is None:
            found.append(None)
            continue
        instance = model.__new__(model)
        instance.__data__, instance._dirty, instance.__rel__ = dict(zip(names, values, strict=True)), set(), {}
        found.append(instance)
    return found


_LAYOUTS: dict[type[pw.Model], tuple[tuple[str, ...], int]] = {}


def _layout(model: type[pw.Model]) -> tuple[tuple[str, ...], int]:
    names = tuple(model._meta.sorted_field_names)
    return names, names.index(model._meta.primary_key.name)


def _converter(field: pw.Field) -> Callable[[Any], Any]:
    """field.python_value; for a date and time as peewee writes it in SQLite ('YYYY-MM-DD HH:MM:SS'
    and optionally '.ffffff'), datetime.fromisoformat, which reads those two forms alike and is
    many times faster than peewee's strptime."""
    if not isinstance(field, pw.DateTimeField):
        return field.python_value

    def convert(value: Any) -> Any:
        if isinstance(value, str) and len(value) in (19, 26):
            return datetime.fromisoformat(value)
        return field.python_value(value)
    return convert


def args(count: int, first: int = 0) -> list[pw.Value]:
    """Placeholders first .. first + count - 1, for an IN list."""
    return [arg(i) for i in range(first, first + count)]


def padded(items: list[T]) -> list[T]:
    """items, the last repeated up to the next power of two: a list for `IN (...)` whose length
    is one of a few, so few prepared queries serve every length. Duplicates change no IN."""
    size = 1
    while size < len(items):
        size *= 2
    return items + items[-1:] * (size - len(items))


def pieces(items: list[T], largest: int = 256) -> Iterable[list[T]]:
    """items in runs whose lengths are powers of two (at most `largest`): a multi-row INSERT of each
    is one of a few prepared queries."""
    while items:
        size = 1 << (min(len(items), largest).bit_length() - 1)
        yield items[:size]
        items = items[size:]


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


def release_children(children: list[tuple[int, str]]) -> list[str]:
    """Inside the caller's transaction: these (seq, device id) children, if still SCHEDULED, become
    QUEUED (a release: by their release_at, a rollout, or a rollback's partner failing); returns
    their devices, sorted."""
    for chunk in chunks([seq for seq, _ in children]):
        (ChildJob.update(status=JobStatus.QUEUED.value, reason=None, release_at=None, updated=now())
         .where(ChildJob.seq.in_(chunk), ChildJob.status == JobStatus.SCHEDULED.value).execute())
    return sorted({device for _, device in children})


def chunks(items: list[T], size: int = CHUNK) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
