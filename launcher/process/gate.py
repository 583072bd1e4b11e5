"""Turns at the CPU: servers that compute on the same cores take turns instead of slicing them.

Every llama-server computing on the CPU takes as many threads as it was given (a server that runs alone
gets every core), and its threads meet at a barrier after every op. Two such servers busy at once (two
models of concurrent runs: eval items, API requests) take more threads than cores and wait for each other's
time slices: on 2 cores a gemma and a smollm2 server generating together made 60-70 tok/s in all (with
short OpenMP spinning, 8-33 without), against 75 and 120 each alone. One server with several streams
batches them (on those 2 cores 1.14-1.65x the tokens/s of one stream with 4, about 1.1x with 3).

So a call takes a turn before it computes: it goes at once when its server is computing already (its
stream joins the batch), when its own run is (a parallel stage's servers were given their share of the
cores by the plan), or when the threads of the servers computing and its own fit in the cores. Otherwise it
waits, first come first served; when the cores are free, the first waiter goes, with every waiter that may
go beside it (the calls of the same server batch). A call that is waiting does not let later calls jump
ahead of it, so a busy server cannot starve another. A turn holder only waits on its server's answer,
never on a waiter, so turns cannot deadlock.

Thread-safe: runs on several event loops (UI runs in threads) share one gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    owner: Hashable
    server: Hashable
    threads: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = False


@dataclass
class CpuGate:
    """`async with gate.turn(owner, server, threads):` around a call that computes on the CPU."""

    cores: int
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _servers: Counter[Hashable] = field(default_factory=Counter, repr=False)  # server -> calls computing
    _threads: dict[Hashable, int] = field(default_factory=dict, repr=False)   # server -> its threads
    _owners: Counter[Hashable] = field(default_factory=Counter, repr=False)   # run -> its calls computing
    _waiting: list[_Waiter] = field(default_factory=list, repr=False)

    @contextlib.asynccontextmanager
    async def turn(self, owner: Hashable, server: Hashable, threads: int) -> AsyncIterator[None]:
        threads = max(1, min(threads, self.cores))
        waiter: _Waiter | None = None
        with self._lock:
            if not self._waiting and self._may_go(owner, server, threads):
                self._enter(owner, server, threads)
            else:
                loop = asyncio.get_running_loop()
                waiter = _Waiter(owner, server, threads, loop, loop.create_future())
                self._waiting.append(waiter)
        if waiter is not None:
            try:
                await waiter.future
            except BaseException:
                with self._lock:
                    if waiter.granted:
                        self._leave(owner, server)
                    elif waiter in self._waiting:
                        self._waiting.remove(waiter)
                    self._grant()
                raise
        try:
            yield
        finally:
            with self._lock:
                self._leave(owner, server)
                self._grant()

    def busy(self) -> dict[Hashable, int]:
        """Calls computing now, per server."""
        with self._lock:
            return dict(self._servers)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # ---------------------------------------------------------------- under the lock

    def _may_go(self, owner: Hashable, server: Hashable, threads: int) -> bool:
        if not self._servers or server in self._servers or owner in self._owners:
            return True
        return sum(self._threads[s] for s in self._servers) + threads <= self.cores

    def _enter(self, owner: Hashable, server: Hashable, threads: int) -> None:
        self._servers[server] += 1
        self._threads[server] = max(threads, self._threads.get(server, 0))
        self._owners[owner] += 1

    def _leave(self, owner: Hashable, server: Hashable) -> None:
        self._servers[server] -= 1
        if self._servers[server] <= 0:
            del self._servers[server]
            self._threads.pop(server, None)
        self._owners[owner] -= 1
        if self._owners[owner] <= 0:
            del self._owners[owner]

    def _grant(self) -> None:
        """The first waiter when it may go, then every later one that may go beside those let through."""
        if not self._waiting or not self._may_go(self._waiting[0].owner, self._waiting[0].server,
                                                 self._waiting[0].threads):
            return
        still: list[_Waiter] = []
        for w in self._waiting:
            if w.future.cancelled() or not self._may_go(w.owner, w.server, w.threads):
                if not w.future.cancelled():
                    still.append(w)
                continue
            self._enter(w.owner, w.server, w.threads)
            w.granted = True
            w.loop.call_soon_threadsafe(_wake, w.future)
        self._waiting = still


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
