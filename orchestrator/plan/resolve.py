"""Effective parameters of one model call: slot overrides, then stage, then pipeline defaults, then model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.config.schema import ModelEntry, PipelineSpec, StageSpec

GENERATION_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop")


@dataclass(frozen=True)
class SlotParams:
    label: str
    model: str
    system_prompt: str
    generation: dict[str, Any] = field(default_factory=dict)
    n_ctx: int | None = None         # None: the model's default_n_ctx
    n_gpu_layers: int | None = None  # None: the model's default_gpu_layers

    def load_params(self, entry: ModelEntry | None) -> tuple[int | None, int | None]:
        if entry is None:
            return self.n_ctx, self.n_gpu_layers
        return (self.n_ctx or entry.default_n_ctx,
                entry.default_gpu_layers if self.n_gpu_layers is None else self.n_gpu_layers)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def stage_load_params(pipeline: PipelineSpec, stage: StageSpec) -> tuple[int | None, int | None]:
    return (_first(stage.n_ctx, pipeline.defaults.n_ctx), _first(stage.n_gpu_layers, pipeline.defaults.n_gpu_layers))


def stage_generation(pipeline: PipelineSpec, stage: StageSpec) -> dict[str, Any]:
    return {k: _first(getattr(stage, k), getattr(pipeline.defaults, k)) for k in GENERATION_KEYS
            if _first(getattr(stage, k), getattr(pipeline.defaults, k)) is not None}


def slot_params(pipeline: PipelineSpec, stage: StageSpec) -> list[SlotParams]:
    n_ctx, ngl = stage_load_params(pipeline, stage)
    base = stage_generation(pipeline, stage)
    out = []
    for slot in stage.models:
        gen = dict(base)
        gen.update({k: getattr(slot, k) for k in GENERATION_KEYS if getattr(slot, k) is not None})
        out.append(SlotParams(label=slot.label or slot.model, model=slot.model,
                              system_prompt=slot.system_prompt if slot.system_prompt is not None
                              else stage.system_prompt,
                              generation=gen, n_ctx=n_ctx, n_gpu_layers=ngl))
    return out


def synthesis_params(pipeline: PipelineSpec, stage: StageSpec) -> SlotParams | None:
    model = stage.aggregation.synthesis_model
    if not model:
        return None
    n_ctx, ngl = stage_load_params(pipeline, stage)
    return SlotParams(label=f"{model}-synthesis", model=model, system_prompt="",
                      generation=stage_generation(pipeline, stage), n_ctx=n_ctx, n_gpu_layers=ngl)


def pipeline_slot_counts(pipeline: PipelineSpec) -> dict[tuple[str, int | None, int | None], int]:
    """Per (model, n_ctx, n_gpu_layers): the most calls any one stage makes at once.

    Every stage then asks for that many slots, so one warm server serves the whole run.
    """
    counts: dict[tuple[str, int | None, int | None], int] = {}
    for stage in pipeline.stages:
        local: dict[tuple[str, int | None, int | None], int] = {}
        for p in slot_params(pipeline, stage):
            key = (p.model, p.n_ctx, p.n_gpu_layers)
            local[key] = local.get(key, 0) + 1
        syn = synthesis_params(pipeline, stage)
        if syn is not None:
            key = (syn.model, syn.n_ctx, syn.n_gpu_layers)
            local.setdefault(key, 1)
        for key, n in local.items():
            counts[key] = max(counts.get(key, 0), n)
    return counts
