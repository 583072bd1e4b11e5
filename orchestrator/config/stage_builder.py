"""Manual mode's stage builder as plain data: a list of stage dicts the UI edits, turned into a spec.

Kept free of Streamlit so the exact spec a user builds is unit-tested.
"""

from __future__ import annotations

import uuid
from typing import Any, get_args

from pydantic import ValidationError

from orchestrator.config.schema import AggregationType, PipelineSpec
from orchestrator.config.yamlio import field_path
from orchestrator.errors import ConfigError

AGGREGATION_KINDS: tuple[str, ...] = get_args(AggregationType)


def new_stage(index: int, models: list[str]) -> dict[str, Any]:
    """A fresh stage; `id` is stable across moves so UI widgets stay attached to their stage."""
    return {
        "id": uuid.uuid4().hex[:8],
        "name": f"stage{index}",
        "models": models[:1],
        "system_prompt": "",
        "prompt": "{{ question }}" if index == 1 else "{{ previous }}",
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
        "n_ctx": 2048,
        "n_gpu_layers": None,
        "aggregation": "concat",
        "synthesis_model": None,
        "template": "",
        "function": "",
    }


def move(stages: list[dict[str, Any]], index: int, offset: int) -> list[dict[str, Any]]:
    """A copy with stage `index` moved by `offset` (-1 up, +1 down); out-of-range moves are no-ops."""
    target = index + offset
    out = list(stages)
    if 0 <= index < len(out) and 0 <= target < len(out):
        out[index], out[target] = out[target], out[index]
    return out


def remove(stages: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [s for i, s in enumerate(stages) if i != index]


def stage_to_yaml_dict(stage: dict[str, Any]) -> dict[str, Any]:
    kind = stage.get("aggregation") or "concat"
    aggregation: dict[str, Any] = {"type": kind}
    if kind in ("synthesis", "majority_vote") and stage.get("synthesis_model"):
        aggregation["synthesis_model"] = stage["synthesis_model"]
    if kind == "custom_template":
        aggregation["template"] = stage.get("template") or ""
    if kind == "custom":
        aggregation["function"] = stage.get("function") or ""
    out = {k: stage.get(k) for k in ("name", "models", "system_prompt", "prompt", "temperature", "top_p",
                                      "max_tokens", "n_ctx", "n_gpu_layers")}
    out["aggregation"] = aggregation
    return {k: v for k, v in out.items() if v is not None and v != ""} | {"models": list(stage.get("models") or [])}


def build_spec(stages: list[dict[str, Any]], *, name: str = "manual") -> PipelineSpec:
    """Validate the builder's stages with the pipeline schema; errors name the stage and field."""
    data = {"name": name, "stages": [stage_to_yaml_dict(s) for s in stages]}
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(err.get("loc", ()))
        where = field_path(loc)
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int) and loc[1] < len(stages):
            where = f"stage {loc[1] + 1} ({stages[loc[1]].get('name')}): " + field_path(loc[2:])
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        raise ConfigError("manual pipeline", msg, field=where or None,
                          hint="Fix the highlighted stage setting.") from None
