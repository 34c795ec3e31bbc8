"""Everything the service reads or writes in the database, and nowhere else.

One module per subject: `tokens`, `workflows`, `devices`, `jobs`, `queues` (what the dispatcher
publishes) and `updates` (what devices report). Their functions are blocking; `Store.call` runs
them on the store's own thread so the event loop never waits on the database. With SQLite that
one thread is also the one writer, so writes never contend; a write that spans several rows is
one transaction, so nothing is half-written.

This module holds only the Store and the helpers the subject modules share; it imports none of them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Iterable, TypeVar

import peewee as pw

from agent.protocol import PENDING_STATUSES, JobStatus

from ..errors import StoreUnavailable
from ..models import ChildJob, db, now, open_database

T = TypeVar("T")
PENDING = [s.value for s in PENDING_STATUSES]
CHUNK = 500  # rows per INSERT: under SQLite's bound-variable limit for every table here


class Store:
    """The database, opened once, used from one worker thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ota-store")
        self.database: pw.Database = self._executor.submit(open_database, url).result()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) on the store's thread.

        Raises StoreUnavailable when the database cannot be reached or stays locked.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except (pw.OperationalError, pw.InterfaceError) as e:
            raise StoreUnavailable(f"the database is unavailable: {e}") from e

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the store's thread from code that is not on the event loop (the CLI)."""
        return self._executor.submit(partial(fn, *args, **kwargs)).result()

    def close(self) -> None:
        self._executor.submit(self.database.close).result()
        self._executor.shutdown(wait=True)


def write_transaction() -> Any:
    """A write transaction that takes SQLite's write lock up front (no upgrade deadlocks)."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


def finalize(status: JobStatus, reason: str, *where: Any) -> int:
    """The service makes jobs final itself; a device's later report is kept beside (see updates._apply_late)."""
    return (ChildJob.update(status=status.value, end_time=now(), updated=now(), reason=reason,
                            finalized_by_service=True).where(*where).execute())


def chunks(items: list[T], size: int = CHUNK) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
