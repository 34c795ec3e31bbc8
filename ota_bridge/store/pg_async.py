"""PostgreSQL reads on the event loop: a few asyncpg connections of the store's own.

A read made of one prepared statement (`reads_rows` in the store) is sent by the event loop itself
on one of these connections, with asyncpg: the extended protocol (Bind, Execute, Sync of a
statement prepared once per connection under a name of ours) and binary values, decoded in C. No
reader thread, no hand-off to one and back, one wake-up per answer. The connections' sessions are
read-only (default_transaction_read_only); each statement runs outside any BEGIN, so it is its own
transaction and sees one moment by itself, every write committed before it began included.

A read of many keys' statement (`rows_of`: GET /v1/job/{id}'s, `job_id = ANY($2)`) waits for a
connection together with the other reads of it that arrive meanwhile, and goes as one statement for
all their keys: under load one round trip, one wake-up and one execution serve many reads. A
statement is only ever sent after each read it answers was asked for, so each sees every write
committed before it was asked for (nothing is kept for later reads).

The store's threads keep psycopg2 (peewee); asyncpg is only for these reads. Without asyncpg
installed (`AVAILABLE` false) the store sends them to its reader threads instead.

An idle connection found closed (asyncpg notices the server's goodbye and the end of the
connection) is replaced before use; a read that meets a lost connection runs once more on a new
one, as the reader threads do. The connections take psycopg2's connect parameters (peewee's
`connect_params`): the same application_name, connect timeout, TCP keepalives and user timeout.
asyncpg's errors become peewee's (OperationalError for a connection that fails or is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from typing import Any, Callable

import peewee as pw

try:
    import asyncpg
except ImportError:  # SQLite only, or PostgreSQL without the event loop's reads (reader threads then)
    asyncpg = None

AVAILABLE = asyncpg is not None
CONNECTIONS = 8  # at most this many statements in flight; more wait for a connection
BATCH = 64  # keys one statement of `rows_of` reads at most
STATEMENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,50}")
# psycopg2's connect parameters the TCP socket's options stand for (libpq sets them itself).
_SOCKET_OPTIONS = (("keepalives_idle", "TCP_KEEPIDLE"), ("keepalives_interval", "TCP_KEEPINTVL"),
                   ("keepalives_count", "TCP_KEEPCNT"), ("tcp_user_timeout", "TCP_USER_TIMEOUT"))


class AsyncReads:
    """The event loop's own connections to a PostgreSQL database (peewee's connect parameters)."""

    def __init__(self, database: pw.PostgresqlDatabase, size: int = CONNECTIONS) -> None:
        self._database = database
        self._size = size
        self._idle: list[_Connection] = []
        self._statements: dict[str, _Statement] = {}
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batches: dict[str, _Batch] = {}  # by statement: the reads waiting for its next run
        self._sending: set[asyncio.Task[None]] = set()

    async def rows(self, name: str, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement (peewee's SQL and parameters), prepared on the server under
        `name` the first time a connection runs it. Raises peewee's errors: OperationalError or
        InterfaceError when the database cannot be reached, after one more try on a new connection
        if the first was lost."""
        loop = asyncio.get_running_loop()
        async with self._slots_of(loop):
            return await self._run(loop, name, sql, params)

    async def rows_of(self, name: str, sql: str, params_of: Callable[[list[Any]], list[Any]],
                      key: Any) -> list[tuple[Any, ...]]:
        """The rows of `key` among those of a statement that reads many keys at once (its first column
        is the key; params_of(keys) its parameters). Reads of one statement asked for while it waits
        for a connection go with it, in one statement, once a connection is free (up to BATCH keys);
        alone when a connection is free already. A statement is only ever sent after every read it
        answers was asked for: it sees every write committed before each (nothing is kept for later)."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(name)
        if batch is None or batch.loop is not loop or len(batch.keys) >= BATCH:
            batch = self._batches[name] = _Batch(loop)
            task = loop.create_task(self._send(batch, name, sql, params_of))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        waiter: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()
        batch.keys[key] = None
        batch.waiters.append((key, waiter))
        return await waiter

    async def _send(self, batch: _Batch, name: str, sql: str, params_of: Callable[[list[Any]], list[Any]]) -> None:
        """Run a batch's statement once a connection is free, and answer each of its reads."""
        try:
            async with self._slots_of(batch.loop):
                if self._batches.get(name) is batch:  # from now on, reads wait for the next statement
                    del self._batches[name]
                rows = await self._run(batch.loop, name, sql, params_of(list(batch.keys)))
        except BaseException as e:
            for _, waiter in batch.waiters:
                if waiter.done():
                    continue
                if isinstance(e, asyncio.CancelledError):
                    waiter.cancel()
                else:  # an error of each read's own (peewee's, as `rows` raises them)
                    waiter.set_exception(type(e)(*e.args) if isinstance(e, pw.PeeweeException) else e)
            if not isinstance(e, Exception):
                raise
            return
        by_key: dict[Any, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_key.setdefault(row[0], []).append(row)
        for key, waiter in batch.waiters:
            if not waiter.done():  # (a read whose request went away meanwhile)
                waiter.set_result(by_key.get(key, []))

    async def _run(self, loop: asyncio.AbstractEventLoop, name: str, sql: str,
                   params: list[Any]) -> list[tuple[Any, ...]]:
        """rows, once a connection slot is taken."""
        statement = self._statements.get(name) or self._statements.setdefault(name, _Statement(name, sql))
        try:
            conn = await self._checkout(loop)
            try:
                rows = await conn.run(statement, params)
            except _DRIVER_ERRORS:
                if not conn.lost:  # an error of the statement's own
                    raise
                conn = await _Connection.open(self._database, loop)
                rows = await conn.run(statement, params)
        except _DRIVER_ERRORS as e:
            raise _as_peewee(e) from e
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
            if conn.loop is loop and not conn.raw.is_closed():
                return conn
            conn.close()
        return await _Connection.open(self._database, loop)


class _Batch:
    """The reads of one statement waiting for its next run: their keys (once each), and each read's future."""

    __slots__ = ("loop", "keys", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.keys: dict[Any, None] = {}
        self.waiters: list[tuple[Any, asyncio.Future[list[tuple[Any, ...]]]]] = []


class _Statement:
    """A statement's SQL for the server: peewee's %s placeholders become $1, $2, ..."""

    __slots__ = ("name", "sql")

    def __init__(self, name: str, sql: str) -> None:
        if not STATEMENT_NAME.fullmatch(name) or "%" in sql.replace("%s", ""):
            raise ValueError(f"cannot prepare {name!r}: {sql[:80]}")
        pieces = sql.split("%s")
        self.name = f"ota_{name}"
        self.sql = "".join(f"{piece}${i}" for i, piece in enumerate(pieces[:-1], 1)) + pieces[-1]


class _Connection:
    """An asyncpg connection used from one loop, and the statements prepared on it (a prepared
    statement lives as long as its connection; planning the joined read costs the server more than
    running it)."""

    __slots__ = ("raw", "loop", "prepared", "lost")

    def __init__(self, raw: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.raw, self.loop = raw, loop
        self.prepared: dict[str, Any] = {}
        self.lost = False  # its last statement failed because the connection was lost

    @classmethod
    async def open(cls, database: pw.PostgresqlDatabase, loop: asyncio.AbstractEventLoop) -> _Connection:
        params = database.connect_params
        timeout = params.get("connect_timeout") or 60  # asyncpg's default
        try:
            raw = await asyncpg.connect(
                host=params.get("host"), port=params.get("port"), user=params.get("user"),
                password=params.get("password"), database=database.database, timeout=timeout,
                statement_cache_size=0,  # ours are prepared by name; anything else runs unnamed
                server_settings={"application_name": params.get("application_name") or "",
                                 "default_transaction_read_only": "on"})
        except asyncio.TimeoutError:
            raise pw.OperationalError(f"no connection within {timeout} s") from None
        except _DRIVER_ERRORS as e:  # any failure to connect is an OperationalError, as psycopg2's are
            reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else " ".join(str(e).split())
            raise pw.OperationalError(f'connection to server at "{params.get("host")}", port {params.get("port")} '
                                      f"failed: {reason}") from e
        try:
            _set_socket_options(raw, params)
            # float4 as psycopg2 reads it, from its text (0.1, not the binary value's 0.10000000149011612)
            await raw.set_type_codec("float4", schema="pg_catalog", encoder=str, decoder=float, format="text")
        except BaseException:
            raw.terminate()
            raise
        return cls(raw, loop)

    async def run(self, statement: _Statement, params: list[Any]) -> list[tuple[Any, ...]]:
        """The statement's rows; on any failure the connection is closed (a statement may still be
        running on it: a cancelled read)."""
        try:
            prepared = self.prepared.get(statement.name)
            if prepared is None:
                prepared = self.prepared[statement.name] = await self.raw.prepare(statement.sql, name=statement.name)
            records = await prepared.fetch(*params)
        except BaseException as e:
            self.lost = self.raw.is_closed() or _lost(e)
            self.close()
            raise
        return [tuple(record) for record in records]

    def close(self) -> None:
        """Close it at once (no goodbye to the server, which may be gone; closing its socket ends its
        session), even if its loop is closed already."""
        if self.raw.is_closed():
            return
        if not self.loop.is_closed():
            self.raw.terminate()
            return
        # Its loop is closed (asyncio.run ended), and aborting the transport needs it to report the
        # loss: asyncpg's terminate marks the connection closed and says goodbye before it meets the
        # closed loop; then close the socket asyncio's transport holds (its own attribute) as it would.
        transport = self.raw._transport
        with contextlib.suppress(RuntimeError):
            self.raw.terminate()
        sock, transport._sock = transport._sock, None
        if sock is not None:
            sock.close()


def _set_socket_options(raw: Any, params: dict[str, Any]) -> None:
    """The TCP keepalives and user timeout libpq sets from psycopg2's parameters (none on a Unix socket)."""
    sock = raw._transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, option in _SOCKET_OPTIONS:
        if params.get(name) is not None and hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), int(params[name]))


# What asyncpg raises: the server's errors (PostgresError, by SQLSTATE), its own (InterfaceError,
# ConnectionDoesNotExistError for a connection lost mid-statement), the socket's (OSError).
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) if asyncpg else ()
# psycopg2's classes of SQLSTATE (the first two characters), which peewee's errors take the names of.
_BY_CLASS = {
    **dict.fromkeys(("02", "21", "22"), pw.DataError),
    "23": pw.IntegrityError,
    **dict.fromkeys(("3D", "3F", "42", "44"), pw.ProgrammingError),
    **dict.fromkeys(("08", "40", "53", "54", "55", "57", "58", "F0", "HV"), pw.OperationalError),
    "0A": pw.NotSupportedError,
}


def _as_peewee(error: BaseException) -> pw.PeeweeException:
    """The peewee error psycopg2's would have been (the class psycopg2 gives the SQLSTATE; a failed or
    lost connection is an OperationalError)."""
    state = getattr(error, "sqlstate", None)
    if isinstance(error, asyncpg.PostgresError) and state:
        kind = _BY_CLASS.get(state[:2], pw.InternalError)
    elif isinstance(error, (OSError, asyncpg.ConnectionDoesNotExistError)):
        kind = pw.OperationalError
    else:
        kind = pw.InterfaceError
    return kind(" ".join(str(error).split()) or type(error).__name__)


def _lost(error: BaseException) -> bool:
    """Whether a statement failed because its connection was lost (the socket's error, the connection
    closed under it, the server's goodbye: connection failure 08, shutdown or crash 57P)."""
    state = getattr(error, "sqlstate", None) or ""
    return isinstance(error, (OSError, asyncpg.ConnectionDoesNotExistError)) or state[:2] == "08" \
        or state[:3] == "57P"
