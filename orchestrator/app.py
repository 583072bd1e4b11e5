"""The front door: the one object every front end (CLI, UI, HTTP API) asks, so each check happens once, here.

Front ends parse input and render output. Listing pipelines and models, the status report, loading a
pipeline with `--set` overrides, planning (the run plan and its memory plan, resolved once), running,
rerunning, evals and server housekeeping all go through `Chorus`. The checks a run needs before anything
starts (a clean question, a base pipeline whose models are all registered, custom aggregators on the
allow-list, a llama-server binary when a local model must run) are made here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import ChorusError
from launcher.fileio import write_text_atomic
from launcher.memory.estimate import MemoryEstimate
from launcher.memory.gguf import GGUFMetadata, read_gguf
from launcher.memory.probes import SystemMemory
from launcher.process.binary import binary_version, find_llama_server, find_rpc_server
from launcher.process.client import GenerationClient
from launcher.process.rpc import DEFAULT_PORT as RPC_DEFAULT_PORT
from launcher.process.rpc import WorkerProcess, is_loopback, query_memory, start_worker
from launcher.process.server import (
    MAX_N_CTX,
    MIN_N_CTX,
    ModelServer,
    ServerSpec,
    install_signal_cleanup,
    own_group_dying_with_parent,
)
from launcher.process.state import ServerRecord, StopResult, list_running, stop_recorded
from orchestrator.config.aggregators import check_pipeline
from orchestrator.config.inputs import clean_question
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.registry import ModelRecord, PipelineStatus, Registry
from orchestrator.config.schema import NAME_PATTERN, ChorusConfig, PipelineSpec, load_config, load_pipeline
from orchestrator.engine.backend import Backend
from orchestrator.engine.events import Observer
from orchestrator.engine.run import AllowSequential, CancelToken
from orchestrator.errors import ModelUnavailable
from orchestrator.history.store import SessionStore
from orchestrator.limits import JUDGE_MAX_TOKENS
from orchestrator.plan.memory import MemoryPlan, plan_memory, runs_that_fit
from orchestrator.plan.resolve import RunMode, RunPlan
from orchestrator.rag.embed import HttpEmbedder
from orchestrator.runs import Rerun, Runner, RunOutcome
from orchestrator.runtime import Runtime, runtime_embedder

if TYPE_CHECKING:  # evals are imported when one is made: a run, the API and the UI's other pages never load them
    from orchestrator.eval.items import EvalItem
    from orchestrator.eval.run import EvalRunner, EvalSpec, ProgressFn
    from orchestrator.eval.store import EvalStore

log = logging.getLogger("chorus.app")

PREFIX = "chorus/"
BASE = "base"
PIPELINES_DIR = "pipelines"

# What a front-end process needs from this machine besides a Chorus (its own signals, its children, a worker,
# a model file's header, the API proxy's HTTP clients): re-exported so that front ends import `orchestrator`
# only, never `launcher`.
__all__ = [
    "BASE",
    "MAX_N_CTX",
    "MIN_N_CTX",
    "PREFIX",
    "RPC_DEFAULT_PORT",
    "Chorus",
    "GGUFMetadata",
    "GenerationClient",
    "ModelServer",
    "Pipeline",
    "PipelineRef",
    "Planned",
    "PreparedRerun",
    "ServerRecord",
    "Status",
    "WorkerProcess",
    "find_llama_server",
    "find_rpc_server",
    "install_signal_cleanup",
    "is_loopback",
    "own_group_dying_with_parent",
    "query_memory",
    "read_gguf",
    "start_worker",
    "write_text_atomic",
]


@dataclass(frozen=True)
class PipelineRef:
    """A pipeline file a front end may offer (`chorus/base`, `chorus/<stem>`), not loaded yet."""

    id: str
    path: Path
    mode: RunMode


@dataclass(frozen=True)
class Pipeline:
    """A pipeline that passed the front door's checks: the only kind `Chorus` plans and runs."""

    spec: PipelineSpec
    mode: RunMode
    id: str | None = None
    path: Path | None = None
    status: PipelineStatus | None = None  # the models check, when it was made: the plan takes it, not asking again

    def with_spec(self, spec: PipelineSpec) -> Pipeline:
        """The same pipeline with new sampling values (the API's request fields): models and aggregators, what
        the checks are about, must not change, so the checks stand."""
        if spec.model_names() != self.spec.model_names() or _aggregators(spec) != _aggregators(self.spec):
            raise ValueError("with_spec changes sampling values only, not models or aggregators")
        return replace(self, spec=spec)


def _aggregators(spec: PipelineSpec) -> list[object]:
    return [stage.aggregation for stage in spec.stages]


@dataclass(frozen=True)
class PreparedRerun:
    """A checked rerun: the parent's pipeline (overrides applied) and what the new run starts from."""

    pipeline: Pipeline
    start: Rerun


@dataclass(frozen=True)
class Planned:
    """A pipeline's run plan and the memory plan made from it, resolved once for everything shown."""

    pipeline: Pipeline
    run: RunPlan
    memory: MemoryPlan


@dataclass(frozen=True)
class Status:
    """What `chorus check` shows: the binary, the folders, the registry, base mode and memory."""

    config: ChorusConfig
    registry: Registry
    base: PipelineStatus
    server_path: Path | None
    server_version: str | None
    server_error: str | None
    memory: SystemMemory  # host or container RAM, GPUs, and the budget when one is set

    def to_dict(self) -> dict[str, Any]:
        config = self.config
        return {
            "llama_server": {"path": str(self.server_path) if self.server_path else None,
                             "version": self.server_version, "error": self.server_error},
            "config_dir": str(config.paths.config_dir),
            "models_dir": str(config.models_dir),
            "models_dir_exists": config.models_dir.is_dir(),
            "models": [r.to_dict() for r in self.registry.records.values()],
            "base_pipeline": {"available": self.base.available, "missing": self.base.missing},
            "memory": self.memory.to_dict(),
        }


class Chorus:
    """One per process (the CLI's command, the UI's cache, the API's app): owns the Runtime (warm servers)."""

    def __init__(self, config: ChorusConfig, *, runtime: Runtime | None = None,
                 store: SessionStore | None = None) -> None:
        self.config = config
        self._runtime = runtime
        self._lock = threading.Lock()
        self.store = store or SessionStore(config.sessions_dir)

    @property
    def runtime(self) -> Runtime:
        """Built on first use: `chorus ps` and `chorus stop` need no registry (no model file is read)."""
        with self._lock:
            if self._runtime is None:
                self._runtime = Runtime(self.config)
            return self._runtime

    @classmethod
    def from_dir(cls, config_dir: Path | str | None = None) -> Chorus:
        """The config dir as given, else the usual lookup ($CHORUS_CONFIG_DIR, ./config, ...)."""
        return cls(load_config(config_dir))

    @property
    def registry(self) -> Registry:
        return self.runtime.registry

    def close(self) -> None:
        """Stop the servers this process started."""
        if self._runtime is not None:
            self._runtime.close()

    def __enter__(self) -> Chorus:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- catalog

    def pipeline_files(self) -> dict[str, PipelineRef]:
        """Every pipeline id with its file and mode: the base pipeline.yaml, then `<config>/pipelines/*.yaml`."""
        refs = {PREFIX + BASE: PipelineRef(PREFIX + BASE, self.config.paths.pipeline, "base")}
        folder = self.config.paths.config_dir / PIPELINES_DIR
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                if path.stem == BASE or not re.match(NAME_PATTERN, path.stem):
                    log.warning("pipeline file %s is not offered: its name must match %s and not be '%s'",
                                path, NAME_PATTERN, BASE)
                    continue
                refs[PREFIX + path.stem] = PipelineRef(PREFIX + path.stem, path, "manual")
        return refs

    def pipelines(self) -> list[Pipeline]:
        """The runnable pipelines: those that load and whose models are all registered (others are logged)."""
        runnable = []
        for ref in self.pipeline_files().values():
            try:
                runnable.append(self.open_pipeline(ref))
            except ChorusError as exc:
                log.info("pipeline %s is not offered: %s", ref.id, exc)
        return runnable

    def pipeline_by_id(self, pipeline_id: str) -> Pipeline:
        """The pipeline `chorus/<name>` names, checked; ModelUnavailable when there is none, with why (the
        file's name only, never this machine's folders)."""
        ref = self.pipeline_files().get(pipeline_id)
        if ref is None:
            raise ModelUnavailable(pipeline_id, "no such pipeline (GET /v1/models lists them)")
        try:
            return self.open_pipeline(ref)
        except ChorusError as exc:
            raise ModelUnavailable(pipeline_id, exc.message.replace(str(ref.path), ref.path.name)) from None

    def open_pipeline(self, ref: PipelineRef) -> Pipeline:
        """A catalogued pipeline: every model it names must be registered, whatever its mode."""
        return self.pipeline(load_pipeline(ref.path), mode=ref.mode, require_models=True,
                             id=ref.id, path=ref.path)

    def models(self) -> dict[str, ModelRecord]:
        """The registered models a stage or a proxied request can call (embedding models excluded)."""
        return self.registry.generators

    def model(self, name: str) -> ModelRecord:
        """One registered model; ModelUnavailable with the registry's reason otherwise."""
        return self.registry.get(name)

    # ---------------------------------------------------------------- status

    def status(self) -> Status:
        """`chorus check`: base mode is blocked too when local models have no llama-server to run them."""
        base = self.registry.base_pipeline_status()
        memory = self.runtime.memory_guard.snapshot()
        path: Path | None = None
        version = error = None
        try:
            found = find_llama_server(self.config.app.llama_server)
            path, version = found, binary_version(found)
        except ChorusError as exc:
            error = str(exc)
        if path is None and self._base_needs_local_server():
            base = PipelineStatus(False, {**base.missing,
                                          "llama-server": "not found: local models cannot run without it"})
        return Status(self.config, self.registry, base, path, version, error, memory)

    def _base_needs_local_server(self) -> bool:
        """Whether the base pipeline has a local model; a broken pipeline.yaml is reported on its own."""
        try:
            pipeline = self.config.load_pipeline()
        except ChorusError:
            return False
        return any(rec is None or not rec.is_remote for rec in map(self.registry.records.get, pipeline.model_names()))

    def base_status(self) -> PipelineStatus:
        """Whether base mode can run: every model of pipeline.yaml registered."""
        return self.registry.base_pipeline_status()

    # ---------------------------------------------------------------- loading: every check once

    def pipeline(self, source: PipelineSpec | Path | None = None, *, mode: RunMode = "base",
                 overrides: Sequence[str] = (), override_source: str = "--set", require_models: bool | None = None,
                 check_source: str | None = None, id: str | None = None, path: Path | None = None) -> Pipeline:
        """Load (a file, a spec, or the base pipeline.yaml), apply overrides, and check: in base mode (or with
        `require_models`) every model must be registered (PipelineBlocked, with why), and custom aggregators
        must be allowed."""
        if source is None:
            source = self.config.paths.pipeline
        if isinstance(source, Path):
            path = path or source
            source = load_pipeline(source)
        spec = source
        config_dir = self.config.paths.config_dir
        if overrides:  # no config_dir: the allow-list is checked below, once, overrides applied
            spec = apply_overrides(spec, overrides, source=override_source)
        status = None
        required = require_models if require_models is not None else mode == "base"
        if required or mode == "base":  # base: the plan records a blocked pipeline from this one check
            base_file = path is None or path == self.config.paths.pipeline  # pipeline.yaml, or a base session's
            named = None if mode == "base" and base_file else (id.removeprefix(PREFIX) if id else spec.name)
            status = replace(self.registry.pipeline_status(spec), pipeline=named)
            if required:
                status.raise_if_blocked()
        check_pipeline(spec, config_dir, self.config.app.aggregators.allowed,
                       source=check_source or ("pipeline" if mode == "base" else "manual pipeline"))
        return Pipeline(spec, mode, id, path, status)

    # ---------------------------------------------------------------- planning

    def plan(self, pipeline: Pipeline) -> Planned:
        """The run plan and its memory plan (the scheduler's what-if), each resolved once."""
        run_plan = self.runtime.plan(pipeline.spec, pipeline.mode, status=pipeline.status)
        return Planned(pipeline, run_plan, plan_memory(self.runtime, run_plan))

    def require_binary(self, pipeline: Pipeline) -> None:
        """A pipeline with local models needs llama-server: one clear error up front (BinaryNotFound, with the
        build command), not the same failure on every model of a saved, failed run."""
        records = [self.registry.records.get(name) for name in pipeline.spec.model_names()]
        if any(rec is not None and rec.available and not rec.is_remote for rec in records):
            self.runtime.binary  # noqa: B018 - raises BinaryNotFound

    # ---------------------------------------------------------------- runs

    def runner(self, store: SessionStore | None = None) -> Runner:
        return Runner(self.runtime, store=store or self.store)

    def run(self, pipeline: Pipeline, question: str, *, observers: Sequence[Observer] = (),
            cancel: CancelToken | None = None, allow_sequential: AllowSequential | bool = True,
            history: Sequence[dict[str, str]] = ()) -> RunOutcome:
        """Run to the end, saving history as it goes (QuestionError, then BinaryNotFound, before anything starts)."""
        question = clean_question(question)
        self.require_binary(pipeline)
        return self.runner().run(pipeline.spec, question, mode=pipeline.mode, observers=observers, cancel=cancel,
                                 allow_sequential=allow_sequential, history=history, status=pipeline.status)

    async def arun(self, pipeline: Pipeline, question: str, *, observers: Sequence[Observer] = (),
                   cancel: CancelToken | None = None, allow_sequential: AllowSequential | bool = True,
                   history: Sequence[dict[str, str]] = (), backend: Backend | None = None,
                   store: SessionStore | None = None) -> RunOutcome:
        """`run` on the caller's event loop (the HTTP API); `backend` replaces the real one in tests."""
        question = clean_question(question)
        if backend is None:
            self.require_binary(pipeline)
        return await self.runner(store).arun(pipeline.spec, question, mode=pipeline.mode, observers=observers,
                                             cancel=cancel, allow_sequential=allow_sequential, backend=backend,
                                             history=history, status=pipeline.status)

    def prepare_rerun(self, session_id: str, stage: int, *, overrides: Sequence[str] = (),
                      override_source: str = "--set") -> PreparedRerun:
        """What a rerun of `session_id` from `stage` runs, checked now (a bad stage, a damaged session, an
        override that does not fit: SessionError or ConfigError; a base session whose models are no longer
        all registered: PipelineBlocked) before anything runs or is saved."""
        again = self.runner().prepare_rerun(session_id, stage)
        pipeline = self.pipeline(again.pipeline, mode=again.mode, overrides=overrides,
                                 override_source=override_source)  # base: every model registered, as a run
        return PreparedRerun(pipeline, again)

    def rerun(self, prepared: PreparedRerun, *, observers: Sequence[Observer] = (),
              cancel: CancelToken | None = None, allow_sequential: AllowSequential | bool = True) -> RunOutcome:
        """A new session linked to its parent: the steps before the rerun stage copied, the rest run again."""
        again = prepared.start
        return self.runner().run(prepared.pipeline.spec, again.question, mode=again.mode, observers=observers,
                                 cancel=cancel, allow_sequential=allow_sequential, prior_stages=again.prior,
                                 parent_session=again.parent, status=prepared.pipeline.status)

    # ---------------------------------------------------------------- evals

    def eval_pipeline(self, source: PipelineSpec | Path | None = None, *, mode: RunMode = "base",
                      overrides: Sequence[str] = ()) -> Pipeline:
        """The pipeline an eval compares with its members: in either mode every model must be registered."""
        return self.pipeline(source, mode=mode, overrides=overrides, require_models=True)

    def eval_spec(self, pipeline: Pipeline, *, baselines: bool = True, judge: str | None = None,
                  judge_max_tokens: int = JUDGE_MAX_TOKENS, concurrency: int | None = None) -> EvalSpec:
        """The systems of an eval of a checked pipeline: it, then each member model alone. Without a
        `concurrency`, as many items go at once as fit (`runs_that_fit`, at most server.max_slots)."""
        from orchestrator.eval.run import build_spec

        spec = build_spec(self.runtime, pipeline.spec, mode=pipeline.mode, baselines=baselines, judge=judge,
                          judge_max_tokens=judge_max_tokens, concurrency=concurrency or 1)
        if concurrency is None:
            spec.concurrency = self.runs_that_fit([pipeline.spec, *(s.pipeline for s in spec.baselines)],
                                                  mode=pipeline.mode)
        return spec

    def runs_that_fit(self, pipelines: Sequence[PipelineSpec], *, mode: RunMode = "manual") -> int:
        """How many runs of `pipelines` fit at once, their servers sized to batch them (at most
        server.max_slots): an eval's default concurrency."""
        most = self.config.app.server.max_slots
        try:
            plans = [self.runtime.plan(p, mode if i == 0 else "manual") for i, p in enumerate(pipelines)]
            return runs_that_fit(self.runtime, plans, most, most=most)
        except ChorusError as exc:  # no estimate, no binary...: one at a time, each start checked as usual
            log.info("how many runs fit at once is unknown (%s): one at a time", exc)
            return 1

    def expect_runs(self, runs: int) -> None:
        """Tell the scheduler how many runs go at once (the API's max_runs): new servers get the slots to
        batch them, as many as fit."""
        self.runtime.expect_runs(runs)

    def eval_runner(self, *, backend: Backend | None = None, on_progress: ProgressFn | None = None) -> EvalRunner:
        from orchestrator.eval.run import EvalRunner

        return EvalRunner(self.runtime, store=self.eval_store(), backend=backend, on_progress=on_progress)

    def eval_store(self) -> EvalStore:
        from orchestrator.eval.store import EvalStore

        return EvalStore(self.config.sessions_dir)

    def start_eval(self, spec: EvalSpec, items: Iterable[EvalItem], *, source: str,
                   runner: EvalRunner | None = None) -> str:
        """Record a new eval; every question is cleaned here, once, as a run's would be."""
        cleaned = [replace(item, question=clean_question(item.question)) for item in items]
        return (runner or self.eval_runner()).start(spec, cleaned, source=source)

    # ---------------------------------------------------------------- servers

    @property
    def state_dir(self) -> Path:
        """Where every chorus process records its servers (the same folder as `Runtime.state_dir`)."""
        return self.config.app.logs_dir / "running"

    def servers(self) -> list[ServerRecord]:
        """The llama-servers any chorus process of this user started (`chorus ps`)."""
        return list_running(self.state_dir)

    def stop_server(self, record: ServerRecord) -> StopResult:
        """Stop one recorded server (SIGTERM to its group, SIGKILL after app.yaml's grace)."""
        return stop_recorded(self.state_dir, record, grace_s=self.config.app.server.stop_grace_s)

    def serve(self, model: str, *, n_ctx: int | None = None, n_gpu_layers: int | None = None,
              slots: int = 1, announce: Callable[[ServerSpec], None] | None = None) -> ModelServer:
        """One model's server outside the pool (`chorus serve`), after the memory fit check; `announce` sees
        its spec before the start."""
        spec = self.runtime.server_spec(model, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, slots=slots)
        if announce is not None:
            announce(spec)
        return self.runtime.start_server(spec)

    @contextlib.contextmanager
    def embedder(self, model: str) -> Iterator[HttpEmbedder]:
        """An embedding model's server for the block (leased through the pool: admission, warm reuse)."""
        with runtime_embedder(self.runtime, model) as embedder:
            yield embedder

    @contextlib.asynccontextmanager
    async def lease_model(self, model: str) -> AsyncIterator[tuple[ModelRecord, ModelServer | None]]:
        """A registered model for the block (the API's proxy): a local one's server leased from the pool (the
        memory admission and the start run in a worker thread), held until the block ends; None for a remote
        one. ModelUnavailable, InsufficientMemory or a ServerStartError otherwise."""
        record = self.registry.get(model)
        if record.is_remote:
            yield record, None
            return
        pool = self.runtime.pool
        spec = self.runtime.server_spec(record)
        # a warm server nothing would replace: leased at once, without a memory decision in a worker thread
        # (that cost about 5 ms of CPU per request, taken from the server's cores)
        server = self.runtime.lease_warm(spec)
        if server is None:
            spec = await asyncio.to_thread(self.runtime.place, spec)
            server = await pool.aacquire(spec)
        try:
            yield record, server
        finally:
            pool.release(server)

    def compute_turn(self, server: ModelServer) -> contextlib.AbstractAsyncContextManager[None]:
        """One proxied request's turn at the cores, when `server` computes on the CPU: it joins the calls
        computing on that server, or waits while another server's calls hold the cores (pipeline runs take
        the same turns). Each request is a run of its own."""
        return self.runtime.compute_turn(object(), server)

    def running_servers(self) -> list[ModelServer]:
        """This process's warm servers (the UI's Models page); none before the first run."""
        return self.runtime.running_servers()

    def stop_running(self, server: ModelServer) -> None:
        """Stop one of this process's servers; the next request for its model starts a fresh one."""
        self.runtime.pool.stop(server)

    def default_need(self, record: ModelRecord) -> MemoryEstimate:
        """What a model's server needs at its defaults (one slot), by the same estimate the scheduler uses."""
        return self.runtime.memory_guard.need(self.runtime.server_spec(record))

    def binary_version(self) -> str:
        return binary_version(self.runtime.binary)

