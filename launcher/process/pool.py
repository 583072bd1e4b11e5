"""A pool of warm llama-servers, one per (file, n_ctx, n_gpu_layers, slots), shared across runs.

Servers stay up between stages and runs so nothing reloads; any idle past its keep-alive (the model's
own `idle_timeout_s`, else the pool's) is stopped. Which servers stop to make room is the scheduler's
decision (`launcher.memory.schedule`, through the runtime), never the pool's: a start only asks `fit_check`
(the admission), once. Thread-safe; `aacquire` for asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launcher.process.server import ModelServer, ServerOptions, ServerSpec

log = logging.getLogger("chorus.pool")

# Raises InsufficientMemory when `spec` cannot start next to the `running` servers.
FitCheck = Callable[[ServerSpec, list[ModelServer]], None]

# A server's own keep-alive in seconds (a model's `idle_timeout_s`), or None for the pool's.
IdleTimeoutFor = Callable[[ServerSpec], float | None]


@dataclass
class _Entry:
    server: ModelServer
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    idle_timeout_s: float | None = None  # this server's keep-alive; None: never stopped for idleness


def _longer(a: float | None, b: float | None) -> float | None:
    """The longer of two keep-alives (None is forever): a server shared by two models lives by the longer."""
    return None if a is None or b is None else max(a, b)


def _no_check(spec: ServerSpec, running: list[ModelServer]) -> None:
    """No admission: a pool without a memory guard (tests, `chorus serve`-like uses) starts what it is asked."""


class ServerPool:
    def __init__(self, binary: Path, logs_dir: Path, *, options: ServerOptions | None = None,
                 idle_timeout_s: float | None = 900.0, fit_check: FitCheck | None = None,
                 idle_timeout_for: IdleTimeoutFor | None = None) -> None:
        """`idle_timeout_for(spec)` gives a server its own keep-alive (None: `idle_timeout_s`). It is kept
        on the pool entry, not in the spec: the keep-alive does not change what a server can serve."""
        self.binary = Path(binary)
        self.logs_dir = Path(logs_dir)
        self.options = options or ServerOptions()
        self.idle_timeout_s = idle_timeout_s
        self.idle_timeout_for = idle_timeout_for
        self.fit_check: FitCheck = fit_check or _no_check
        self.starts = 0  # servers started over the pool's life (tests and `chorus ps` read it)
        self._starting = 0  # starts under way (their memory is admitted, not yet in an entry)
        self._entries: dict[tuple[object, ...], _Entry] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[tuple[object, ...], threading.Lock] = {}
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    # -- lookup
    def servers(self) -> list[ModelServer]:
        with self._lock:
            return [e.server for e in self._entries.values()]

    def _find(self, spec: ServerSpec) -> tuple[object, ...] | None:
        """The key of a running server that can serve `spec`: same family, the fewest slots that suffice, else
        a busy one of the family with the most slots (its queue takes the extra calls: concurrent runs that
        asked for different slot counts would otherwise hold the same weights twice). An idle smaller one
        is not taken: asking for more slots next to it means a bigger server is wanted."""
        fits = [(e.server.spec.slots, key) for key, e in self._entries.items() if e.server.spec.serves(spec)]
        if fits:
            return min(fits, key=lambda pair: pair[0])[1]
        same = [(e.server.spec.slots, key) for key, e in self._entries.items()
                if e.server.spec.family == spec.family and e.in_use > 0]
        return max(same, key=lambda pair: pair[0])[1] if same else None

    # -- acquire / release
    def acquire(self, spec: ServerSpec, *, on_spawn: Callable[[], None] | None = None) -> ModelServer:
        """A running server for `spec` (started if needed), marked in use until `release`. `on_spawn`: called
        when a start's process runs, before its model has loaded (not called for a warm server)."""
        self._ensure_reaper()
        with self._lock:
            key_lock = self._key_locks.setdefault(spec.family, threading.Lock())
        with key_lock:  # one start per key even when many threads ask at once
            with self._lock:
                key = self._find(spec)
                entry = self._entries.get(key) if key else None
                if key is not None and entry is not None and not entry.server.is_alive():
                    log.warning("server for '%s' died (%s); starting a new one", spec.model,
                                entry.server.failure() if not entry.server.stopped_by_us else "stopped")
                    del self._entries[key]
                    entry.server.stop(grace_s=1.0)  # what is left of it: its group, key file and record
                    entry = None
                if entry is not None:
                    return self._take(entry, spec)
            with self._lock:
                self._starting += 1
            try:
                server = self._start(spec, on_spawn=on_spawn)
            finally:
                with self._lock:
                    self._starting -= 1
            with self._lock:
                self._entries[spec.key] = _Entry(server, in_use=1, idle_timeout_s=self.keep_alive(spec))
            return server

    def keep_alive(self, spec: ServerSpec) -> float | None:
        """How long a server of `spec` may stay idle: its model's own keep-alive, else the pool's."""
        own = self.idle_timeout_for(spec) if self.idle_timeout_for is not None else None
        return own if own is not None else self.idle_timeout_s

    def try_acquire(self, spec: ServerSpec) -> ModelServer | None:
        """A live running server for `spec` (as `acquire` would find it) marked in use, or None at once: no
        start, no wait on a start in progress. The hot path of a proxied request to a warm model."""
        with self._lock:
            key = self._find(spec)
            entry = self._entries.get(key) if key else None
            if entry is None or not entry.server.is_alive():
                return None
            return self._take(entry, spec)

    def _take(self, entry: _Entry, spec: ServerSpec) -> ModelServer:
        """Mark a found server in use for `spec` (under the lock)."""
        entry.in_use += 1
        entry.last_used = time.monotonic()
        entry.idle_timeout_s = _longer(entry.idle_timeout_s, self.keep_alive(spec))
        return entry.server

    async def aacquire(self, spec: ServerSpec) -> ModelServer:
        return await asyncio.to_thread(self.acquire, spec)

    def release(self, server: ModelServer) -> None:
        with self._lock:
            for entry in self._entries.values():
                if entry.server is server:
                    entry.in_use = max(0, entry.in_use - 1)
                    entry.last_used = time.monotonic()

    @contextlib.contextmanager
    def lease(self, spec: ServerSpec) -> Iterator[ModelServer]:
        server = self.acquire(spec)
        try:
            yield server
        finally:
            self.release(server)

    def _start(self, spec: ServerSpec, *, on_spawn: Callable[[], None] | None = None) -> ModelServer:
        """Start `spec` once admitted: the admission (the runtime's scheduler) may stop idle servers first;
        the pool itself never chooses what to stop."""
        with self._lock:
            running = [e.server for e in self._entries.values()]
        self.fit_check(spec, running)
        server = ModelServer(spec, self.binary, self.logs_dir, self.options)
        with self._lock:
            self.starts += 1
        log.info("starting llama-server for '%s' (n_ctx=%d, ngl=%d, slots=%d)", spec.model, spec.n_ctx,
                 spec.n_gpu_layers, spec.slots)
        return server.start(on_spawn=on_spawn)

    def is_idle(self, server: ModelServer) -> bool:
        """Whether `server` is in the pool and nobody is using it (so it may be stopped to make room)."""
        with self._lock:
            return any(e.server is server and e.in_use == 0 for e in self._entries.values())

    def busy(self) -> bool:
        """Whether some server is in use or starting now (its memory comes free when it is given back)."""
        with self._lock:
            return self._starting > 0 or any(e.in_use > 0 for e in self._entries.values())

    def last_used(self, server: ModelServer) -> float:
        """When `server` was last handed out or given back (monotonic): the least recently used stops first."""
        with self._lock:
            return next((e.last_used for e in self._entries.values() if e.server is server), 0.0)

    def pin(self, server: ModelServer) -> bool:
        """Hold `server` as in use (a wave counts on it) so no other admission stops it; False if gone."""
        with self._lock:
            for entry in self._entries.values():
                if entry.server is server:
                    entry.in_use += 1
                    return True
            return False

    # -- stopping
    def stop(self, server: ModelServer) -> None:
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.server is server:
                    del self._entries[key]
        server.stop()

    def evict_idle(self, now: float | None = None) -> list[ModelServer]:
        """Stop the servers idle past their own keep-alive; returns them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [e for e in self._entries.values()
                     if e.in_use == 0 and e.idle_timeout_s is not None and now - e.last_used > e.idle_timeout_s]
        for entry in stale:
            log.info("stopping '%s': idle for more than %.0fs", entry.server.model, entry.idle_timeout_s)
            self.stop(entry.server)
        return [e.server for e in stale]

    def shutdown(self) -> None:
        self._closed.set()
        for server in self.servers():
            self.stop(server)

    def _reap_interval(self) -> float:
        """A quarter of the shortest keep-alive in the pool, between 1 and 30 seconds."""
        with self._lock:
            timeouts = [e.idle_timeout_s for e in self._entries.values() if e.idle_timeout_s is not None]
        if self.idle_timeout_s is not None:
            timeouts.append(self.idle_timeout_s)
        return max(1.0, min(30.0, min(timeouts, default=120.0) / 4))

    def _ensure_reaper(self) -> None:
        if self._reaper is not None or (self.idle_timeout_s is None and self.idle_timeout_for is None):
            return

        def reap() -> None:
            while not self._closed.wait(self._reap_interval()):
                with contextlib.suppress(Exception):
                    self.evict_idle()

        self._reaper = threading.Thread(target=reap, name="chorus-pool-reaper", daemon=True)
        self._reaper.start()
