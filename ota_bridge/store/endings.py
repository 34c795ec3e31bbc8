"""The Store's word to held GETs (`GET /v1/job/{id}?WaitSeconds=`) that a job may have become final.

Each store call that committed a write is heard here, on the event loop, with what it may have
made final: any job (None, what a call says by default), only these job ids (a batch of device
reports whose finals left these children, and these parents, without a job pending), or nothing
(a batch of progress reports). A held GET reads its job again only when a call may have made that
job final, not after every write: a group job's waiting GET read the job once per batch of reports.

A GET notes `generation` before it reads its job, then waits with `wait(job_id, seen, ...)`: a call
heard between the two that may have ended the job answers at once. The store's thread hands what
it heard over a deque (thread-safe appends); the loop drains it after each store call it awaits.
"""

from __future__ import annotations

import asyncio
import collections

ANY = None  # what a call may have made final when it says nothing: any job
HISTORY = 256  # calls heard, kept for a GET that read its job while they came (older: it reads again)


class Endings:
    """What the store's calls may have made final, and the GETs waiting for a job to be."""

    def __init__(self) -> None:
        self._told: collections.deque[frozenset[str] | None] = collections.deque()  # the store's thread appends
        self.generation = 0  # calls heard so far (drained from _told) that may have made some job final
        self._history: collections.deque[tuple[int, frozenset[str] | None]] = collections.deque(maxlen=HISTORY)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def tell(self, ended: frozenset[str] | None) -> None:
        """On the store's thread: a call committed a write that may have made these jobs final (None: any)."""
        self._told.append(ended)

    def hear(self) -> None:
        """On the event loop: wake the GETs waiting for the jobs the calls told of may have ended."""
        while self._told:
            ended = self._told.popleft()
            self.generation += 1
            self._history.append((self.generation, ended))
            for job_id in self._waiters if ended is ANY else ended:
                for waiter in self._waiters.get(job_id, ()):
                    if not waiter.done():
                        waiter.set_result(None)

    async def wait(self, job_id: str, seen: int, timeout: float) -> None:
        """Return once a call heard after `generation` was `seen` may have made job_id final, or after
        timeout seconds."""
        if self.may_have_ended(job_id, seen):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiters[job_id]

    def may_have_ended(self, job_id: str, seen: int) -> bool:
        """Whether a call heard after `generation` was `seen` may have made job_id final."""
        self.hear()
        if seen == self.generation:
            return False
        if not self._history or self._history[0][0] > seen + 1:  # some were forgotten: they may have
            return True
        return any(ended is ANY or job_id in ended for generation, ended in self._history if generation > seen)

    def release(self) -> None:
        """End every wait now (the service is stopping)."""
        waiters, self._waiters = self._waiters, {}
        for waiting in waiters.values():
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)

