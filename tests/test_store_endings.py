"""A held GET is woken only by a store call that may have made its job final (store/endings.py)."""

from __future__ import annotations

import asyncio

from agent.protocol import JobStatus
from ota_bridge.store import Store, jobs, updates
from ota_bridge.store.endings import ANY, Endings
from ota_bridge.store.jobs import derive_status
from ota_bridge.store.updates import Update
from tests.test_store import group_job


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_wait_is_woken_by_a_call_that_names_its_job_or_says_nothing_and_not_by_others() -> None:
    async def scenario() -> None:
        endings = Endings()
        seen = endings.generation
        waits = {job: asyncio.ensure_future(endings.wait(job, seen, 60)) for job in ("a", "b", "c")}
        await _turns()
        endings.tell(frozenset())  # a batch of progress reports
        endings.tell(frozenset({"a"}))
        endings.hear()
        await _turns()
        assert waits["a"].done() and not waits["b"].done() and not waits["c"].done()
        endings.tell(ANY)  # a call that said nothing (a cancel, say): it may have ended any job
        endings.hear()
        await _turns()
        assert waits["b"].done() and waits["c"].done()
    asyncio.run(scenario())


def test_a_call_heard_between_the_read_and_the_wait_answers_at_once() -> None:
    async def scenario() -> None:
        endings = Endings()
        seen = endings.generation  # noted before the GET reads its job
        endings.tell(frozenset({"b"}))
        endings.tell(frozenset({"a"}))  # came while the job was read
        await asyncio.wait_for(endings.wait("a", seen, 60), 10)  # not held
        assert not endings.may_have_ended("b", endings.generation)
        assert endings.may_have_ended("b", seen) and not endings.may_have_ended("c", seen)
    asyncio.run(scenario())


def test_a_wait_that_missed_forgotten_calls_reads_its_job_again() -> None:
    endings = Endings()
    seen = endings.generation
    for _ in range(300):  # more than the history keeps
        endings.tell(frozenset({"other"}))
    assert endings.may_have_ended("a", seen)
    assert not endings.may_have_ended("a", endings.generation - 10)


def test_report_batches_tell_only_the_jobs_they_may_have_made_final(db: Store) -> None:
    job_id, device_ids = group_job(db, 2)
    children = {c.device_id: c.job_id for c in db.call_sync(jobs.child_jobs, job_id)}
    record = updates.record_device_messages

    seen = db.endings
    db.call_sync(record, [Update(d, children[d], JobStatus.IN_PROGRESS) for d in device_ids], [])
    assert db.endings == seen  # progress alone: nobody is woken
    db.call_sync(record, [Update("d0", children["d0"], JobStatus.SUCCEEDED, exit_code=0)], [])
    assert db.may_have_ended(children["d0"], seen)
    assert not db.may_have_ended(job_id, seen)  # its other child is still running
    assert not db.may_have_ended(children["d1"], seen)

    seen = db.endings
    db.call_sync(record, [Update("d1", children["d1"], JobStatus.FAILED, exit_code=1)], [])
    assert db.may_have_ended(job_id, seen) and db.may_have_ended(children["d1"], seen)
    assert derive_status(db.call_sync(jobs.get_job, job_id).counts) is JobStatus.FAILED


def test_a_call_that_says_nothing_may_have_ended_any_job(db: Store) -> None:
    job_id, _ = group_job(db, 2)
    seen = db.endings
    db.call_sync(jobs.cancel_job, job_id)
    assert db.may_have_ended(job_id, seen) and db.may_have_ended("any-other-job", seen)
