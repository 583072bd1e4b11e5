"""Replica choice for a model served at several OpenAI-compatible URLs (models.yaml `replicas:`).

Each call goes to the healthy replica with the fewest outstanding requests (ties: the order in models.yaml).
A replica that fails at the connection level is marked down; it is left alone for a backoff that grows with
each failure in a row (1 s, doubling, capped at 60 s), then probed again: the next choice may pick it
once its backoff has passed, and a caller with a probe (LocalBackend: GET <url>/models) checks it first.
When every replica is down, the one whose backoff ends first is tried rather than failing outright.
Only one caller at a time checks a replica back from its backoff: the others keep away until it answers
or fails, so a dead replica costs one probe per backoff, not one per waiting caller (each failure would
double its backoff), and calls that were already under way when it was marked down fail of the same
outage: they do not count again (eight calls cut at once would take the backoff to its cap). `shared`
keeps one set per URL list for the whole process, so what one run learns (a replica down, the requests in
flight on each) the next run knows: the API runs each request apart.

Pure bookkeeping (no I/O, injectable clock): the engine's retry-once lives in engine/run.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_BACKOFF_S = 60.0


def backoff_s(failures: int) -> float:
    """Seconds a replica stays down after `failures` failures in a row: 1, 2, 4 ... capped at 60 s."""
    return min(MAX_BACKOFF_S, 2.0 ** (max(1, failures) - 1))


@dataclass
class ReplicaState:
    url: str
    outstanding: int = 0
    failures: int = 0        # in a row; 0 = healthy
    down_until: float = 0.0  # monotonic time before which it is not chosen (while others are up)
    served: int = 0
    probing: bool = False    # back from its backoff and handed to one caller to check: the others keep away
    marked_at: float = 0.0   # when it was last marked down

    def up(self, now: float) -> bool:
        return self.failures == 0 or (now >= self.down_until and not self.probing)


class ReplicaSet:
    """The replicas of one model: least-outstanding choice, mark-down with backoff, probe again later."""

    def __init__(self, urls: Iterable[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = [ReplicaState(u) for u in dict.fromkeys(urls)]
        if not self.replicas:
            raise ValueError("a replica set needs at least one URL")
        self.clock = clock
        self._lock = threading.Lock()

    def _get(self, url: str) -> ReplicaState | None:
        return next((r for r in self.replicas if r.url == url), None)

    def choose(self, exclude: Iterable[str] = ()) -> str:
        """The URL for the next call (counted as outstanding until `release`)."""
        skip = set(exclude)
        with self._lock:
            now = self.clock()
            pool = [r for r in self.replicas if r.url not in skip] or list(self.replicas)
            healthy = [r for r in pool if r.up(now)]
            if healthy:
                best = min(healthy, key=lambda r: (r.outstanding, r.failures))
            else:
                best = min(pool, key=lambda r: r.down_until)  # all down: try the one due back first
            if best.failures:
                best.probing = True  # this caller checks it; released, marked up or down, it is free again
            best.outstanding += 1
            return best.url

    def release(self, url: str, *, ok: bool | None = None) -> None:
        """The call on `url` is over; ok=True clears its failures (a probe by real traffic succeeded)."""
        with self._lock:
            r = self._get(url)
            if r is None:
                return
            r.outstanding = max(0, r.outstanding - 1)
            r.probing = False
            if ok:
                r.failures, r.down_until = 0, 0.0
                r.served += 1

    def mark_down(self, url: str, since: float | None = None) -> float:
        """`url` failed: down for the backoff of its failures in a row; returns the seconds it stays down.

        `since`: when the failed call began (this set's clock). A call begun before the replica was last
        marked down failed of that same outage: it does not count again.
        """
        with self._lock:
            r = self._get(url)
            if r is None:
                return 0.0
            now = self.clock()
            r.probing = False
            if since is not None and r.failures and since < r.marked_at:
                return max(0.0, r.down_until - now)
            r.failures += 1
            wait = backoff_s(r.failures)
            r.down_until, r.marked_at = now + wait, now
            return wait

    def mark_up(self, url: str) -> None:
        with self._lock:
            r = self._get(url)
            if r is not None:
                r.failures, r.down_until, r.probing = 0, 0.0, False

    def due_for_probe(self, url: str) -> bool:
        """Down before, backoff over: check it before sending a real call."""
        with self._lock:
            r = self._get(url)
            return r is not None and r.failures > 0 and self.clock() >= r.down_until

    def healthy(self) -> list[str]:
        now = self.clock()
        return [r.url for r in self.replicas if r.up(now)]

    def down(self) -> list[str]:
        now = self.clock()
        return [r.url for r in self.replicas if not r.up(now)]


_shared: dict[tuple[str, ...], ReplicaSet] = {}
_shared_lock = threading.Lock()


def shared(urls: Iterable[str]) -> ReplicaSet:
    """This process's replica set for `urls`: one per URL list, kept across runs."""
    key = tuple(dict.fromkeys(urls))
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = ReplicaSet(key)
        return found
