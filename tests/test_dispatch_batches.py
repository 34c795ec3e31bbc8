"""How the dispatcher takes device messages from its inbox into one stored batch."""

from __future__ import annotations

import asyncio

import pytest

from agent.protocol import JobStatus, Key, Topics, encode
from ota_bridge import dispatch
from ota_bridge.device_messages import is_progress_report
from ota_bridge.dispatch import Dispatcher
from ota_bridge.mqtt_link import Incoming

TOPICS = Topics()
JOB = "0b7d3c6e-8f0a-4d5b-9c1e-2a3b4c5d6e7f"


def _status(device_id: str, status: JobStatus) -> Incoming:
    payload = encode({Key.JOB_ID: JOB, Key.STATUS: status.value, Key.EXIT_CODE: 0 if status.is_final else None})
    return Incoming(TOPICS.status(device_id), payload, False, 0, 0)


def _taken(first: Incoming, later: Incoming) -> list[Incoming]:
    """The batch taken when `first` waits in the inbox and `later` arrives at the loop's next turn."""
    async def scenario() -> list[Incoming]:
        dispatcher = Dispatcher(None, TOPICS)  # type: ignore[arg-type]  # taking a batch uses no store
        dispatcher.deliver(first)
        asyncio.get_running_loop().call_soon(dispatcher.deliver, later)
        return await dispatcher._take_batch()
    return asyncio.run(scenario())


def test_a_batch_of_progress_reports_waits_for_the_reports_that_follow() -> None:
    first, later = _status("d0", JobStatus.IN_PROGRESS), _status("d1", JobStatus.SUCCEEDED)
    assert _taken(first, later) == [first, later]  # one transaction for both; the final is taken along


def test_a_final_ends_the_wait_of_the_progress_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device's final is never held behind the wait: with a wait far longer than the test may
    take, the batch is taken as soon as the final comes, the progress before it along."""
    monkeypatch.setattr(dispatch, "PROGRESS_LINGER_SECONDS", 3600)
    first, later = _status("d0", JobStatus.IN_PROGRESS), _status("d0", JobStatus.SUCCEEDED)

    async def scenario() -> list[Incoming]:
        dispatcher = Dispatcher(None, TOPICS)  # type: ignore[arg-type]
        dispatcher.deliver(first)
        asyncio.get_running_loop().call_soon(dispatcher.deliver, _status("d1", JobStatus.IN_PROGRESS))
        asyncio.get_running_loop().call_soon(dispatcher.deliver, later)
        return await asyncio.wait_for(dispatcher._take_batch(), 30)
    assert asyncio.run(scenario()) == [first, _status("d1", JobStatus.IN_PROGRESS), later]


def test_a_final_or_a_presence_message_is_stored_without_waiting() -> None:
    later = _status("d1", JobStatus.IN_PROGRESS)
    for first in (_status("d0", JobStatus.SUCCEEDED), _status("d0", JobStatus.FAILED),
                  Incoming(TOPICS.presence("d0"), encode({Key.PRESENCE: "online"}), False, 0, 0)):
        assert _taken(first, later) == [first]


def test_only_progress_statuses_count_as_progress() -> None:
    assert is_progress_report(_status("d0", JobStatus.IN_PROGRESS).payload)
    assert is_progress_report(_status("d0", JobStatus.DOWNLOADING).payload)
    assert not any(is_progress_report(_status("d0", s).payload)
                   for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.REJECTED))
    assert not is_progress_report(b"not json") and not is_progress_report(b"[]")
