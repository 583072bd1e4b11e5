"""The long-lived objects of one chorus process: config, registry, and a pool of warm servers.

The CLI makes one per command; the UI keeps one in st.cache_resource so a page rerun reloads nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from launcher.cpus import usable_cores
from launcher.errors import ChorusError
from launcher.memory.admission import Demand, MemoryGuard, MemoryState, Schedule
from launcher.memory.calibration import CalibrationCache
from launcher.memory.probes import MemoryProbe, SystemProbe
from launcher.memory.schedule import Wave, with_slots
from launcher.process.binary import find_llama_server
from launcher.process.client import Endpoint
from launcher.process.gate import CpuGate
from launcher.process.pool import ServerPool
from launcher.process.server import ModelServer, ServerOptions, ServerSpec
from orchestrator.config.registry import ModelRecord, PipelineStatus, Registry
from orchestrator.config.schema import ChorusConfig, PipelineSpec
from orchestrator.plan.resolve import Machine, RunMode, RunPlan, build_plan, resolve_server
from orchestrator.rag.embed import HttpEmbedder, NotAnEmbeddingModel
from orchestrator.units import MiB

log = logging.getLogger("chorus.runtime")



class CalibratingPool(ServerPool):
    """The server pool, measuring each new server once (calibration) the first time it is handed out."""

    def __init__(self, *args: Any, guard: MemoryGuard, **kwargs: Any) -> None:  # ServerPool's, passed on as is
        super().__init__(*args, **kwargs)
        self.guard = guard

    def acquire(self, spec: ServerSpec, *, on_spawn: Callable[[], None] | None = None) -> ModelServer:
        try:
            server = super().acquire(spec, on_spawn=on_spawn)
        finally:
            self.guard.forget(spec)  # started or failed: no longer a pending start
        self.guard.observe([server])  # once per process: /proc, NVML and the log head
        return server


_heap_settled = False


def _settle_startup_heap() -> None:
    """Once per process: move what exists now (modules, pydantic's schemas, jinja2, the config: some 50k
    objects that live as long as the process) out of the garbage collector's sight. Each full collection
    walks every tracked object; one of them cost a cold run 24 ms before its first server started."""
    global _heap_settled
    if not _heap_settled:
        _heap_settled = True
        gc.freeze()


class Runtime:
    """Each long-lived part is built on first use, once, even when two threads (UI runs) ask together."""

    def __init__(self, config: ChorusConfig, registry: Registry | None = None, *,
                 probe: MemoryProbe | None = None, calibration: CalibrationCache | None = None) -> None:
        self.config = config
        self.registry = registry or Registry(config)
        self._lock = threading.RLock()
        self._admit_lock = threading.RLock()  # one wave's stops and admissions at a time
        self._probe = probe
        self._calibration = calibration
        self._binary: Path | None = None
        self._guard: MemoryGuard | None = None
        self._pool: ServerPool | None = None
        self._cpu_gate: CpuGate | None = None
        self._warned_no_gpu = False
        self._expected_runs = 1  # runs a front end expects at once: the API's max_runs, an eval's concurrency
        self._active_runs = 0    # runs going now on this runtime's servers
        self._planned_families: set[tuple[object, ...]] = set()  # the local servers runs were planned on
        _settle_startup_heap()

    @property
    def state_dir(self) -> Path:
        return self.config.app.logs_dir / "running"

    @property
    def binary(self) -> Path:
        with self._lock:
            if self._binary is None:
                self._binary = find_llama_server(self.config.app.llama_server)
            return self._binary

    def server_options(self) -> ServerOptions:
        s = self.config.app.server
        return ServerOptions(startup_timeout_s=s.startup_timeout_s, stop_grace_s=s.stop_grace_s,
                             state_dir=self.state_dir, shares_cores=self._servers_share_cores)

    def _servers_share_cores(self, starting: ServerSpec) -> bool:
        """Whether `starting` may be busy beside another server on the same cores: runs share this runtime's
        servers and more than one server is in play (planned by a run, running, or this one). One model
        serving concurrent requests alone keeps libgomp's spinning (short spinning cost it 4-13% of its
        tokens/s under load); see OMP_SPIN_ENV."""
        if self.sharing <= 1:
            return False
        with self._lock:
            families = {*self._planned_families, starting.family}
        families.update(s.spec.family for s in self.running_servers())
        return len(families) > 1

    @property
    def memory_guard(self) -> MemoryGuard:
        """The memory fit check: app.yaml's resources margin, calibration, memory_budget_mib as a cap."""
        with self._lock:
            if self._guard is None:
                r, s = self.config.app.resources, self.config.app.server
                probe = self._probe if self._probe is not None else SystemProbe()
                self._guard = MemoryGuard(probe, r.fraction, r.fixed_mib * MiB,
                                          self._calibration if self._calibration is not None else CalibrationCache(),
                                          budget_bytes=s.memory_budget_mib * MiB if s.memory_budget_mib else None)
            return self._guard

    @property
    def pool(self) -> ServerPool:
        with self._lock:
            if self._pool is None:
                s = self.config.app.server
                self._pool = CalibratingPool(self.binary, self.config.app.logs_dir, options=self.server_options(),
                                             idle_timeout_s=s.idle_timeout_s, idle_timeout_for=self._keep_alive,
                                             fit_check=self._admit, guard=self.memory_guard)
            return self._pool

    @property
    def cpu_gate(self) -> CpuGate:
        """Turns at the cores for the calls of servers that compute on the CPU, shared by every run here."""
        with self._lock:
            if self._cpu_gate is None:
                self._cpu_gate = CpuGate(usable_cores())
            return self._cpu_gate

    def cpu_threads(self, spec: ServerSpec) -> int | None:
        """The threads a server computes with when it computes on the CPU (its calls take turns at the
        cores); None when its layers are on a GPU."""
        return (spec.threads or self.cpu_gate.cores) if spec.n_gpu_layers == 0 else None

    @contextlib.asynccontextmanager
    async def compute_turn(self, owner: Hashable, server: ModelServer) -> AsyncIterator[None]:
        """A turn at the cores for one request to `server` (at once on a GPU). `owner`: one run, whose calls
        to its servers go together (a parallel stage's servers share the cores as its plan split them)."""
        threads = self.cpu_threads(server.spec)
        if threads is None:
            yield
            return
        async with self.cpu_gate.turn(owner, server.base_url, threads):
            yield

    def _keep_alive(self, spec: ServerSpec) -> float | None:
        """A model's own idle_timeout_s from models.yaml (None: app.yaml's server.idle_timeout_s)."""
        entry = self.config.models.get(spec.model)
        return entry.idle_timeout_s if entry is not None else None

    @property
    def has_pool(self) -> bool:
        """Whether servers may be running (asking does not build the pool, nor look for the binary)."""
        return self._pool is not None

    def running_servers(self) -> list[ModelServer]:
        return self._pool.servers() if self._pool is not None else []

    def is_idle(self, server: ModelServer) -> bool:
        """A pool server nobody uses now: the scheduler may stop it to make room."""
        return self._pool is not None and self._pool.is_idle(server)

    # ---------------------------------------------------------------- sharing servers across runs

    def expect_runs(self, runs: int) -> None:
        """How many runs (API requests, eval items) the front end lets go at once: new servers are sized for
        them, so their calls batch on one server's slots instead of queueing behind one slot."""
        with self._lock:
            self._expected_runs = max(1, runs)

    @contextlib.contextmanager
    def expecting(self, runs: int) -> Iterator[None]:
        """`expect_runs(runs)` for the block (an eval), then back to what it was."""
        with self._lock:
            before, self._expected_runs = self._expected_runs, max(self._expected_runs, runs)
        try:
            yield
        finally:
            with self._lock:
                self._expected_runs = before

    @contextlib.contextmanager
    def run_going(self) -> Iterator[None]:
        """A run uses this runtime's servers for the block (counted by `sharing`)."""
        with self._lock:
            self._active_runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._active_runs -= 1

    @property
    def sharing(self) -> int:
        """How many runs may share a server now: the expected count, or more when more are going."""
        with self._lock:
            return max(self._expected_runs, self._active_runs)

    def preferred_slots(self, planned: int, calls: int) -> int:
        """The slots a new server should have when each run wants `planned` of them at its busiest stage (or
        `calls` now) and `sharing` runs may: at most app.yaml's server.max_slots (never fewer than planned).
        Sized for the busiest stage, not the one that starts it: the server outlives the stage. Only a
        preference: the scheduler gives a new server as many of them as fit without stopping anything more."""
        return max(planned, min(self.config.app.server.max_slots, max(planned, calls) * self.sharing))

    def lease_warm(self, spec: ServerSpec) -> ModelServer | None:
        """The warm server `place` would pick without a decision (one with the preferred slots, or a busy one
        of the family), leased now; None when placing could choose otherwise (release it to the pool)."""
        if self._pool is None:
            return None
        return self._pool.try_acquire(with_slots(spec, self.preferred_slots(spec.slots, 1)))

    def place(self, spec: ServerSpec) -> ServerSpec:
        """The server a single request for `spec`'s model should use (the API's proxied model): a warm one of
        its family as it is (busy or not: its slots batch the requests), restarted bigger when it is idle
        and a bigger one fits; else a new one with the preferred slots, as many as fit. The start itself
        is still admitted by the pool."""
        want = self.preferred_slots(spec.slots, 1)
        with self._admit_lock:
            try:
                sched = self.schedule([Demand(with_slots(spec, want), want)])
            except ChorusError:
                return spec  # no estimate: the start reports the file's own error
            if not sched.waves or not sched.waves[0].placements:
                return spec  # does not fit: the pool's admission says so, need vs have
            wave = sched.waves[0]
            pool = self.pool
            placement = wave.placements[0]
            if placement.reuse is not None:
                return placement.reuse.spec
            for warm in wave.stop:  # idle servers in the way, or this family's smaller server
                server = warm.holding.server
                if isinstance(server, ModelServer) and pool.is_idle(server):
                    log.info("stopping idle '%s' to make room for '%s' with %d slots", server.model, spec.model,
                             placement.spec.slots)
                    pool.stop(server)
            return placement.spec

    # ---------------------------------------------------------------- the scheduler: one admission point

    def memory_state(self) -> MemoryState:
        """The scheduler's view now: the pool's servers once each (idle or not, last use), usable memory."""
        pool = self._pool
        return self.memory_guard.state(self.running_servers(), idle=self.is_idle,
                                       last_used=pool.last_used if pool is not None else None)

    def schedule(self, demands: list[Demand], state: MemoryState | None = None) -> Schedule:
        """Waves, slots and stops for `demands`, from `state` (a what-if's) or from the live state now."""
        return self.memory_guard.schedule(demands, state if state is not None else self.memory_state())

    def begin_wave(self, wave: Wave) -> list[ModelServer]:
        """Execute a wave's decision: stop its idle servers, pin the warm ones it reuses, admit its new ones
        together (InsufficientMemory, need vs have, when memory changed since it was decided). Returns the
        pinned servers, for `end_wave`."""
        pool = self.pool
        with self._admit_lock:
            for warm in wave.stop:
                server = warm.holding.server
                if isinstance(server, ModelServer) and pool.is_idle(server):
                    log.info("stopping idle '%s' to make room for %s", server.model,
                             ", ".join(p.spec.model for p in wave.new) or "the wave")
                    pool.stop(server)
            pinned = [w.holding.server for p in wave.placements if (w := p.reuse) is not None
                      and isinstance(w.holding.server, ModelServer) and pool.pin(w.holding.server)]
            try:
                self.memory_guard.reserve([p.spec for p in wave.new], pool.servers())
            except BaseException:
                for server in pinned:
                    pool.release(server)
                raise
        return [s for s in pinned if isinstance(s, ModelServer)]

    def end_wave(self, wave: Wave, pinned: list[ModelServer]) -> None:
        """The wave is over: unpin its warm servers; an admitted start that never ran stops counting."""
        for server in pinned:
            self.pool.release(server)
        for p in wave.new:
            self.memory_guard.forget(p.spec)

    def _admit(self, spec: ServerSpec, running: list[ModelServer]) -> None:
        """The pool's admission for a start: a start a wave reserved goes ahead; any other (one server: a
        proxied model, an embedder, a retry) is scheduled as a wave of its own, by the same scheduler."""
        guard = self.memory_guard
        if guard.reserved(spec):
            return
        with self._admit_lock:
            try:
                sched = self.schedule([Demand(spec, spec.slots)])
            except ChorusError as exc:  # no estimate: the start reports the file's own error
                log.info("no memory plan for '%s': %s", spec.model, exc)
                return
            pool = self.pool
            if sched.waves:
                for warm in sched.waves[0].stop:
                    server = warm.holding.server
                    if isinstance(server, ModelServer) and pool.is_idle(server):
                        log.info("stopping idle '%s' to make room for '%s'", server.model, spec.model)
                        pool.stop(server)
            guard.check_fit(spec, pool.servers())

    def machine(self) -> Machine:
        guard = self.memory_guard
        has_gpu = guard.has_gpu()
        if not has_gpu and not self._warned_no_gpu:
            self._warned_no_gpu = True
            # a fact of the machine, not a problem of this run: in the app log and `chorus check`, not on stderr
            log.info("%s: running on the CPU, n_gpu_layers forced to 0", guard.gpu_note or "no GPU")
        return Machine(has_gpu=has_gpu, gpu_note=guard.gpu_note, cores=usable_cores())

    def plan(self, pipeline: PipelineSpec, mode: RunMode = "manual", *,
             status: PipelineStatus | None = None) -> RunPlan:
        """The run plan of `pipeline` on this registry and machine: every parameter resolved once (`status`:
        the models check the front door made, not made again)."""
        plan = build_plan(pipeline, self.registry, self.machine(), mode=mode,
                          config_dir=self.config.paths.config_dir, status=status)
        families = {c.target.server.family for st in plan.stages for c in st.all_calls() if c.target.server}
        with self._lock:
            self._planned_families |= families
        return plan

    def server_spec(self, model: str | ModelRecord, *, n_ctx: int | None = None,
                    n_gpu_layers: int | None = None, slots: int = 1) -> ServerSpec:
        """One model's server spec outside a pipeline (`chorus serve`, the Models page), resolved by the plan's
        own rule."""
        rec = model if isinstance(model, ModelRecord) else self.registry.get(model)
        machine = self.machine()
        spec = resolve_server(rec, machine, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, slots=slots)
        # every core, as a plan gives a server that runs alone: the same family, so a proxied model's requests
        # and pipeline runs of it share one server (without `-t` they had two copies of the model)
        return spec if spec.threads is not None else dataclasses.replace(spec, threads=machine.cores)

    def start_server(self, spec: ServerSpec) -> ModelServer:
        """A standalone server outside the pool (for `chorus serve`), after the memory fit check."""
        running = self.running_servers()
        self.memory_guard.check_fit(spec, running)
        try:
            server = ModelServer(spec, self.binary, self.config.app.logs_dir, self.server_options()).start()
        finally:
            self.memory_guard.forget(spec)
        self.memory_guard.observe([server])
        return server

    def discard_server(self, endpoint: Endpoint) -> None:
        """Stop the pool's server behind `endpoint` (a hung one); the next request starts a fresh one."""
        if endpoint.remote or self._pool is None:
            return
        for server in self._pool.servers():
            if server.base_url == endpoint.base_url:
                self._pool.stop(server)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


@contextlib.contextmanager
def runtime_embedder(runtime: Runtime, model: str) -> Iterator[HttpEmbedder]:
    """An embedder for `model` for the duration of the block: a local server is leased (admission, warm reuse)."""
    rec = runtime.registry.get(model)
    if rec.entry.role != "embedding":
        raise NotAnEmbeddingModel(model, rec.entry.role)
    if rec.is_remote:
        key = os.environ.get(rec.entry.api_key_env) if rec.entry.api_key_env else None
        yield HttpEmbedder(model, rec.entry.url or "", key, remote=True)
        return
    with runtime.pool.lease(runtime.server_spec(rec)) as server:
        yield HttpEmbedder(model, server.base_url, server.api_key)
