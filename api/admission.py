"""How many pipeline runs and model requests the API serves at once, and who waits.

At most `limit` go at once (their calls share the servers' slots: `Chorus.expect_runs`); the next ones
wait their turn in a bounded FIFO queue; one more than the queue holds is refused at once with 429 and a
`Retry-After` worked out from how long recent requests took, so a client backs off for about as long as
the queue needs to move, not a constant. A request that leaves while it waits gives up its place.

A request for a model (the proxy) waits in its server's own queue instead of this one when nobody waits
here (`ahead`): llama-server gives a freed slot to the next request it holds at once, while a hand-over
through this queue waited for chorus's process to be scheduled beside the busy server (16 clients on 4
slots and 2 cores: 13% fewer tokens/s than the same load sent straight to the server). The bound is
the same: `limit` going, `queue` waiting, wherever they wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

from api.errors import TooManyRuns

RECENT = 32  # durations remembered for Retry-After


class Admission:
    def __init__(self, limit: int, queue: int) -> None:
        self.limit = limit
        self.queue = queue
        self.active = 0  # places taken: going, or sent ahead to a model server's queue
        self._waiters: collections.deque[tuple[asyncio.Future[None], bool]] = collections.deque()
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.refused = 0
        self._busy_since: float | None = None  # since when a place has been taken without a break

    @property
    def going(self) -> int:
        return min(self.active, self.limit)

    @property
    def waiting(self) -> int:
        """Waiting here, and sent ahead to wait in a model server's queue."""
        return len(self._waiters) + max(0, self.active - self.limit)

    def retry_after_s(self) -> int:
        """About when a place frees up for one more: the queue ahead of it, `limit` at a time, at the recent
        median duration. Before anything finished (cold servers: a start is in every first run), at least
        as long as the requests going have been going so far: a client asking again is told to wait longer
        each time, instead of 1 s five times over while the first runs take 20."""
        if self._recent:
            typical = sorted(self._recent)[len(self._recent) // 2]
        elif self._busy_since is not None:
            typical = time.monotonic() - self._busy_since
        else:
            typical = 1.0
        rounds = (self.waiting + 1) / self.limit
        return max(1, math.ceil(typical * rounds))

    def _may_go(self, ahead: bool) -> bool:
        return self.active < self.limit + (self.queue if ahead else 0)

    def acquire_now(self, *, ahead: bool = False) -> bool:
        """A place at once if one is free and nobody waits for it: no wait, no task."""
        if not self._waiters and self._may_go(ahead):
            self._take()
            return True
        return False

    def _take(self) -> None:
        if self.active == 0:
            self._busy_since = time.monotonic()
        self.active += 1

    async def acquire(self, *, ahead: bool = False) -> None:
        """Go now, or wait in the queue; TooManyRuns (429) when the queue is full. `ahead`: a model request,
        which may go on to wait in its server's own queue (see the module's docstring)."""
        if self.acquire_now(ahead=ahead):
            return
        if self.waiting >= self.queue:
            self.refused += 1
            raise TooManyRuns(self.limit, queued=self.waiting, retry_after_s=self.retry_after_s())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, ahead)
        self._waiters.append(entry)
        try:
            await waiter  # `release` counts our place in `active` before it wakes us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the place came just as the request left: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def release(self, took_s: float | None = None) -> None:
        if took_s is not None:
            self._recent.append(took_s)
        self.active = max(0, self.active - 1)
        if self.active == 0:
            self._busy_since = None
        while self._waiters:  # in order: the first in line goes when its kind may, no one overtakes it
            waiter, ahead = self._waiters[0]
            if waiter.done():  # left meanwhile
                self._waiters.popleft()
                continue
            if not self._may_go(ahead):
                return
            self._waiters.popleft()
            self._take()
            waiter.set_result(None)
