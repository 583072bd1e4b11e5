"""Memory planning for pipelines: does each stage's set of models fit together, else in which waves.

One stage = one group for `launcher.admission.MemoryGuard.plan`: every local model of the stage is one
server (a model called N times in a stage is one server with N slots; the slot count is the one the
pipeline runner asks for, see `orchestrator.plan.resolve.pipeline_slot_counts`). The synthesis model runs
after the stage's models, so it is planned as its own wave. Remote models (`url:`) need no local memory.
Running servers of the pool that the stage does not use count as evictable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.admission import Availability, FitPlan, PlannedSpec, fmt_bytes
from launcher.server import ModelServer, ServerSpec
from orchestrator.config.schema import PipelineSpec, StageSpec
from orchestrator.plan.resolve import SlotParams, pipeline_slot_counts, slot_params, synthesis_params

if TYPE_CHECKING:
    from orchestrator.runtime import Runtime


@dataclass
class ModelPlan:
    """One server of a stage (or a remote model): which slot labels it serves and what it needs."""

    name: str                      # the model name from models.yaml
    labels: list[str]
    ram_bytes: int = 0
    vram_bytes: int = 0
    need: dict[str, int] = field(default_factory=dict)  # per device: 'ram', 'gpu0'...
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    slots: int = 0
    remote: bool = False
    source: str = "estimate"       # estimate | calibrated | remote | unavailable
    estimate_error_pct: dict[str, float] = field(default_factory=dict)  # of the formula, when calibrated
    reused: bool = False           # a running server already serves it
    fits_alone: bool = True
    reason: str | None = None      # why it is unavailable


@dataclass
class StagePlan:
    stage: str
    models: list[ModelPlan]
    fits_together: bool
    waves: list[list[str]]         # slot labels of the stage's models, one wave after the other
    available: Availability
    synthesis: ModelPlan | None = None  # runs after the waves, as its own wave
    evict: list[str] = field(default_factory=list)  # running servers stopped to make room
    unfit: list[str] = field(default_factory=list)  # labels that do not fit even alone
    unavailable: list[str] = field(default_factory=list)  # labels of models the registry could not register
    need: dict[str, int] = field(default_factory=dict)  # of the stage's models together, per device

    @property
    def reason(self) -> str:
        if self.unfit:
            return f"{', '.join(self.unfit)} do not fit in memory even alone"
        if self.fits_together:
            return ""
        have = self.available.have()
        short = [d for d, n in self.need.items() if n > have.get(d, 0)] or ["ram"]
        parts = ", ".join(f"{d}: {fmt_bytes(self.need.get(d, 0))} needed, {fmt_bytes(have.get(d, 0))} usable"
                          for d in short)
        return f"{parts}; running in {len(self.waves)} waves"

    @property
    def all_waves(self) -> list[list[str]]:
        """The stage's waves, then the synthesis model's."""
        return self.waves + ([list(self.synthesis.labels)] if self.synthesis else [])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.stage, "models": [asdict(m) for m in self.models], "fits_together": self.fits_together,
                "waves": self.waves, "synthesis": asdict(self.synthesis) if self.synthesis else None,
                "evict": self.evict, "unfit": self.unfit, "unavailable": self.unavailable, "need": self.need,
                "reason": self.reason,
                "available": self.available.to_dict()}


@dataclass
class PipelinePlan:
    pipeline: str
    stages: list[StagePlan]
    available: Availability
    gpu_note: str | None = None

    @property
    def fits(self) -> bool:
        """Every model fits at least alone (stages may still run in waves)."""
        return not any(s.unfit or (s.synthesis and not s.synthesis.fits_alone) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "fits": self.fits, "available": self.available.to_dict(),
                "gpu_note": self.gpu_note, "stages": [s.to_dict() for s in self.stages]}


def _servers(runtime: Runtime) -> list[ModelServer]:
    return runtime.pool.servers() if "pool" in runtime.__dict__ else []


def _model_plans(runtime: Runtime, params: list[SlotParams], slot_counts: dict) -> tuple[
        list[ModelPlan], list[ServerSpec], list[int]]:
    """One ModelPlan per server (labels grouped by model and load params); the local specs and, per spec,
    the index of its ModelPlan."""
    plans: list[ModelPlan] = []
    specs: list[ServerSpec] = []
    spec_plan: list[int] = []
    by_key: dict[tuple, int] = {}
    for p in params:
        key = (p.model, p.n_ctx, p.n_gpu_layers)
        if key in by_key:
            plans[by_key[key]].labels.append(p.label)
            continue
        by_key[key] = len(plans)
        rec = runtime.registry.records.get(p.model)
        if rec is None or not rec.available:
            reason = "not defined in models.yaml" if rec is None else (rec.reason or rec.status)
            plans.append(ModelPlan(p.model, [p.label], source="unavailable", fits_alone=False, reason=reason))
            continue
        if rec.is_remote:
            plans.append(ModelPlan(p.model, [p.label], remote=True, source="remote"))
            continue
        n_ctx, ngl = p.load_params(rec.entry)
        spec = runtime.server_spec(rec, n_ctx=n_ctx, n_gpu_layers=ngl, slots=slot_counts.get(key, 1))
        plans.append(ModelPlan(p.model, [p.label], n_ctx=spec.n_ctx, n_gpu_layers=spec.n_gpu_layers,
                               slots=spec.slots))
        specs.append(spec)
        spec_plan.append(len(plans) - 1)
    return plans, specs, spec_plan


def _fill(plan: ModelPlan, planned: PlannedSpec, fits_alone: bool) -> None:
    est = planned.estimate
    need = est.need()
    plan.need = need
    plan.ram_bytes = need.get("ram", 0)
    plan.vram_bytes = sum(n for d, n in need.items() if d != "ram")
    plan.source = est.source
    plan.reused = planned.reused
    plan.fits_alone = fits_alone
    if est.source == "calibrated" and est.estimate is not None:
        plan.estimate_error_pct = {d: round((est.estimate.need().get(d, 0) - n) / n * 100, 1)
                                   for d, n in need.items() if n}


def plan_stage(runtime: Runtime, stage: StageSpec, pipeline: PipelineSpec, *,
               slot_counts: dict | None = None) -> StagePlan:
    """Whether the stage's models fit in memory together, else the waves they run in."""
    counts = slot_counts if slot_counts is not None else pipeline_slot_counts(pipeline)
    params = slot_params(pipeline, stage)
    plans, specs, spec_plan = _model_plans(runtime, params, counts)
    syn_params = synthesis_params(pipeline, stage)
    syn_plans, syn_specs, _ = _model_plans(runtime, [syn_params], counts) if syn_params else ([], [], [])
    groups = [specs] + ([syn_specs] if syn_specs else [])
    fit: FitPlan = runtime.memory_guard.plan(groups, _servers(runtime))
    group = fit.groups[0]
    for i, planned in enumerate(group.specs):
        plan = plans[spec_plan[i]]
        _fill(plan, planned, i not in group.unfit)

    # waves of slot labels; remote models ride in the first wave, unavailable ones are left out
    waves = [[label for i in wave for label in plans[spec_plan[i]].labels] for wave in group.waves]
    extra = [label for m in plans if m.remote for label in m.labels]
    if extra:
        waves = [waves[0] + extra, *waves[1:]] if waves else [extra]
    unfit = [label for i in group.unfit for label in plans[spec_plan[i]].labels]
    unavailable = [label for m in plans if m.source == "unavailable" for label in m.labels]

    synthesis = syn_plans[0] if syn_plans else None
    if synthesis is not None and syn_specs:
        sg = fit.groups[1]
        _fill(synthesis, sg.specs[0], not sg.unfit)
    return StagePlan(stage.name, plans, group.fits_together, waves, fit.available, synthesis,
                     [s.model for s in group.evict], unfit, unavailable, group.need)


def plan_pipeline(runtime: Runtime, pipeline: PipelineSpec) -> PipelinePlan:
    """`plan_stage` for every stage, in order."""
    counts = pipeline_slot_counts(pipeline)
    stages = [plan_stage(runtime, stage, pipeline, slot_counts=counts) for stage in pipeline.stages]
    available = stages[0].available if stages else runtime.memory_guard.available(_servers(runtime))
    return PipelinePlan(pipeline.name, stages, available, runtime.memory_guard.gpu_note)
