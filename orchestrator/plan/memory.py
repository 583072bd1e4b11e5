"""Memory planning over the resolved run plan: does each stage's set of servers fit together, else in which waves.

It reads the `RunPlan`'s server specs as they are (slots included) and never re-resolves a parameter.
One stage = one group for the memory guard: every distinct resolved server spec of the stage is one
server (several calls to it share its slots). The synthesis call runs after the stage's calls, so it is
planned as its own wave. Remote models need no local memory; unavailable ones are reported, not planned.
Running servers of the pool that the stage does not use count as evictable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.admission import Availability, FitPlan, PlannedSpec
from launcher.memory import BUDGET
from launcher.server import ServerSpec
from launcher.units import fmt_bytes
from orchestrator.plan.resolve import CallPlan, RunPlan, StagePlan

if TYPE_CHECKING:
    from orchestrator.runtime import Runtime


@dataclass
class ServerNeed:
    """One server of a stage (or a remote/unavailable model): the labels it serves and what it needs."""

    name: str                      # the model name from models.yaml
    labels: list[str]
    ram_bytes: int = 0
    vram_bytes: int = 0
    need: dict[str, int] = field(default_factory=dict)  # per device: 'ram', 'gpu0', 'budget'...
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    slots: int = 0
    remote: bool = False
    source: str = "estimate"       # estimate | calibrated | remote | unavailable
    estimate_error_pct: dict[str, float] = field(default_factory=dict)  # of the formula, when calibrated
    reused: bool = False           # a running server already serves it
    fits_alone: bool = True
    reason: str | None = None      # why it is unavailable
    # per device, the need in parts (PARTS: weights, kv, compute, other) summing to `need`; a calibrated
    # (measured) total is split in the formula's proportions. The memory chart stacks these.
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    mapped_bytes: int = 0          # of the RAM weights, the file's mapped pages: shared by servers of one file


PARTS = ("weights", "kv", "compute", "other")
_PART_OF = {"weights": "weights", "weights_repacked": "weights", "kv": "kv", "checkpoints": "kv",
            "compute": "compute", "output": "compute"}  # anything else (process, CUDA context): other


def need_parts(kinds: dict[str, int], total: int | None = None, like: dict[str, int] | None = None, *,
               mapped: int = 0, like_mapped: int = 0) -> dict[str, int]:
    """One device's estimate kinds grouped into PARTS; with `total` (a measured figure without kinds), that
    total split in the proportions of `like` (the formula's kinds), the rounding left in 'other'. The
    measured `mapped` file pages are weights as they are; the rest is split as the formula's parts without
    its own mapped weights (`like_mapped`)."""
    parts = dict.fromkeys(PARTS, 0)
    for kind, n in kinds.items():
        parts[_PART_OF.get(kind, "other")] += n
    if total is None:
        return {k: n for k, n in parts.items() if n}
    mapped = min(max(0, mapped), total)
    shares = need_parts(like or {})
    shares["weights"] = max(0, shares.get("weights", 0) - like_mapped)
    whole, rest = sum(shares.values()), total - mapped
    split = {k: rest * n // whole for k, n in shares.items()} if whole else {}
    split["other"] = split.get("other", 0) + rest - sum(split.values())
    split["weights"] = split.get("weights", 0) + mapped
    return {k: split[k] for k in PARTS if split.get(k)}


def with_budget(need: dict[str, int], have: dict[str, int]) -> dict[str, int]:
    """A server's need with the budget device added when one is set: its whole RAM and VRAM count there."""
    if BUDGET not in have or BUDGET in need:
        return need
    return {**need, BUDGET: sum(n for d, n in need.items() if d == "ram" or d.startswith("gpu"))}


@dataclass
class StageMemory:
    stage: str
    models: list[ServerNeed]
    fits_together: bool
    waves: list[list[str]]         # labels of the stage's calls, one wave after the other
    available: Availability
    synthesis: ServerNeed | None = None  # runs after the waves, as its own wave
    evict: list[str] = field(default_factory=list)  # running servers stopped to make room
    unfit: list[str] = field(default_factory=list)  # labels that do not fit even alone
    unavailable: list[str] = field(default_factory=list)  # labels of models the registry could not register
    need: dict[str, int] = field(default_factory=dict)  # of the stage's servers together, per device
    have_at_most: dict[str, int] = field(default_factory=dict)  # usable with every evictable server stopped

    @property
    def unfit_servers(self) -> list[ServerNeed]:
        out = [m for m in self.models if not m.fits_alone and m.source != "unavailable"]
        if self.synthesis is not None and not self.synthesis.fits_alone and self.synthesis.source != "unavailable":
            out.append(self.synthesis)
        return out

    @property
    def reason(self) -> str:
        unfit = self.unfit_servers
        if unfit:
            return "; ".join(f"{', '.join(m.labels)} does not fit even alone ({self._short(m.need)})" for m in unfit)
        if self.fits_together:
            return ""
        have = self.available.have()
        short = [d for d, n in self.need.items() if n > have.get(d, 0)] or ["ram"]
        parts = ", ".join(f"{d}: {fmt_bytes(self.need.get(d, 0))} needed, {fmt_bytes(have.get(d, 0))} usable"
                          for d in short)
        return f"{parts}; running in {len(self.waves)} waves"

    def _short(self, need: dict[str, int]) -> str:
        """'ram: needs 330 MiB, 250 MiB usable with every idle server stopped' for the short devices."""
        have = self.have_at_most or self.available.have()
        need = with_budget(need, have)
        short = [d for d, n in need.items() if n > have.get(d, 0)] or list(need)[:1]
        return ", ".join(f"{d}: needs {fmt_bytes(need.get(d, 0))}, {fmt_bytes(have.get(d, 0))} usable with every "
                         "idle server stopped" for d in short)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.stage, "models": [asdict(m) for m in self.models], "fits_together": self.fits_together,
                "waves": self.waves, "synthesis": asdict(self.synthesis) if self.synthesis else None,
                "evict": self.evict, "unfit": self.unfit, "unavailable": self.unavailable, "need": self.need,
                "reason": self.reason, "available": self.available.to_dict()}


@dataclass
class MemoryPlan:
    pipeline: str
    stages: list[StageMemory]
    available: Availability
    gpu_note: str | None = None

    @property
    def fits(self) -> bool:
        """Every model fits at least alone (stages may still run in waves). A model the registry could not
        register is missing, not too big: it does not count here (the run plan's `blocked` says so)."""
        return not any(s.unfit or s.unfit_servers for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "fits": self.fits, "available": self.available.to_dict(),
                "gpu_note": self.gpu_note, "stages": [s.to_dict() for s in self.stages]}


def _group(calls: list[CallPlan]) -> tuple[list[ServerNeed], list[ServerSpec], list[int]]:
    """One ServerNeed per distinct target (local: per resolved server spec); the local specs and, per spec,
    the index of its ServerNeed."""
    needs: list[ServerNeed] = []
    specs: list[ServerSpec] = []
    spec_need: list[int] = []
    by_key: dict[object, int] = {}
    for call in calls:
        t = call.target
        key: object = t.server if t.server is not None else (t.kind, t.model)
        if key in by_key:
            needs[by_key[key]].labels.append(call.label)
            continue
        by_key[key] = len(needs)
        if t.kind == "unavailable":
            needs.append(ServerNeed(t.model, [call.label], source="unavailable", fits_alone=False, reason=t.reason))
        elif t.kind == "remote" or t.server is None:
            needs.append(ServerNeed(t.model, [call.label], remote=True, source="remote"))
        else:
            s = t.server
            needs.append(ServerNeed(t.model, [call.label], n_ctx=s.n_ctx, n_gpu_layers=s.n_gpu_layers, slots=s.slots))
            specs.append(s)
            spec_need.append(len(needs) - 1)
    return needs, specs, spec_need


def _fill(need: ServerNeed, planned: PlannedSpec, fits_alone: bool) -> None:
    est = planned.estimate
    per_device = est.need()
    need.need = per_device
    need.ram_bytes = per_device.get("ram", 0)
    need.vram_bytes = sum(n for d, n in per_device.items() if d.startswith("gpu"))
    need.source = est.source
    need.reused = planned.reused
    need.fits_alone = fits_alone
    need.mapped_bytes = est.mapped_bytes
    formula = est.estimate if est.source == "calibrated" else None
    need.breakdown = {d: need_parts(kinds) if formula is None else need_parts(
        {}, per_device[d], formula.breakdown.get(d), mapped=est.mapped_bytes if d == "ram" else 0,
        like_mapped=formula.mapped_bytes if d == "ram" else 0) for d, kinds in est.breakdown.items()}
    if est.source == "calibrated" and est.estimate is not None:
        need.estimate_error_pct = {d: round((est.estimate.need().get(d, 0) - n) / n * 100, 1)
                                   for d, n in per_device.items() if n}


def plan_stage_memory(runtime: Runtime, stage: StagePlan) -> StageMemory:
    """Whether the stage's servers fit in memory together now, else the waves they run in."""
    needs, specs, spec_need = _group(list(stage.calls))
    syn_needs, syn_specs, _ = _group([stage.synthesis]) if stage.synthesis is not None else ([], [], [])
    groups = [specs] + ([syn_specs] if syn_specs else [])
    fit: FitPlan = runtime.memory_guard.plan(groups, runtime.running_servers(), evictable=runtime.is_idle)
    group = fit.groups[0]
    for i, planned in enumerate(group.specs):
        _fill(needs[spec_need[i]], planned, i not in group.unfit)

    # waves of labels; remote models ride in the first wave, unavailable ones are left out
    waves = [[label for i in wave for label in needs[spec_need[i]].labels] for wave in group.waves]
    extra = [label for m in needs if m.remote for label in m.labels]
    if extra:
        waves = [waves[0] + extra, *waves[1:]] if waves else [extra]
    unfit = [label for i in group.unfit for label in needs[spec_need[i]].labels]
    unavailable = [label for m in needs if m.source == "unavailable" for label in m.labels]

    synthesis = syn_needs[0] if syn_needs else None
    if synthesis is not None and syn_specs:
        sg = fit.groups[1]
        _fill(synthesis, sg.specs[0], not sg.unfit)
    have = fit.available.have()
    have_at_most = {d: n + fit.evictable.get(d, 0) for d, n in have.items()}
    return StageMemory(stage.name, needs, group.fits_together, waves, fit.available, synthesis,
                       [s.model for s in group.evict], unfit, unavailable, group.need, have_at_most)


def plan_memory(runtime: Runtime, plan: RunPlan) -> MemoryPlan:
    """`plan_stage_memory` for every stage, in order."""
    stages = [plan_stage_memory(runtime, stage) for stage in plan.stages]
    available = stages[0].available if stages else runtime.memory_guard.available(runtime.running_servers())
    return MemoryPlan(plan.pipeline.name, stages, available, runtime.memory_guard.gpu_note)


# ---------------------------------------------------------------- RPC workers and remote machines


@dataclass
class WorkerNeed:
    """One RPC worker of a model's server: its share of the layers and what it reports free."""

    worker: str
    need_bytes: int
    free_bytes: int | None         # None: the worker did not answer
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.free_bytes is not None and self.need_bytes <= self.free_bytes


def rpc_needs(spec: ServerSpec, *, timeout_s: float = 2.0) -> tuple[int, list[WorkerNeed]]:
    """(bytes this machine needs, one WorkerNeed per worker) for a server that splits its layers over
    `spec.rpc`, the split as llama.cpp makes it: in proportion to each worker's reported free memory (a
    worker that does not answer is weighted like the best one, to show what it would get)."""
    from launcher.estimate import estimate_rpc_split
    from launcher.gguf import read_gguf
    from launcher.rpc import RpcError, query_memory

    free: list[int | None] = []
    errors: list[str | None] = []
    for worker in spec.rpc:
        try:
            free.append(query_memory(worker, timeout_s=timeout_s).free_bytes)
            errors.append(None)
        except RpcError as exc:
            free.append(None)
            errors.append(exc.detail)
    fallback = max((f for f in free if f is not None), default=1)
    split = estimate_rpc_split(read_gguf(spec.model_path), spec, [f if f is not None else fallback for f in free])
    workers = [WorkerNeed(w, sum(split[w].values()), f, e) for w, f, e in zip(spec.rpc, free, errors, strict=True)]
    return sum(split["local"].values()), workers


def check_rpc_workers(spec: ServerSpec) -> list[WorkerNeed]:
    """Before a server with RPC workers starts: every worker answers and has room for its share, else the
    typed error (RpcError naming the worker; RpcWorkerShort with need vs have per worker)."""
    from launcher.rpc import RpcError, RpcWorkerShort

    _, workers = rpc_needs(spec)
    for w in workers:
        if w.free_bytes is None:
            raise RpcError(w.worker, f"no answer ({w.error}) for model '{spec.model}'")
    short = [w for w in workers if not w.fits]
    if short:
        raise RpcWorkerShort(spec.model, {w.worker: w.need_bytes for w in workers},
                             {w.worker: w.free_bytes or 0 for w in workers})
    return workers


@dataclass
class MachineLoad:
    """One row of the per-machine plan view: this machine, an RPC worker, or a remote endpoint."""

    machine: str
    kind: str                      # local | rpc | remote
    models: list[str]
    need_bytes: int | None = None  # None: not known here (a remote server's own business)
    have_bytes: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_view(plan: RunPlan, memory: MemoryPlan | None = None, *,
                 rpc: dict[str, tuple[int, list[WorkerNeed]]] | None = None) -> list[MachineLoad]:
    """Per machine, what the run puts there and how much memory it needs.

    This machine: the most any one stage's servers need together (the memory plan's stage need, RAM and
    GPUs summed), with a server that has RPC workers counted by its local part only. Each RPC worker: the
    sum of its shares of every model placed on it. Each remote URL: the models it serves (its memory is its
    own). `rpc` is `rpc_needs` per model (computed when not given).
    """
    rpc = dict(rpc or {})
    rpc_specs = {s.model: s for s in plan.servers if s.rpc}
    for name, spec in rpc_specs.items():
        if name not in rpc:
            rpc[name] = rpc_needs(spec)
    local_models = [s.model for s in plan.servers]
    local = MachineLoad("this machine", "local", local_models)
    if memory is not None:
        peaks = []
        for st in memory.stages:
            parts = [*st.models, *([st.synthesis] if st.synthesis else [])]
            total = 0
            for m in parts:
                if m.remote or m.source == "unavailable":
                    continue
                whole = sum(m.need.values())
                total += rpc[m.name][0] if m.name in rpc else whole
            peaks.append(total)
        local.need_bytes = max(peaks, default=0)
        have = memory.available.have()
        local.have_bytes = sum(n for d, n in have.items() if d == "ram" or d.startswith("gpu"))
    rows = [local]
    workers: dict[str, MachineLoad] = {}
    for name, (_, needs) in rpc.items():
        for w in needs:
            row = workers.setdefault(w.worker, MachineLoad(f"rpc {w.worker}", "rpc", [], 0, w.free_bytes))
            row.models.append(name)
            row.need_bytes = (row.need_bytes or 0) + w.need_bytes
            if w.free_bytes is None:
                row.note = f"does not answer: {w.error}"
            elif (row.need_bytes or 0) > w.free_bytes:
                row.note = "too small: needs more than it reports free"
    rows.extend(workers.values())
    remotes: dict[str, MachineLoad] = {}
    for stage in plan.stages:
        for call in stage.all_calls():
            t = call.target
            if t.kind != "remote":
                continue
            for url in t.urls or ((t.url,) if t.url else ()):
                row = remotes.setdefault(url, MachineLoad(url, "remote", [], note="memory: the remote server's own"))
                if t.model not in row.models:
                    row.models.append(t.model)
    rows.extend(remotes.values())
    return rows
