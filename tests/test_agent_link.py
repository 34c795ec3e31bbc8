"""agent/link.py's EventQueue: the bounded queue between paho's thread, the worker and the main loop.

No broker; threads only where a call must wait, and no timing asserted (every wait has a bound).
"""

from __future__ import annotations

import threading

import pytest

from agent.link import EventQueue, QueueEmpty, QueueFull

WAIT = 20.0  # seconds a thread may take to get where the test needs it


def test_events_come_out_in_the_order_they_went_in():
    events = EventQueue(3)
    for event in ("a", "b"):
        events.put(event)
    events.put_nowait("c")
    assert [events.get(timeout=WAIT), events.get_nowait(), events.get(timeout=0)] == ["a", "b", "c"]


def test_an_empty_queue_says_so():
    events = EventQueue(1)
    with pytest.raises(QueueEmpty):
        events.get_nowait()
    with pytest.raises(QueueEmpty):
        events.get(timeout=0.01)


def test_a_full_queue_refuses_put_nowait_and_keeps_what_it_holds():
    events = EventQueue(2)
    events.put_nowait(1)
    events.put(2)
    with pytest.raises(QueueFull):
        events.put_nowait(3)
    assert [events.get_nowait(), events.get_nowait()] == [1, 2]


def test_get_waits_for_an_event_from_another_thread():
    events = EventQueue(1)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(events.get(timeout=WAIT)))
    reader.start()
    events.put("late")
    reader.join(WAIT)
    assert got == ["late"]


def test_put_on_a_full_queue_waits_until_an_event_is_taken():
    events = EventQueue(1)
    events.put("first")
    second_in = threading.Event()

    def put_second() -> None:
        events.put("second")
        second_in.set()

    writer = threading.Thread(target=put_second)
    writer.start()
    with pytest.raises(QueueFull):  # "first" is still there: the writer cannot have added "second"
        events.put_nowait("third")
    assert not second_in.is_set()
    assert events.get(timeout=WAIT) == "first"
    assert second_in.wait(WAIT)
    writer.join(WAIT)
    assert events.get_nowait() == "second"
