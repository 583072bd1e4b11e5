"""`--set stage.param=value` overrides on a pipeline, validated by the same schema as the file.

Text on a command line chooses among what the operator allowed: with `config_dir`, a custom aggregation
function that is not in the config's aggregators/ or app.yaml's aggregators.allowed is refused here,
before anything is imported or any model starts.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config import aggregators
from orchestrator.config.schema import ModelSlot, PipelineDefaults, PipelineSpec, StageSpec
from orchestrator.config.yamlio import EXPANSION_HINT, ExpansionTooLarge, field_path, parse_yaml
from orchestrator.errors import ConfigError
from orchestrator.spelling import did_you_mean


def apply_overrides(pipeline: PipelineSpec, assignments: Iterable[str], *, source: str = "--set",
                    config_dir: Path | None = None) -> PipelineSpec:
    """Return a new spec with each `stage.param=value` (or `defaults.param=value`) applied.

    `stage.aggregation.type=concat` reaches nested keys, `stage.LABEL.param=value` one model slot of the
    stage; values are YAML (numbers, lists `[a, b]`, mappings `{"15043": -100}`, strings).
    Given the config folder, custom aggregation functions are checked against what it allows.
    """
    data = pipeline.model_dump(mode="python", exclude_unset=False)
    for text in assignments:
        target, value = _parse(text, source)
        _assign(data, target, value, text, source)
    try:
        result = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(source, msg, field=field_path(tuple(err.get("loc", ()))),
                          hint="Check the value given with --set.") from None
    if config_dir is not None:
        aggregators.check_pipeline(result, config_dir, source=source)
    return result


def _parse(text: str, source: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or len(parts) < 2:
        raise ConfigError(source, f"'{text}' is not STAGE.PARAM=VALUE",
                          hint="For example: --set review.temperature=0.2")
    if not raw.strip():
        return parts, ""
    try:
        value, _ = parse_yaml(raw)  # bounded: an anchor bomb here is refused as one in a file is
    except ExpansionTooLarge as exc:
        raise ConfigError(source, f"the value in '{key.strip()}=...': {exc}", field=key.strip(),
                          hint=EXPANSION_HINT) from None
    except (yaml.YAMLError, RecursionError):
        value = raw  # not YAML: taken as the plain string it is
    return parts, value


def _assign(data: dict[str, Any], parts: list[str], value: Any, text: str, source: str) -> None:
    head, rest = parts[0], parts[1:]
    if head == "defaults":
        node: Any = data.setdefault("defaults", {})
        _check_keys(PipelineDefaults, rest, text, source, [head])
    else:
        node = next((s for s in data["stages"] if s["name"] == head), None)
        if node is None:
            names = [s["name"] for s in data["stages"]]
            raise ConfigError(source, f"no stage named '{head}' in '{text}'", field=head,
                              hint=f"{did_you_mean(head, [*names, 'defaults'])}Stages are: {', '.join(names)}, "
                                   "or use 'defaults'.")
        slot = _slot(node, rest)
        if slot is not None:  # review.reviewer-facts.top_k=40: one model call of the stage
            _check_keys(ModelSlot, rest[1:], text, source, [head, rest[0]])
            node, rest = slot, rest[1:]
        else:
            labels = [m["label"] for m in node.get("models", []) if isinstance(m, dict) and m.get("label")]
            _check_keys(StageSpec, rest, text, source, [head], labels if len(rest) > 1 else [])
    for part in rest[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[rest[-1]] = value
    if len(rest) == 1 and rest[0] in _CONSTRAINTS and value is not None:
        for other in _CONSTRAINTS - {rest[0]}:  # a grammar given on the command line replaces a json_schema
            node[other] = None


_CONSTRAINTS = frozenset({"grammar", "json_schema"})


def _check_keys(model: type[BaseModel], keys: list[str], text: str, source: str, where: list[str],
                labels: list[str] | None = None) -> None:
    """Each key must be a field of the model it lands in (nested models followed), so a typo such as
    `max_token` is named with the field it is closest to rather than as pydantic's "Extra inputs"."""
    cls: type[BaseModel] | None = model
    for i, key in enumerate(keys):
        if cls is None:
            return  # inside a free-form value (logit_bias, json_schema): any key is the user's own
        fields = cls.model_fields
        if key not in fields:
            calls = labels if i == 0 and labels else []
            hint = did_you_mean(key, [*fields, *calls]).strip()
            if not hint:
                hint = f"Settings here: {', '.join(sorted(fields))}." + (
                    f" Model calls of this stage, by label: {', '.join(calls)}." if calls else "")
            raise ConfigError(source, f"unknown setting '{key}' in '{text}'", field=".".join([*where, *keys[:i + 1]]),
                              hint=hint)
        cls = _model_of(fields[key].annotation)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, directly or as `X | None`; None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return found[0] if len(found) == 1 else None
    return None


def _slot(stage: dict[str, Any], rest: list[str]) -> dict[str, Any] | None:
    """The model slot `rest[0]` names by its label, when it is not one of the stage's own keys."""
    if len(rest) < 2 or rest[0] in StageSpec.model_fields:
        return None
    return next((m for m in stage.get("models", []) if isinstance(m, dict) and m.get("label") == rest[0]), None)
