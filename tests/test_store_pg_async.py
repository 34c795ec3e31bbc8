"""PostgreSQL reads on the event loop (store/pg_async.py): the same answers as the store's thread,
read-only connections, prepared statements, and recovery from lost connections and cancelled reads.

Each test gets a PostgreSQL database of its own and ends only its own connections.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Iterator

import peewee as pw
import pytest

from ota_bridge.errors import JobNotFound
from ota_bridge.models import ChildJob, db
from ota_bridge.store import Store, devices, jobs, pg_async, workflows
from ota_bridge.store.pg_async import AsyncReads
from tests.support.databases import fresh_postgres
from tests.test_db_recovery import terminate_service_connections

pytestmark = pytest.mark.postgres
MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def store() -> Iterator[Store]:
    with fresh_postgres() as url:
        opened = Store(url)
        try:
            yield opened
        finally:
            opened.close()


async def _jobs(store: Store) -> tuple[str, str]:
    """A single-device job and a group job (its summary needs more than one statement)."""
    workflow = await store.call(workflows.create_workflow, "w", "true", None, False)
    for name in ("d1", "d2"):
        await store.call(devices.register_device, name, "fleet", [])
    single, _ = await store.call(jobs.submit_job, "one", workflow.workflow_id, "DeviceId", "d1", None)
    group, _ = await store.call(jobs.submit_job, "all", workflow.workflow_id, "DeviceGroup", "fleet", None)
    return single.job_id, group.job_id


def _reads_on_loop(store: Store) -> list[Any]:
    """Count the statements the event loop's own connections run."""
    sent: list[Any] = []
    reads = store._on_loop
    assert isinstance(reads, AsyncReads), "PostgreSQL reads of one statement must not need a reader thread"
    rows = reads.rows

    async def counted(name: str, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        sent.append(name)
        return await rows(name, sql, params)
    reads.rows = counted  # type: ignore[method-assign]
    return sent


def test_a_job_read_on_the_loop_is_the_one_the_store_thread_reads(store: Store) -> None:
    async def main() -> None:
        single, group = await _jobs(store)
        sent = _reads_on_loop(store)
        for job_id in (single, group):
            assert await store.read(jobs.get_job, job_id) == await store.call(jobs.get_job, job_id)
        assert sent == ["job_row_1", "job_row_1"]  # the group job's summary then went to a reader thread
        with pytest.raises(JobNotFound):
            await store.read(jobs.get_job, MISSING)

    asyncio.run(main())


def test_a_read_sees_every_write_committed_before_it(store: Store) -> None:
    async def main() -> None:
        single, _ = await _jobs(store)
        assert (await store.read(jobs.get_job, single)).status.value == "QUEUED"
        await store.call(lambda: ChildJob.update(status="IN_PROGRESS").where(ChildJob.parent == single).execute())
        assert (await store.read(jobs.get_job, single)).status.value == "IN_PROGRESS"

    asyncio.run(main())


def test_the_loop_connections_are_read_only_and_prepare_their_statements(store: Store) -> None:
    async def main() -> None:
        single, _ = await _jobs(store)
        await store.read(jobs.get_job, single)
        reads = store._on_loop
        assert reads is not None
        prepared = await reads.rows("probe", "SELECT name FROM pg_prepared_statements ORDER BY name", [])
        assert ("ota_job_row_1",) in prepared
        with pytest.raises(pw.InternalError, match="read-only transaction"):
            await reads.rows("write", 'DELETE FROM "job"', [])
        assert await store.call(jobs.get_job, single)  # still there

    asyncio.run(main())


def test_loop_connections_reconnect_by_themselves(store: Store) -> None:
    async def main() -> None:
        single, _ = await _jobs(store)
        await asyncio.gather(*(store.read(jobs.get_job, single) for _ in range(16)))  # several connect
        assert terminate_service_connections(store.url) >= 2
        for _ in range(16):  # each stale connection is replaced, or the read runs again on a new one
            assert (await store.read(jobs.get_job, single)).job.job_id == single
        await asyncio.gather(*(store.read(jobs.get_job, single) for _ in range(16)))

    asyncio.run(main())


def test_a_cancelled_read_closes_its_connection(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []
    open_connection = pg_async._Connection.open

    async def recorded(*args: Any) -> Any:
        opened.append(await open_connection(*args))
        return opened[-1]
    monkeypatch.setattr(pg_async._Connection, "open", recorded)

    async def main() -> None:
        single, _ = await _jobs(store)
        reads = store._on_loop
        assert reads is not None
        slow = asyncio.ensure_future(reads.rows("slow", "SELECT pg_sleep(30)", []))
        await asyncio.sleep(0.5)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert [c.raw.is_closed() for c in opened] == [True], "the connection that ran it must be closed, not handed on"
        for _ in range(4):
            assert (await store.read(jobs.get_job, single)).job.job_id == single
        assert len(opened) == 2

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_store_serves_reads_from_one_loop_after_another(store: Store) -> None:
    single, _ = asyncio.run(_jobs(store))
    for _ in range(2):  # a connection is registered with one loop: the next loop gets its own
        assert asyncio.run(store.read(jobs.get_job, single)).job.job_id == single
    assert db.obj is store.database


def test_the_loop_connections_are_named_and_kept_alive_as_the_stores(store: Store) -> None:
    """asyncpg's connections take psycopg2's parameters: the application name, TCP keepalives, user timeout."""
    async def main() -> None:
        single, _ = await _jobs(store)
        await asyncio.gather(*(store.read(jobs.get_job, single) for _ in range(4)))
        reads = store._on_loop
        assert reads is not None and reads._idle
        for conn in reads._idle:
            sock = conn.raw._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30000
        names = await reads.rows("names", "SELECT DISTINCT application_name FROM pg_stat_activity "
                                          "WHERE datname = current_database() AND pid <> pg_backend_pid()", [])
        assert names == [("ota-bridge",)]

    asyncio.run(main())


def test_without_asyncpg_the_reads_go_to_reader_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_async, "AVAILABLE", False)
    with fresh_postgres() as url:
        store = Store(url)
        try:
            assert store._on_loop is None
            single, group = asyncio.run(_jobs(store))
            for job_id in (single, group):
                assert asyncio.run(store.read(jobs.get_job, job_id)) == store.call_sync(jobs.get_job, job_id)
        finally:
            store.close()


KEYED = "SELECT k, pg_sleep(%s) FROM unnest(%s::text[]) AS k"  # one row per key, after a while


def _keyed(reads: AsyncReads, seconds: float, sent: list[list[str]]) -> Any:
    """rows_of's arguments for KEYED, recording the keys of each statement sent."""
    def params_of(keys: list[str]) -> list[Any]:
        sent.append(keys)
        return [seconds, keys]
    return lambda key: reads.rows_of("keyed", KEYED, params_of, key)


def test_reads_waiting_for_a_connection_go_in_one_statement(store: Store) -> None:
    async def main() -> None:
        reads = store._on_loop
        assert reads is not None
        sent: list[list[str]] = []
        keyed = _keyed(reads, 0, sent)
        busy = [asyncio.ensure_future(reads.rows("sleep", "SELECT pg_sleep(0.5)", [])) for _ in range(reads._size)]
        await asyncio.sleep(0.2)  # every connection busy: the reads wait together
        waiting = [asyncio.ensure_future(keyed(k)) for k in ("a", "b", "a", "c", "d")]
        await asyncio.sleep(0)
        waiting[3].cancel()  # a read whose request went away: the others are answered all the same
        await asyncio.gather(*busy)
        answers = await asyncio.gather(*waiting[:3], waiting[4])
        assert answers == [[("a", None)], [("b", None)], [("a", None)], [("d", None)]]
        assert sent == [["a", "b", "c", "d"]]  # each key once
        assert await keyed("e") == [("e", None)] and sent[1:] == [["e"]]  # a free connection: at once, alone

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_read_never_joins_a_statement_sent_before_it_was_asked_for(store: Store) -> None:
    """Each statement starts after every read it answers was asked for: it sees every write committed
    before any of them (reads of other instances' writes included); nothing is kept for later reads."""
    async def main() -> None:
        reads = store._on_loop
        assert reads is not None
        sent: list[list[str]] = []
        keyed = _keyed(reads, 0.3, sent)
        first = asyncio.ensure_future(keyed("a"))
        await asyncio.sleep(0.1)  # its statement is running
        assert await asyncio.gather(first, keyed("a")) == [[("a", None)], [("a", None)]]
        assert sent == [["a"], ["a"]]

    asyncio.run(asyncio.wait_for(main(), 20))


def test_concurrent_job_reads_answer_each_as_alone(store: Store) -> None:
    """GET /v1/job/{id}'s read (shown_job) batched: each read gets its own job's answer, a missing
    job JobNotFound, a group job its summary (read in a snapshot), as reads one at a time do."""
    async def main() -> None:
        single, group = await _jobs(store)
        other, _ = await store.call(jobs.submit_job, "two", (await store.call(workflows.list_workflows))[0].workflow_id,
                                    "DeviceId", "d2", None)
        ids = [single, group, other.job_id, MISSING] * 12
        alone = [await store.call(jobs.shown_job, j) if j != MISSING else None for j in ids]
        together = await asyncio.gather(*(store.read(jobs.shown_job, j) for j in ids), return_exceptions=True)
        assert [None if isinstance(t, JobNotFound) else t for t in together] == alone
        assert isinstance(together[1], jobs.JobSummary) and isinstance(together[0], jobs.JobRow)

    asyncio.run(asyncio.wait_for(main(), 20))
