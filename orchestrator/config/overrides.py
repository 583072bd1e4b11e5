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
    Stage names and labels may hold dots: the longest name that the key starts with is the one meant
    (`a.b.max_tokens` is stage `a.b`'s when there is one). `defaults.` is the pipeline's defaults;
    `stages.NAME.param` names a stage explicitly, the way to reach a stage that is itself named `defaults`
    (`defaults.param` is refused as ambiguous while such a stage exists).
    A value that starts with `[` or `{` must be valid YAML (JSON is YAML), except for a text setting
    (prompt, system_prompt, grammar), which takes it as the text it is.
    Given the config folder, custom aggregation functions are checked against what it allows.
    """
    data = pipeline.model_dump(mode="python", exclude_unset=False)
    for text in assignments:
        key, raw = _parse(text, source)
        _assign(data, key, raw, text, source)
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


def _parse(text: str, source: str) -> tuple[str, str]:
    """`KEY=VALUE` as the key (without spaces around it) and the raw value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key.strip("."):
        raise ConfigError(source, f"'{text}' is not STAGE.PARAM=VALUE",
                          hint="For example: --set review.temperature=0.2")
    return key, raw


def _value(raw: str, key: str, source: str, *, text_only: bool) -> Any:
    """The value as YAML; a value that is not YAML is the plain string it is, unless it starts with `[` or
    `{` (a list or a mapping meant, with a typo) and the setting is not text only: then an error."""
    if not raw.strip():
        return ""
    try:
        value, _ = parse_yaml(raw)  # bounded: an anchor bomb here is refused as one in a file is
    except ExpansionTooLarge as exc:
        raise ConfigError(source, f"the value in '{key}=...': {exc}", field=key, hint=EXPANSION_HINT) from None
    except (yaml.YAMLError, RecursionError) as exc:
        if not text_only and raw.lstrip()[:1] in ("[", "{"):
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(source, f"'{raw.strip()}' starts like a list or mapping but is not valid YAML or "
                                      f"JSON ({problem})", field=key,
                              hint="Close every bracket and quote, in single quotes for the shell, e.g. "
                                   "--set 'defaults.stop=[\"\\n\", \"END\"]'.") from None
        value = raw  # not YAML: taken as the plain string it is
    return value


def _target(data: dict[str, Any], key: str, text: str, source: str) -> tuple[dict[str, Any] | None, str]:
    """The stage `key` addresses (None: the pipeline's defaults) and the rest of the key after its name."""
    stages = [s for s in data["stages"] if isinstance(s, dict)]

    def longest(prefix: str) -> dict[str, Any] | None:
        return max((s for s in stages if prefix.startswith(f"{s['name']}.")), key=lambda s: len(s["name"]),
                   default=None)

    found: list[tuple[dict[str, Any] | None, str, str]] = []  # (target, rest of the key, how it was read)
    if key.startswith("defaults."):
        found.append((None, key.removeprefix("defaults."), "the pipeline's defaults"))
    if (stage := longest(key)) is not None:
        found.append((stage, key[len(stage["name"]) + 1:], f"stage '{stage['name']}'"))
    explicit = longest(key.removeprefix("stages.")) if key.startswith("stages.") else None
    if explicit is not None and not any(t is explicit for t, _, _ in found):
        stage = explicit
        found.append((stage, key[len("stages.") + len(stage["name"]) + 1:], f"stage '{stage['name']}'"))
    if len(found) > 1:
        meant = " or ".join(how for _, _, how in found)
        raise ConfigError(source, f"'{key}' is ambiguous: it can be {meant}", field=key,
                          hint="Name a stage as stages.NAME.PARAM (a stage named 'defaults': "
                               "stages.defaults.PARAM); while a stage is named 'defaults', set the pipeline's "
                               "defaults in the pipeline file.")
    if not found:
        head = key.split(".")[0]
        names = [s["name"] for s in stages]
        raise ConfigError(source, f"no stage named '{head}' in '{text}'", field=head,
                          hint=f"{did_you_mean(head, [*names, 'defaults'])}Stages are: {', '.join(names)}, "
                               "or use 'defaults'.")
    target, rest, _ = found[0]
    if not [p for p in rest.split(".") if p]:
        raise ConfigError(source, f"'{text}' is not STAGE.PARAM=VALUE", field=key,
                          hint="For example: --set review.temperature=0.2")
    return target, rest


def _assign(data: dict[str, Any], key: str, raw: str, text: str, source: str) -> None:
    stage, rest_key = _target(data, key, text, source)
    rest = [p for p in rest_key.split(".") if p]
    if stage is None:
        node: Any = data.setdefault("defaults", {})
        field = _check_keys(PipelineDefaults, rest, text, source, ["defaults"])
    else:
        head = stage["name"]
        node = stage
        slot, slot_rest = _slot(node, rest_key)
        if slot is not None:  # review.reviewer-facts.top_k=40: one model call of the stage
            field = _check_keys(ModelSlot, slot_rest, text, source, [head, slot["label"]])
            node, rest = slot, slot_rest
        else:
            labels = [m["label"] for m in node.get("models", []) if isinstance(m, dict) and m.get("label")]
            field = _check_keys(StageSpec, rest, text, source, [head], labels if len(rest) > 1 else [])
    value = _value(raw, key, source, text_only=field is not None and _text_only(field))
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
                labels: list[str] | None = None) -> Any:
    """Each key must be a field of the model it lands in (nested models followed), so a typo such as
    `max_token` is named with the field it is closest to rather than as pydantic's "Extra inputs".
    Returns the type of the field the last key names (None inside a free-form value)."""
    cls: type[BaseModel] | None = model
    annotation: Any = None
    for i, key in enumerate(keys):
        if cls is None:
            return None  # inside a free-form value (logit_bias, json_schema): any key is the user's own
        fields = cls.model_fields
        if key not in fields:
            calls = labels if i == 0 and labels else []
            hint = did_you_mean(key, [*fields, *calls]).strip()
            if not hint:
                hint = f"Settings here: {', '.join(sorted(fields))}." + (
                    f" Model calls of this stage, by label: {', '.join(calls)}." if calls else "")
            raise ConfigError(source, f"unknown setting '{key}' in '{text}'", field=".".join([*where, *keys[:i + 1]]),
                              hint=hint)
        annotation = fields[key].annotation
        cls = _model_of(annotation)
    return annotation


def _text_only(annotation: Any) -> bool:
    """Whether a field holds text and nothing else (`str`, `str | None`): prompt, system_prompt, grammar."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    args = tuple(typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args)
    return str in args and all(a in (str, type(None)) for a in args)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, directly or as `X | None`; None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return found[0] if len(found) == 1 else None
    return None


def _slot(stage: dict[str, Any], rest: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The model slot whose label `rest` starts with (the longest such label: labels may hold dots), when
    the key is not one of the stage's own, and the keys after the label."""
    first = rest.split(".")[0]
    if first in StageSpec.model_fields:
        return None, []
    slots = [m for m in stage.get("models", []) if isinstance(m, dict) and isinstance(m.get("label"), str)
             and rest.startswith(f"{m['label']}.") and [p for p in rest[len(m["label"]) + 1:].split(".") if p]]
    slot = max(slots, key=lambda m: len(m["label"]), default=None)
    if slot is None:
        return None, []
    return slot, [p for p in rest[len(slot["label"]) + 1:].split(".") if p]
