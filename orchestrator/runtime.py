"""The long-lived objects of one chorus process: config, registry, and a pool of warm servers.

The CLI makes one per command; the UI keeps one in st.cache_resource so a page rerun reloads nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from launcher.admission import MemoryGuard
from launcher.binary import find_llama_server
from launcher.calibration import CalibrationCache
from launcher.client import Endpoint
from launcher.memory import MemoryProbe, SystemProbe
from launcher.pool import ServerPool
from launcher.server import ModelServer, ServerOptions, ServerSpec
from orchestrator.config.registry import ModelRecord, Registry
from orchestrator.config.schema import ChorusConfig, MiB, load_config

log = logging.getLogger("chorus.runtime")



T = TypeVar("T")


def _once(method: Callable[[Any], T]) -> property:
    """A cached property that is built once even when threads ask at the same time.

    functools.cached_property has no lock since Python 3.12; two UI runs starting together must not
    make two pools. The value lives in the instance __dict__ under the method's name.
    """
    name = method.__name__

    @functools.wraps(method)
    def getter(self: Any) -> T:
        try:
            return self.__dict__[name]
        except KeyError:
            pass
        with self._init_lock:
            if name not in self.__dict__:
                self.__dict__[name] = method(self)
            return self.__dict__[name]

    return property(getter)

class CalibratingPool(ServerPool):
    """The server pool, measuring each new server once (calibration) the first time it is handed out."""

    def __init__(self, *args: object, guard: MemoryGuard, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.guard = guard

    def acquire(self, spec: ServerSpec) -> ModelServer:
        try:
            server = super().acquire(spec)
        finally:
            self.guard.forget(spec)  # started or failed: no longer a pending start
        self.guard.observe([server])  # once per process: /proc, NVML and the log head
        return server


class Runtime:
    def __init__(self, config: ChorusConfig, registry: Registry | None = None, *,
                 probe: MemoryProbe | None = None, calibration: CalibrationCache | None = None) -> None:
        self.config = config
        self.registry = registry or Registry(config)
        self._init_lock = threading.RLock()
        self._probe = probe
        self._calibration = calibration
        self._warned_no_gpu = False

    @classmethod
    def from_config_dir(cls, config_dir: Path | str | None = None) -> Runtime:
        return cls(load_config(config_dir))

    @property
    def state_dir(self) -> Path:
        return self.config.app.logs_dir / "running"

    @_once
    def binary(self) -> Path:
        return find_llama_server(self.config.app.llama_server)

    def server_options(self) -> ServerOptions:
        s = self.config.app.server
        return ServerOptions(startup_timeout_s=s.startup_timeout_s, stop_grace_s=s.stop_grace_s,
                             state_dir=self.state_dir)

    @_once
    def memory_guard(self) -> MemoryGuard:
        """The memory fit check: app.yaml's resources margin, calibration, memory_budget_mib as a cap."""
        r, s = self.config.app.resources, self.config.app.server
        probe = self._probe if self._probe is not None else SystemProbe()
        return MemoryGuard(probe, r.fraction, r.fixed_mib * MiB,
                           self._calibration if self._calibration is not None else CalibrationCache(),
                           budget_bytes=s.memory_budget_mib * MiB if s.memory_budget_mib else None)

    @_once
    def pool(self) -> ServerPool:
        s = self.config.app.server
        return CalibratingPool(self.binary, self.config.app.logs_dir, options=self.server_options(),
                               idle_timeout_s=s.idle_timeout_s, fit_check=self.memory_guard.check_fit,
                               guard=self.memory_guard)

    def server_spec(self, model: str | ModelRecord, *, n_ctx: int | None = None,
                    n_gpu_layers: int | None = None, slots: int = 1) -> ServerSpec:
        rec = model if isinstance(model, ModelRecord) else self.registry.get(model)
        assert rec.path is not None, "remote models have no server"
        entry = rec.entry
        ngl = entry.default_gpu_layers if n_gpu_layers is None else n_gpu_layers
        if ngl != 0 and not self.memory_guard.has_gpu():
            if not self._warned_no_gpu:
                self._warned_no_gpu = True
                log.warning("%s: running on the CPU, n_gpu_layers forced to 0",
                            self.memory_guard.gpu_note or "no GPU")
            ngl = 0
        return ServerSpec(
            model=rec.name, model_path=rec.path,
            n_ctx=n_ctx or entry.default_n_ctx,
            n_gpu_layers=ngl,
            slots=max(slots, entry.parallel), threads=entry.threads, chat_template=entry.chat_template)

    def start_server(self, spec: ServerSpec) -> ModelServer:
        """A standalone server outside the pool (for `chorus serve`), after the memory fit check."""
        running = self.pool.servers() if "pool" in self.__dict__ else []
        self.memory_guard.check_fit(spec, running)
        try:
            server = ModelServer(spec, self.binary, self.config.app.logs_dir, self.server_options()).start()
        finally:
            self.memory_guard.forget(spec)
        self.memory_guard.observe([server])
        return server

    @contextlib.contextmanager
    def endpoint(self, model: str, *, n_ctx: int | None = None, n_gpu_layers: int | None = None,
                 slots: int = 1) -> Iterator[Endpoint]:
        """Where to send requests for `model`: a warm local server (leased from the pool) or its URL."""
        rec = self.registry.get(model)
        if rec.is_remote:
            key = os.environ.get(rec.entry.api_key_env) if rec.entry.api_key_env else None
            yield Endpoint(rec.name, rec.entry.url or "", rec.mode, key, remote=True)  # type: ignore[arg-type]
            return
        spec = self.server_spec(rec, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, slots=slots)
        with self.pool.lease(spec) as server:
            yield Endpoint(rec.name, server.base_url, rec.mode, server.api_key)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def aendpoint(self, model: str, *, n_ctx: int | None = None, n_gpu_layers: int | None = None,
                        slots: int = 1) -> AsyncIterator[Endpoint]:
        """`endpoint` for asyncio: starting a server runs in a worker thread, not on the event loop."""
        rec = self.registry.get(model)
        if rec.is_remote:
            with self.endpoint(model) as ep:
                yield ep
            return
        spec = self.server_spec(rec, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, slots=slots)
        server = await self.pool.aacquire(spec)
        try:
            yield Endpoint(rec.name, server.base_url, rec.mode, server.api_key)  # type: ignore[arg-type]
        finally:
            self.pool.release(server)

    def discard_server(self, endpoint: Endpoint) -> None:
        """Stop the pool's server behind `endpoint` (a hung one); the next request starts a fresh one."""
        if endpoint.remote or "pool" not in self.__dict__:
            return
        for server in self.pool.servers():
            if server.base_url == endpoint.base_url:
                self.pool.stop(server)

    def close(self) -> None:
        if "pool" in self.__dict__:
            self.pool.shutdown()
