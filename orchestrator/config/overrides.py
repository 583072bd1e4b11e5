"""`--set stage.param=value` overrides on a pipeline, validated by the same schema as the file."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.config.schema import PipelineSpec
from orchestrator.config.yamlio import field_path
from orchestrator.errors import ConfigError


def apply_overrides(pipeline: PipelineSpec, assignments: Iterable[str], *, source: str = "--set") -> PipelineSpec:
    """Return a new spec with each `stage.param=value` (or `defaults.param=value`) applied.

    `stage.aggregation.type=concat` reaches nested keys; values are YAML (numbers, lists, strings).
    """
    data = pipeline.model_dump(mode="python", exclude_unset=False)
    for text in assignments:
        target, value = _parse(text, source)
        _assign(data, target, value, text, source)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise ConfigError(source, err.get("msg", "invalid value"), field=field_path(tuple(err.get("loc", ()))),
                          hint="Check the value given with --set.") from None


def _parse(text: str, source: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or len(parts) < 2:
        raise ConfigError(source, f"'{text}' is not STAGE.PARAM=VALUE",
                          hint="For example: --set review.temperature=0.2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _assign(data: dict[str, Any], parts: list[str], value: Any, text: str, source: str) -> None:
    head, rest = parts[0], parts[1:]
    if head == "defaults":
        node: Any = data.setdefault("defaults", {})
    else:
        node = next((s for s in data["stages"] if s["name"] == head), None)
        if node is None:
            names = ", ".join(s["name"] for s in data["stages"])
            raise ConfigError(source, f"no stage named '{head}' in '{text}'", field=head,
                              hint=f"Stages are: {names}, or use 'defaults'.")
    for part in rest[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[rest[-1]] = value
