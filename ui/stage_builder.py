"""Manual mode's pipeline builder as plain data: stage dicts the UI edits, turned into a spec and back.

Kept free of Streamlit so the exact spec a user builds is unit-tested. A stage dict mirrors a pipeline.yaml
stage: its model calls (`models`, the same model any number of times, each with its label, system prompt
and generation parameters), its own generation and load parameters, execution, on_error and the whole
aggregation (vote, synthesis, judge, template, custom). `from_spec` turns a loaded pipeline back into these
dicts, so what the YAML can say the builder can show and save again.
"""

from __future__ import annotations

import uuid
from typing import Any, get_args

from jinja2 import Environment, meta, nodes
from jinja2.exceptions import TemplateSyntaxError
from pydantic import ValidationError

from orchestrator.config.schema import (
    GENERATION_KEYS,
    AggregationSpec,
    AggregationType,
    LoadParams,
    PipelineSpec,
    StageSpec,
    VoteOptions,
)
from orchestrator.config.yamlio import field_path
from orchestrator.errors import ConfigError

AGGREGATION_KINDS: tuple[str, ...] = get_args(AggregationType)
STAGE_KINDS: tuple[str, ...] = get_args(StageSpec.model_fields["kind"].annotation)
QUERY_FROM: tuple[str, ...] = get_args(StageSpec.model_fields["query_from"].annotation)
EXECUTION_MODES: tuple[str, ...] = get_args(StageSpec.model_fields["execution"].annotation)
ON_ERROR: tuple[str, ...] = get_args(StageSpec.model_fields["on_error"].annotation)
VOTE_EXTRACT: tuple[str, ...] = get_args(VoteOptions.model_fields["extract"].annotation)
VOTE_TIE_BREAK: tuple[str, ...] = get_args(VoteOptions.model_fields["tie_break"].annotation)
JUDGE_MODES: tuple[str, ...] = get_args(AggregationSpec.model_fields["judge_mode"].annotation)
LOAD_KEYS: tuple[str, ...] = tuple(LoadParams.model_fields)
_AGGREGATION_DEFAULTS = AggregationSpec()


def _new_id() -> str:
    return uuid.uuid4().hex[:8]


def new_slot(model: str) -> dict[str, Any]:
    """One model call: blank label (the schema names it), system prompt and parameters inherit the stage's."""
    return {"id": _new_id(), "model": model, "label": "", "system_prompt": "", **dict.fromkeys(GENERATION_KEYS)}


def new_vote() -> dict[str, Any]:
    return VoteOptions().model_dump()


def new_stage(index: int, models: list[str]) -> dict[str, Any]:
    """A fresh stage; `id` is stable across moves so UI widgets stay attached to their stage."""
    return {
        "id": _new_id(),
        "name": f"stage{index}",
        "kind": "generate",
        "models": [new_slot(m) for m in models[:1]],
        "system_prompt": "",
        "prompt": "{{ question }}" if index == 1 else "{{ previous }}",
        **dict.fromkeys(GENERATION_KEYS),
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
        "n_ctx": 2048,
        "n_gpu_layers": None,
        "execution": "auto",
        "on_error": "continue",
        "aggregation": "concat",
        "separator": _AGGREGATION_DEFAULTS.separator,
        "label_format": _AGGREGATION_DEFAULTS.label_format,
        "synthesis_model": None,
        "synthesis_prompt": "",
        "template": "",
        "function": "",
        "vote": new_vote(),
        "judge_model": None,
        "judge_prompt": "",
        "judge_mode": "score",
        "collection": None,  # kind retrieve: a `chorus docs` collection; `top_k` is then the passage count
        "query_from": "question",
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


def add_slot(stage: dict[str, Any], model: str) -> None:
    stage.setdefault("models", []).append(new_slot(model))


def remove_slot(stage: dict[str, Any], index: int) -> None:
    stage["models"] = [s for i, s in enumerate(stage.get("models") or []) if i != index]


# ---------------------------------------------------------------- dicts → spec

def _set(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The keys of `values` that are set (None and "" mean "inherit")."""
    return {k: values[k] for k in keys if values.get(k) is not None and values.get(k) != ""}


def slot_to_yaml_dict(slot: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": slot.get("model") or ""}
    out |= _set(slot, ("label", "system_prompt"))
    return out | _set(slot, GENERATION_KEYS)


def aggregation_to_yaml_dict(stage: dict[str, Any]) -> dict[str, Any]:
    """The stage's aggregation with only what its kind uses, so a model chosen for an earlier kind is not
    kept (a leftover synthesis model would still be planned and loaded)."""
    kind = stage.get("aggregation") or "concat"
    out: dict[str, Any] = {"type": kind}
    if kind == "concat":
        for key in ("separator", "label_format"):
            if stage.get(key) is not None and stage[key] != getattr(_AGGREGATION_DEFAULTS, key):
                out[key] = stage[key]
    if kind in ("synthesis", "majority_vote") and stage.get("synthesis_model"):
        out["synthesis_model"] = stage["synthesis_model"]
    if kind == "synthesis" and stage.get("synthesis_prompt"):
        out["synthesis_prompt"] = stage["synthesis_prompt"]
    if kind == "majority_vote":
        vote = {**new_vote(), **(stage.get("vote") or {})}
        if vote.get("extract") != "regex" or not vote.get("pattern"):
            vote.pop("pattern", None)
        out["vote"] = vote
        if vote.get("tie_break") == "synthesis" and stage.get("synthesis_prompt"):
            out["synthesis_prompt"] = stage["synthesis_prompt"]
    if kind == "custom_template":
        out["template"] = stage.get("template") or ""
    if kind == "custom":
        out["function"] = stage.get("function") or ""
    if kind == "judge":
        out |= _set(stage, ("judge_model", "judge_prompt"))
        out["judge_mode"] = stage.get("judge_mode") or "score"
    return out


def stage_to_yaml_dict(stage: dict[str, Any]) -> dict[str, Any]:
    if stage.get("kind") == "retrieve":  # no model: the models, parameters and aggregation left on it are not kept
        return {"name": stage.get("name"), "kind": "retrieve", "collection": stage.get("collection"),
                "top_k": stage.get("top_k"), "query_from": stage.get("query_from") or "question"}
    out: dict[str, Any] = {"name": stage.get("name"), "models": [slot_to_yaml_dict(s) for s in stage.get("models")
                                                                  or [] if isinstance(s, dict)]}
    out |= _set(stage, ("system_prompt", "prompt"))
    out |= _set(stage, GENERATION_KEYS) | _set(stage, LOAD_KEYS)
    for key, default in (("execution", "auto"), ("on_error", "continue")):
        if stage.get(key) and stage[key] != default:
            out[key] = stage[key]
    out["aggregation"] = aggregation_to_yaml_dict(stage)
    return out


def pipeline_to_yaml_dict(stages: list[dict[str, Any]], *, name: str = "manual", description: str = "",
                          defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name}
    if description:
        data["description"] = description
    chosen = _set(defaults or {}, GENERATION_KEYS + LOAD_KEYS)
    if (defaults or {}).get("stream_reasoning") is False:  # chorus api's reasoning stream, off for this pipeline
        chosen["stream_reasoning"] = False
    if chosen:
        data["defaults"] = chosen
    data["stages"] = [stage_to_yaml_dict(s) for s in stages]
    return data


def build_spec(stages: list[dict[str, Any]], *, name: str = "manual", description: str = "",
               defaults: dict[str, Any] | None = None) -> PipelineSpec:
    """Validate the builder's stages with the pipeline schema; errors name the stage, call and field."""
    data = pipeline_to_yaml_dict(stages, name=name, description=description, defaults=defaults)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(err.get("loc", ()))
        where = field_path(loc)
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int) and loc[1] < len(stages):
            rest = loc[2:]
            if len(rest) >= 2 and rest[0] == "models" and isinstance(rest[1], int):
                rest = (f"model call {rest[1] + 1}", *rest[2:])
            where = f"stage {loc[1] + 1} ({stages[loc[1]].get('name')}): " + field_path(rest)
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        raise ConfigError("manual pipeline", msg, field=where or None,
                          hint="Fix the highlighted stage setting.") from None


# ---------------------------------------------------------------- warnings (the spec is valid, but)

def _prompt_names(prompt: str) -> tuple[set[str], set[str]]:
    """(the variables a prompt template reads, the stage names it reads as stages.NAME or stages['NAME'])."""
    try:
        tree = _PARSER.parse(prompt)
    except TemplateSyntaxError:  # the schema refuses it; nothing to add here
        return set(), set()
    stages: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr | nodes.Getitem) and isinstance(node.node, nodes.Name) \
                and node.node.name == "stages":
            name = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(name, str):
                stages.add(name)
    return meta.find_undeclared_variables(tree), stages


_PARSER = Environment()


def warnings(spec: PipelineSpec) -> list[str]:
    """What the builder says about a pipeline it still lets run: a first stage whose prompt reads `previous`
    (empty there: nothing ran before it) without `question`, as after moving a later stage to the top; a
    prompt or aggregation template reading `stages.NAME` of a stage that does not run before it (the run would
    fail there)."""
    out: list[str] = []
    for i, stage in enumerate(spec.stages):
        if stage.kind != "generate":
            continue
        variables, named = _prompt_names(stage.prompt)
        if i == 0 and "previous" in variables and "question" not in variables:
            out.append(f"Stage '{stage.name}' runs first, but its prompt uses {{{{ previous }}}}, which is empty "
                       "there (no stage runs before it), so it renders as nothing. Use {{ question }} in the "
                       "first stage.")
        earlier = [s.name for s in spec.stages[:i]]
        agg = stage.aggregation
        texts = [("prompt", named), *((what, _prompt_names(text)[1]) for what, text in (
            ("aggregation template", agg.template), ("synthesis prompt", agg.synthesis_prompt),
            ("judge prompt", agg.judge_prompt)) if text)]
        before = f"stages before it: {', '.join(earlier)}" if earlier else "it runs first"
        for what, names in texts:
            for name in sorted(names - set(earlier)):
                out.append(f"The {what} of stage '{stage.name}' uses stages.{name}, but no stage named '{name}' "
                           f"runs before it ({before}).")
    return out


# ---------------------------------------------------------------- spec → dicts (loading a saved pipeline)

def slot_from_spec(slot: Any) -> dict[str, Any]:
    return {**new_slot(slot.model), "label": slot.label or "", "system_prompt": slot.system_prompt or "",
            **{k: getattr(slot, k) for k in GENERATION_KEYS}}


def stage_from_spec(stage: StageSpec) -> dict[str, Any]:
    agg = stage.aggregation
    out = new_stage(1, [])
    out.update({
        "name": stage.name,
        "kind": stage.kind,
        "collection": stage.collection,
        "query_from": stage.query_from,
        "models": [slot_from_spec(s) for s in stage.models],
        "system_prompt": stage.system_prompt,
        "prompt": stage.prompt,
        **{k: getattr(stage, k) for k in GENERATION_KEYS + LOAD_KEYS},
        "execution": stage.execution,
        "on_error": stage.on_error,
        "aggregation": agg.type,
        "separator": agg.separator,
        "label_format": agg.label_format,
        "synthesis_model": agg.synthesis_model,
        "synthesis_prompt": agg.synthesis_prompt or "",
        "template": agg.template or "",
        "function": agg.function or "",
        "vote": agg.vote.model_dump(),
        "judge_model": agg.judge_model,
        "judge_prompt": agg.judge_prompt or "",
        "judge_mode": agg.judge_mode,
    })
    return out


def from_spec(spec: PipelineSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The builder's stages and pipeline defaults for a loaded pipeline (build_spec gives the spec back)."""
    defaults = {k: getattr(spec.defaults, k) for k in GENERATION_KEYS + LOAD_KEYS}
    defaults["stream_reasoning"] = spec.defaults.stream_reasoning
    return [stage_from_spec(s) for s in spec.stages], defaults


__all__ = ["AGGREGATION_KINDS", "EXECUTION_MODES", "GENERATION_KEYS", "JUDGE_MODES", "LOAD_KEYS", "ON_ERROR",
           "QUERY_FROM", "STAGE_KINDS", "VOTE_EXTRACT", "VOTE_TIE_BREAK", "add_slot", "build_spec", "from_spec",
           "move", "new_slot", "new_stage", "pipeline_to_yaml_dict", "remove", "remove_slot", "stage_from_spec",
           "stage_to_yaml_dict", "warnings"]
