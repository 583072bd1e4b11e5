"""How many pipeline runs and model requests the API serves at once, and who waits.

At most `limit` go at once (their calls share the servers' slots: `Chorus.expect_runs`); the next ones
wait their turn in a bounded FIFO queue; one more than the queue holds is refused at once with 429 and a
`Retry-After` worked out from how long recent requests took, so a client backs off for about as long as
the queue needs to move, not a constant. A request that leaves while it waits gives up its place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator

from api.errors import TooManyRuns

RECENT = 32  # durations remembered for Retry-After


class Admission:
    def __init__(self, limit: int, queue: int) -> None:
        self.limit = limit
        self.queue = queue
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> int:
        """About when a place frees up for one more: the queue ahead of it, `limit` at a time, at the recent
        median duration (1 s before anything finished)."""
        if not self._recent:
            return 1
        typical = sorted(self._recent)[len(self._recent) // 2]
        rounds = (self.waiting + 1) / self.limit
        return max(1, math.ceil(typical * rounds))

    async def acquire(self) -> None:
        """Go now, or wait in the queue; TooManyRuns (429) when the queue is full."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue:
            self.refused += 1
            raise TooManyRuns(self.limit, queued=self.waiting, retry_after_s=self.retry_after_s())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # `release` hands its place over: `active` is already counted for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the place came just as the request left: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self, took_s: float | None = None) -> None:
        if took_s is not None:
            self._recent.append(took_s)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes to the next in line, `active` unchanged
                return
        self.active = max(0, self.active - 1)

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """A place for the block (a model request: held until its answer has been read)."""
        await self.acquire()
        began = time.monotonic()
        try:
            yield
        finally:
            self.release(time.monotonic() - began)
