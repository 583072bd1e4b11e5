"""Resolve once: a pipeline spec + the registry + this machine → one `RunPlan`.

Every parameter of every call is decided here and nowhere else: slot overrides, then stage, then
pipeline defaults, then the model's entry in models.yaml. A call carries a fully resolved server spec
(file, n_ctx, n_gpu_layers, slots, chat template, threads) and a fully resolved generation request.
Slot counts and server sharing are keyed on the *resolved* spec, so two stages that ask for the same
model with the same effective settings share one server whether they spelled the settings out or not.
The memory planner, the engine, `chorus plan` and the UI read this plan; nothing downstream re-resolves.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher.process.client import GenerationRequest, Mode
from launcher.process.server import ServerSpec
from orchestrator.config.registry import ModelRecord, PipelineStatus, Registry
from orchestrator.config.schema import GENERATION_KEYS, GenerationParams, PipelineSpec, StageSpec
from orchestrator.errors import ModelUnavailable, PipelineBlocked
from orchestrator.records import ErrorInfo

_CONSTRAINTS = ("grammar", "json_schema")   # one output constraint: the most specific level setting either wins
RunMode = Literal["base", "manual"]


@dataclass(frozen=True)
class Machine:
    """What resolution needs to know about this machine."""

    has_gpu: bool = False
    gpu_note: str | None = None  # why there is no GPU, when there is none
    cores: int = 1               # the cores this process may use (affinity, cgroup quota): servers share them


@dataclass(frozen=True)
class Target:
    """Where a call goes: a local server (its resolved spec), a remote endpoint, or nowhere (and why)."""

    model: str
    kind: Literal["local", "remote", "unavailable"]
    mode: Mode = "chat"                     # chat | completion
    server: ServerSpec | None = None        # local
    url: str | None = None                  # remote
    urls: tuple[str, ...] = ()              # remote with replicas: every base URL (url first)
    api_key_env: str | None = None          # remote: the environment variable holding the key
    reason: str | None = None               # unavailable
    error: ErrorInfo | None = None          # unavailable: the typed error to record on the step

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "kind": self.kind, "mode": self.mode}
        if self.server is not None:
            out["server"] = server_dict(self.server)
        if self.url:
            out["url"] = self.url
        if len(self.urls) > 1:
            out["replicas"] = list(self.urls)
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class CallPlan:
    """One model call of a stage: its label, where it goes and the request (the prompt is rendered later)."""

    label: str
    target: Target
    request: GenerationRequest

    @property
    def model(self) -> str:
        return self.target.model

    def public_params(self) -> dict[str, Any]:
        """What the session records as this call's parameters."""
        params = {k: getattr(self.request, k) for k in GENERATION_KEYS if getattr(self.request, k) is not None}
        if self.target.server is not None:
            params.update(n_ctx=self.target.server.n_ctx, n_gpu_layers=self.target.server.n_gpu_layers,
                          slots=self.target.server.slots)
        return params

    def to_dict(self) -> dict[str, Any]:
        request = {k: v for k, v in dataclasses.asdict(self.request).items() if k != "prompt" and v is not None}
        return {"label": self.label, "target": self.target.to_dict(), "request": request}


@dataclass(frozen=True)
class RetrievalPlan:
    """A retrieve stage: which collection in which docs.db, how many passages, and the query embedder.

    `embedder` is the collection's embedding model as a target (hybrid ranking) when the collection has
    vectors; None means BM25 alone (no vectors, or the collection does not exist yet: the stage says so).
    """

    db: Path
    collection: str
    top_k: int
    query_from: Literal["question", "previous"]
    embedder: Target | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"db": str(self.db), "collection": self.collection, "top_k": self.top_k,
                "query_from": self.query_from, "embedder": self.embedder.to_dict() if self.embedder else None}


@dataclass(frozen=True)
class StagePlan:
    index: int                  # 1-based, as in stepN.json
    spec: StageSpec
    calls: tuple[CallPlan, ...]
    synthesis: CallPlan | None  # the aggregation's model call, when it has one
    retrieval: RetrievalPlan | None = None  # kind: retrieve (no model calls)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.calls]

    def call(self, label: str) -> CallPlan:
        return next(c for c in self.calls if c.label == label)

    def all_calls(self) -> Iterator[CallPlan]:
        yield from self.calls
        if self.synthesis is not None:
            yield self.synthesis

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "execution": self.spec.execution,
                "on_error": self.spec.on_error, "aggregation": self.spec.aggregation.type,
                "calls": [c.to_dict() for c in self.calls],
                "synthesis": self.synthesis.to_dict() if self.synthesis else None,
                **({"retrieval": self.retrieval.to_dict()} if self.retrieval else {})}


@dataclass(frozen=True)
class RunPlan:
    pipeline: PipelineSpec
    mode: RunMode
    stages: tuple[StagePlan, ...]
    machine: Machine = field(default_factory=Machine)
    config_dir: Path | None = None              # where custom aggregators are found
    blocked: ErrorInfo | None = None            # base mode: why the run cannot start (a typed error)

    @property
    def servers(self) -> list[ServerSpec]:
        """The distinct local servers the run needs, in first-use order."""
        out: list[ServerSpec] = []
        for stage in self.stages:
            for call in stage.all_calls():
                spec = call.target.server
                if spec is not None and spec not in out:
                    out.append(spec)
        return out

    def stage(self, index: int) -> StagePlan:
        return self.stages[index - 1]

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline.name, "mode": self.mode,
                "blocked": self.blocked.to_dict() if self.blocked else None,
                "gpu": self.machine.has_gpu, "gpu_note": self.machine.gpu_note,
                "servers": [server_dict(s) for s in self.servers],
                "stages": [s.to_dict() for s in self.stages]}


def server_dict(spec: ServerSpec) -> dict[str, Any]:
    return {"model": spec.model, "file": str(spec.model_path), "n_ctx": spec.n_ctx,
            "n_gpu_layers": spec.n_gpu_layers, "slots": spec.slots, "threads": spec.threads,
            "chat_template": spec.chat_template, "extra_args": list(spec.extra_args), "rpc": list(spec.rpc)}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _layered(*levels: GenerationParams) -> dict[str, Any]:
    """Each generation parameter from the most specific level that sets it (slot, stage, defaults).

    grammar and json_schema are one choice: a slot's json_schema replaces its stage's grammar rather than
    joining it (llama-server refuses a request with both).
    """
    out = {k: _first(*(getattr(level, k) for level in levels)) for k in GENERATION_KEYS}
    owner = next((lv for lv in levels if any(getattr(lv, k) is not None for k in _CONSTRAINTS)), None)
    out.update({k: getattr(owner, k) if owner is not None else None for k in _CONSTRAINTS})
    return out


# ---------------------------------------------------------------- resolution


def resolve_server(record: ModelRecord, machine: Machine, *, n_ctx: int | None = None,
                   n_gpu_layers: int | None = None, slots: int = 1) -> ServerSpec:
    """The one place a local server's command-line parameters are decided (also used by `chorus serve`)."""
    if record.path is None:
        raise ValueError(f"{record.name} is a remote model: it has no local server")
    entry = record.entry
    ngl = entry.default_gpu_layers if n_gpu_layers is None else n_gpu_layers
    if not machine.has_gpu and not entry.rpc:
        ngl = 0  # with RPC workers the offloaded layers go to them (llama.cpp counts them as GPUs)
    extra = tuple(entry.extra_args)
    if entry.role == "embedding" and not {"--embedding", "--embeddings"} & set(extra):
        extra = ("--embeddings", *extra)  # its own family: an embedding server never serves chat
    return ServerSpec(model=record.name, model_path=record.path, n_ctx=n_ctx or entry.default_n_ctx,
                      n_gpu_layers=ngl, slots=max(slots, entry.parallel), threads=entry.threads,
                      chat_template=entry.chat_template, extra_args=extra, rpc=tuple(entry.rpc))


def _target(registry: Registry, model: str, machine: Machine, n_ctx: int | None,
            n_gpu_layers: int | None, *, role: str = "generate") -> Target:
    record = registry.records.get(model)
    if record is None or not record.available:
        exc = ModelUnavailable(model, "not defined in models.yaml" if record is None
                               else (record.reason or record.status))
        return Target(model, "unavailable", reason=exc.reason, error=ErrorInfo.of(exc))
    if record.entry.role != role:
        exc = ModelUnavailable(model, "an embedding model (role: embedding) cannot answer in a stage"
                               if record.entry.role == "embedding" else "not an embedding model (role: embedding)")
        return Target(model, "unavailable", reason=exc.reason, error=ErrorInfo.of(exc))
    if record.is_remote:
        urls = tuple(dict.fromkeys([u for u in [record.entry.url, *record.entry.replicas] if u]))
        return Target(model, "remote", mode=record.mode, url=record.entry.url, urls=urls,
                      api_key_env=record.entry.api_key_env)
    return Target(model, "local", mode=record.mode,
                  server=resolve_server(record, machine, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers))


def _stage_calls(pipeline: PipelineSpec, stage: StageSpec, registry: Registry,
                 machine: Machine) -> tuple[list[CallPlan], CallPlan | None]:
    d = pipeline.defaults
    n_ctx, ngl = _first(stage.n_ctx, d.n_ctx), _first(stage.n_gpu_layers, d.n_gpu_layers)
    base = _layered(stage, d)
    calls = []
    for slot in stage.models:
        gen = _layered(slot, stage, d)
        system = slot.system_prompt if slot.system_prompt is not None else stage.system_prompt
        calls.append(CallPlan(slot.label or slot.model, _target(registry, slot.model, machine, n_ctx, ngl),
                              GenerationRequest(prompt="", system_prompt=system, **gen)))
    synthesis = None
    agg = stage.aggregation  # the stage's one aggregation model call: the judge's, or the synthesis model's
    model = agg.judge_model if agg.type == "judge" else agg.synthesis_model
    if model:
        synthesis = CallPlan(f"{model}-synthesis", _target(registry, model, machine, n_ctx, ngl),
                             GenerationRequest(prompt="", system_prompt="", **base))
    return calls, synthesis


def _shared(call: CallPlan, servers: dict[tuple[object, ...], ServerSpec]) -> CallPlan:
    """The call with its family's one server spec (the first one seen, with the family's slot count)."""
    spec = call.target.server
    if spec is None:
        return call
    return dataclasses.replace(call, target=dataclasses.replace(call.target, server=servers[spec.family]))


def build_plan(pipeline: PipelineSpec, registry: Registry, machine: Machine | None = None, *,
               mode: RunMode = "manual", config_dir: Path | None = None,
               status: PipelineStatus | None = None) -> RunPlan:
    """Resolve every call of every stage. Never raises for a missing model: the call's target says why.

    Base mode records a blocked pipeline on the plan: from `status` when the front door checked the models
    already (`Chorus.pipeline`), so the check is made once; asked of the registry here only when it did not
    (a rerun, a resumed eval, a Runner used on its own).

    Slots: per resolved server family (everything but the slot count), the most calls any one stage
    makes at once; every stage asks for that many, so one warm server serves the whole run.
    """
    machine = machine or Machine()
    resolved = [_stage_calls(pipeline, stage, registry, machine) if stage.kind == "generate" else ([], None)
                for stage in pipeline.stages]
    slots: dict[tuple[object, ...], int] = {}
    for calls, synthesis in resolved:
        local: dict[tuple[object, ...], int] = {}
        for call in calls:
            if call.target.server is not None:
                key = call.target.server.family
                local[key] = local.get(key, 0) + 1
        if synthesis is not None and synthesis.target.server is not None:
            local.setdefault(synthesis.target.server.family, 1)
        for key, n in local.items():
            slots[key] = max(slots.get(key, 0), n)
    threads = _thread_shares(pipeline, resolved, machine.cores)
    # one server per family: two model names for one file with the same settings share it, as the pool does
    servers: dict[tuple[object, ...], ServerSpec] = {}
    for calls, synthesis in resolved:
        for call in [*calls, *([synthesis] if synthesis else [])]:
            spec = call.target.server
            if spec is not None and spec.family not in servers:
                servers[spec.family] = dataclasses.replace(
                    spec, slots=max(spec.slots, slots[spec.family]),
                    threads=spec.threads if spec.threads is not None else threads[spec.family])
    stages = tuple(
        StagePlan(index, stage, tuple(_shared(c, servers) for c in calls),
                  _shared(synthesis, servers) if synthesis is not None else None,
                  _retrieval(stage, registry, machine) if stage.kind == "retrieve" else None)
        for index, (stage, (calls, synthesis)) in enumerate(zip(pipeline.stages, resolved, strict=True), start=1))
    blocked = None
    if mode == "base":
        try:
            (status or registry.pipeline_status(pipeline)).raise_if_blocked()
        except PipelineBlocked as exc:
            blocked = ErrorInfo.of(exc)
    return RunPlan(pipeline, mode, stages, machine, config_dir, blocked)


def _retrieval(stage: StageSpec, registry: Registry, machine: Machine) -> RetrievalPlan:
    """A retrieve stage's plan: the collection's embedding model (read from docs.db) becomes its query embedder."""
    from orchestrator.rag.store import DocStore  # the store (numpy, sqlite) only for pipelines that retrieve

    store = DocStore.beside(registry.config.sessions_dir)
    found = store.find(stage.collection or "")
    model = found["embed_model"] if found else None
    embedder = _target(registry, model, machine, None, None, role="embedding") if model else None
    return RetrievalPlan(store.path, stage.collection or "", stage.passages, stage.query_from, embedder)


def _thread_shares(pipeline: PipelineSpec, resolved: list[tuple[list[CallPlan], CallPlan | None]],
                   cores: int) -> dict[tuple[object, ...], int]:
    """Per server family, its share of the cores: servers that run at the same time split them.

    llama-server takes every core by default; three servers of a parallel stage then fight over them
    (2-10 tok/s each where one thread each gave about 35 on 2 cores). The concurrency of a server is the
    most distinct servers any stage runs at once with it (a sequential stage runs one at a time; the
    synthesis call runs alone). A model's own `threads:` in models.yaml is kept as it is.
    """
    share: dict[tuple[object, ...], int] = {}
    for stage, (calls, synthesis) in zip(pipeline.stages, resolved, strict=True):
        families = list(dict.fromkeys(c.target.server.family for c in calls if c.target.server is not None))
        together = 1 if stage.execution == "sequential" else max(1, len(families))
        for family in families:
            share[family] = min(share.get(family, cores), max(1, cores // together))
        if synthesis is not None and synthesis.target.server is not None:
            share.setdefault(synthesis.target.server.family, max(1, cores))
    return share


def remote_api_key(target: Target) -> str | None:
    return os.environ.get(target.api_key_env) if target.api_key_env else None
