"""The one thread that runs the agent's commands, one after another, for the agent's whole life.

A job hands its runner to this thread instead of starting a thread of its own: a thread start
costs a clone, a new thread state and a hand-shake (Thread.start waits until the new thread
runs), on every job, on cores a fleet's other agents need (bench/profile_notes.md,
group-latency-embedded). Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import threading
from _queue import SimpleQueue  # the C queue alone: the queue module would load queue.py and heapq
from typing import Any, Callable


class Worker:
    """Runs `work(task)` for each task given, in order, on one thread that the first task starts,
    then `done(result)` once the task counts as finished (`wait_idle` returns)."""

    def __init__(self, work: Callable[[Any], Any], done: Callable[[Any], None], name: str) -> None:
        self._work = work
        self._done = done
        self._name = name
        self._tasks: SimpleQueue[Any] = SimpleQueue()
        self._idle = threading.Lock()  # held from a task's hand-over until its work has returned
        self._thread: threading.Thread | None = None

    def submit(self, task: Any) -> None:
        """Run `task` on the worker thread, after the task before it (the agent gives one at a time)."""
        self._idle.acquire()
        self._tasks.put(task)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no task is in hand; whether none is."""
        if not self._idle.acquire(timeout=timeout):
            return False
        self._idle.release()
        return True

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                result = self._work(task)
            finally:
                self._idle.release()  # before `done`: the next task's submit never waits for this one
            self._done(result)
