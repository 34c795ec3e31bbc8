"""PostgreSQL reads on the event loop: a few asynchronous psycopg2 connections, driven by the loop.

A read made of one prepared statement (`reads_rows` in the store) is sent on one of these
connections, and the loop waits for its answer on the connection's socket (add_reader /
add_writer): no reader thread, no hand-off to one and back. Async connections are in autocommit,
so each statement is its own read-only transaction and sees one moment by itself.

An idle connection found closed (the server's goodbye is waiting on it) is replaced before use;
a read that meets a lost connection runs once more on a new one, as the reader threads do.
Connecting gives up after the connection's connect_timeout, which libpq leaves to the caller here.
"""

from __future__ import annotations

import asyncio
import re
import select
from typing import Any

import peewee as pw

try:
    import psycopg2 as _pg
    from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE
except ImportError:  # SQLite only: this module is never used
    _pg = None
    POLL_OK, POLL_READ, POLL_WRITE = 0, 1, 2

_DRIVER_ERRORS = (_pg.OperationalError, _pg.InterfaceError) if _pg else ()
CONNECTIONS = 8  # at most this many reads in flight; more wait for a connection
STATEMENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,50}")
READ_ONLY = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"


class AsyncReads:
    """The event loop's own connections to a PostgreSQL database (peewee's connect parameters)."""

    def __init__(self, database: pw.PostgresqlDatabase, size: int = CONNECTIONS) -> None:
        self._database = database
        self._size = size
        self._idle: list[_Connection] = []
        self._statements: dict[str, _Statement] = {}
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def rows(self, name: str, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement (peewee's SQL and parameters), prepared on the server under
        `name` the first time a connection runs it. Raises peewee's OperationalError or InterfaceError
        when the database cannot be reached, after one more try on a new connection if the first was lost."""
        statement = self._statements.get(name) or self._statements.setdefault(name, _Statement(name, sql))
        loop = asyncio.get_running_loop()
        async with self._slots_of(loop):
            with pw.__exception_wrapper__:
                conn = await self._checkout(loop)
                try:
                    rows = await conn.run(statement, params)
                except _DRIVER_ERRORS:
                    lost = bool(conn.raw.closed)
                    conn.close()
                    if not lost:
                        raise
                    conn = await _Connection.open(self._database, loop)
                    rows = await conn.run(statement, params)
                self._idle.append(conn)
                return rows

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _slots_of(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._loop is not loop:  # a semaphore belongs to one loop
            self._loop, self._slots = loop, asyncio.Semaphore(self._size)
        assert self._slots is not None
        return self._slots

    async def _checkout(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale and conn.loop is loop:
                return conn
            conn.close()
        return await _Connection.open(self._database, loop)


class _Statement:
    """A statement's PREPARE and EXECUTE: peewee's %s placeholders become $1, $2, ..."""

    __slots__ = ("name", "prepare", "execute")

    def __init__(self, name: str, sql: str) -> None:
        if not STATEMENT_NAME.fullmatch(name) or "%" in sql.replace("%s", ""):
            raise ValueError(f"cannot prepare {name!r}: {sql[:80]}")
        pieces = sql.split("%s")
        numbered = "".join(f"{piece}${i}" for i, piece in enumerate(pieces[:-1], 1)) + pieces[-1]
        self.name = f"ota_{name}"
        self.prepare = f"PREPARE {self.name} AS {numbered}"
        self.execute = f"EXECUTE {self.name}({', '.join(['%s'] * (len(pieces) - 1))})" if len(pieces) > 1 \
            else f"EXECUTE {self.name}"


class _Connection:
    """An async psycopg2 connection used from one loop, and the statements prepared on it (a prepared
    statement lives as long as its connection; planning the joined read costs the server more than
    running it). Its socket stays registered with the loop while it is open: readable, it wakes the
    statement waiting for its answer; readable while idle, the server is closing it (it is stale)."""

    __slots__ = ("raw", "loop", "fd", "prepared", "waiter", "busy", "stale", "registered")

    def __init__(self, raw: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.raw, self.loop, self.fd = raw, loop, raw.fileno()
        self.prepared: set[str] = set()
        self.waiter: asyncio.Future[None] | None = None
        self.busy = self.stale = False
        loop.add_reader(self.fd, self._readable)
        self.registered = True

    @classmethod
    async def open(cls, database: pw.PostgresqlDatabase, loop: asyncio.AbstractEventLoop) -> _Connection:
        params = database.connect_params
        raw = _pg.connect(database=database.database, async_=True, **params)
        try:
            try:
                await asyncio.wait_for(_connected(raw, loop), params.get("connect_timeout") or None)
            except asyncio.TimeoutError:
                raise _pg.OperationalError(f"no connection within {params['connect_timeout']} s") from None
            conn = cls(raw, loop)
        except BaseException:
            raw.close()
            raise
        await conn.run(None, None)
        return conn

    async def run(self, statement: _Statement | None, params: list[Any] | None) -> list[tuple[Any, ...]]:
        """The statement's rows (None: make the session read-only); on any failure the connection is closed."""
        self.busy = True
        try:
            if statement is None:
                return await self._execute(READ_ONLY, None, fetch=False)
            if statement.name not in self.prepared:
                await self._execute(statement.prepare, None, fetch=False)
                self.prepared.add(statement.name)
            rows = await self._execute(statement.execute, params)
        except BaseException:  # a statement may still be running on it (a cancelled read)
            self.close()
            raise
        self.busy = False
        return rows

    def close(self) -> None:
        """Close it, and forget its socket in the loop's selector (libpq may have closed the socket
        itself, on a lost connection: its number may be reused by the next connection)."""
        self._unregister()
        self.raw.close()

    def _unregister(self) -> None:
        if self.registered:
            self.registered = False
            self.loop.remove_reader(self.fd)

    async def _execute(self, sql: str, params: Any, fetch: bool = True) -> list[tuple[Any, ...]]:
        cursor = self.raw.cursor()
        try:
            cursor.execute(sql, params)  # sends it (what the socket takes now; poll sends the rest)
            while (state := self.raw.poll()) != POLL_OK:
                if state == POLL_READ:
                    self.waiter = self.loop.create_future()
                    try:
                        await self.waiter
                    finally:
                        self.waiter = None
                else:
                    await _wait(self.loop, self.fd, state)
            return cursor.fetchall() if fetch else []
        finally:
            cursor.close()

    def _readable(self) -> None:
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(None)
        elif not self.busy and _readable(self.fd):  # the server's goodbye, or the end of the connection
            self.stale = True  # (a readiness the selector saw before the last answer was read, not this)
            self._unregister()


async def _connected(raw: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Wait until an async connection is made (libpq may change sockets meanwhile)."""
    while (state := raw.poll()) != POLL_OK:
        await _wait(loop, raw.fileno(), state)


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, state: int) -> None:
    if state not in (POLL_READ, POLL_WRITE):
        raise _pg.OperationalError(f"unexpected state {state} of an asynchronous connection")
    add, remove = (loop.add_reader, loop.remove_reader) if state == POLL_READ else (loop.add_writer, loop.remove_writer)
    waiter = loop.create_future()
    add(fd, _wake, waiter)
    try:
        await waiter
    finally:
        remove(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _readable(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True
