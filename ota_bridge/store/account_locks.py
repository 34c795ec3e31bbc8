"""Cluster mode: one device's broker account changed by one instance at a time.

A change that the broker cannot be told twice safely (a new password: the plugin takes passwords,
not hashes) is read from the registry and sent to the broker while this instance holds a
PostgreSQL advisory lock on the device, on a connection of its own (the store's thread is not held
while the broker answers). PostgreSQL only: cluster mode refuses SQLite at start-up. The lock goes
with its connection, so an instance killed while holding one holds it no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from ..errors import StoreUnavailable
from ..models import describe

log = logging.getLogger(__name__)

ACCOUNT_LOCK_CLASS = 0x07A_B41E  # the first key of pg_advisory_lock(int, int); the second: the device id's hash


class AccountLocks:
    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Any = None
        self._one_at_a_time = asyncio.Lock()  # the connection's session holds one device's lock at a time
        # One thread, in order: an unlock sent after a lock runs after it, even if its caller stopped waiting.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ota-account-locks")

    @contextlib.asynccontextmanager
    async def holding(self, device_id: str) -> AsyncIterator[None]:
        """Hold the device's lock, cluster-wide; raises StoreUnavailable if the database cannot be asked."""
        async with self._one_at_a_time:
            try:
                await self._run("SELECT pg_advisory_lock(%s, hashtext(%s))", device_id)
                yield
            finally:  # also when cancelled while the lock is still awaited
                with contextlib.suppress(StoreUnavailable):  # a lost connection released it anyway
                    await asyncio.shield(self._run("SELECT pg_advisory_unlock(%s, hashtext(%s))", device_id))

    def close(self) -> None:
        self._thread.submit(self._drop).result()
        self._thread.shutdown()

    def _run(self, sql: str, device_id: str) -> asyncio.Future[None]:
        return asyncio.get_running_loop().run_in_executor(self._thread, self._sql, sql, device_id)

    def _sql(self, sql: str, device_id: str) -> None:
        import psycopg2  # the PostgreSQL driver is there: cluster mode runs on PostgreSQL only

        try:
            if self._connection is None or self._connection.closed:
                self._connection = psycopg2.connect(self.url, connect_timeout=5)
                self._connection.autocommit = True
            with self._connection.cursor() as cursor:
                cursor.execute(sql, (ACCOUNT_LOCK_CLASS, device_id))
        except psycopg2.Error as e:
            self._drop()
            raise StoreUnavailable(f"could not lock device {device_id!r}'s broker account on the "
                                   f"{describe(self.url)}: {str(e).strip()}") from e

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None
