"""The generation controls a front end shows, read from `GenerationParams`' own fields.

A parameter added to the schema (type and bounds in its pydantic Field) appears in the UI's forms with no
UI code: this module turns each field into a `ParamField` (kind, bounds, choices), reads what a user typed
back into values, and turns values into `--set`-style overrides that `apply_overrides` validates.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, cast, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError

from orchestrator.config.schema import GenerationParams, LoadParams
from orchestrator.errors import ConfigError

ParamKind = Literal["int", "float", "choice", "lines", "text", "json"]

# One line each; a field missing here still gets a control (its help is then its bounds).
_HELP: dict[str, str] = {
    "temperature": "Randomness; 0 always picks the likeliest token.",
    "top_p": "Nucleus sampling: keep the smallest set of tokens whose probabilities add up to this.",
    "top_k": "Keep only the k likeliest tokens; 0 keeps every token.",
    "min_p": "Drop tokens less likely than this fraction of the likeliest one; 0 is off.",
    "typical_p": "Locally typical sampling; 1 is off.",
    "repeat_penalty": "Penalise repeated tokens; 1 is off, 1.1-1.3 stops small models looping.",
    "repeat_last_n": "How many recent tokens the penalties look at; -1 is the whole context.",
    "presence_penalty": "Penalise tokens that already appeared (OpenAI's range).",
    "frequency_penalty": "Penalise tokens by how often they appeared (OpenAI's range).",
    "mirostat": "Mirostat sampling: 0 off, 1 Mirostat, 2 Mirostat 2.0 (replaces top_k/top_p).",
    "mirostat_tau": "Mirostat's target entropy.",
    "mirostat_eta": "Mirostat's learning rate.",
    "max_tokens": "Longest answer, in tokens.",
    "seed": "Random seed; -1 is random. The same seed and settings give the same answer.",
    "stop": "Stop strings, one per line; write a line break as \\n, a tab as \\t, a backslash as \\\\.",
    "grammar": "A GBNF grammar the answer must follow (not together with json_schema).",
    "json_schema": "A JSON schema the answer must follow, as JSON (not together with grammar).",
    "logit_bias": 'Token id to bias, as JSON: {"15043": -100} never emits token 15043.',
    "n_ctx": "Context size in tokens of each slot of the model's server.",
    "n_gpu_layers": "Layers on the GPU; 0 none, -1 or a large number all of them.",
}

# The controls most people touch; the rest are shown under "more".
COMMON: tuple[str, ...] = ("temperature", "top_p", "max_tokens", "seed")


@dataclass(frozen=True)
class ParamField:
    """What a form needs to render one parameter: kind, inclusive bounds, choices, step and help."""

    name: str
    kind: ParamKind
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""

    @property
    def step(self) -> float | int:
        if self.kind == "int":
            return 1
        span = (self.maximum or 1.0) - (self.minimum or 0.0)
        return 0.05 if span <= 2 else 0.1 if span <= 20 else 1.0


def _unwrap(annotation: Any) -> Any:
    """`X | None` → X (the form's blank is the None)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kind(annotation: Any) -> tuple[ParamKind, tuple[Any, ...]]:
    inner = _unwrap(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        return "choice", get_args(inner)
    if inner is bool:
        return "choice", (False, True)
    if inner is int:
        return "int", ()
    if inner is float:
        return "float", ()
    if inner is str:
        return "text", ()
    if origin is list:
        return "lines", ()
    return "json", ()  # dicts and anything richer: typed as JSON, checked by the schema


def _bounds(metadata: list[Any], kind: ParamKind) -> tuple[float | None, float | None]:
    """Inclusive bounds a number input can enforce; an exclusive float bound is left to the schema."""
    low: float | None = None
    high: float | None = None
    for m in metadata:  # the schema's bounds are numbers; annotated_types types them as merely comparable
        if isinstance(m, annotated_types.Ge):
            low = cast(float, m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = cast(float, m.gt) + 1 if kind == "int" else cast(float, m.gt)
        elif isinstance(m, annotated_types.Le):
            high = cast(float, m.le)
        elif isinstance(m, annotated_types.Lt):
            high = cast(float, m.lt) - 1 if kind == "int" else cast(float, m.lt)
    return low, high


def describe(model: type[BaseModel] = GenerationParams, *, exclude: tuple[str, ...] = ()) -> list[ParamField]:
    """One ParamField per field of `model` (GenerationParams: every sampling parameter), in schema order."""
    out = []
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        kind, choices = _kind(info.annotation)
        low, high = _bounds(list(info.metadata), kind) if kind in ("int", "float") else (None, None)
        bounds = ("" if low is None and high is None else f" At least {low}." if high is None else
                  f" At most {high}." if low is None else f" Range {low}…{high}.")
        out.append(ParamField(name, kind, low, high, choices, _HELP.get(name, "") + (bounds if kind in
                                                                                       ("int", "float") else "")))
    return out


def generation_fields(*, exclude: tuple[str, ...] = ()) -> list[ParamField]:
    return describe(GenerationParams, exclude=exclude)


def load_fields() -> dict[str, ParamField]:
    """n_ctx and n_gpu_layers (`LoadParams`) by name, with the schema's bounds: a form never refuses, or fails
    to show, a value a pipeline file may hold (n_gpu_layers: 9999 is "every layer")."""
    return {f.name: f for f in describe(LoadParams)}


def int_bounds(field: ParamField) -> tuple[int | None, int | None]:
    """(min_value, max_value) of a number input for an int field: the schema's, None where it sets none."""
    return (None if field.minimum is None else int(field.minimum),
            None if field.maximum is None else int(field.maximum))


# ---------------------------------------------------------------- text ⇄ values

_ESCAPE = re.compile(r"\\(.)")
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def lines_to_text(values: list[str] | None) -> str:
    """Stop strings as a text box shows them: one per line, line breaks written as \\n."""
    if not values:
        return ""
    return "\n".join(v.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
                     for v in values)


def text_to_lines(text: str) -> list[str] | None:
    """The inverse of `lines_to_text`; blank lines are skipped, an empty box is None (not set)."""
    out = [_ESCAPE.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(0)), line) for line in text.splitlines()
           if line.strip()]
    return out or None


def value_to_text(field: ParamField, value: Any) -> str:
    """A value for the text box of a `lines`, `text` or `json` field."""
    if value is None:
        return ""
    if field.kind == "lines":
        return lines_to_text(list(value))
    if field.kind == "json":
        return json.dumps(value, indent=2, ensure_ascii=False)
    return str(value)


def text_to_value(field: ParamField, text: str, *, source: str = "form") -> Any:
    """What the user typed in a text box, as the field's value; blank is None. Bad JSON is a ConfigError."""
    if not text.strip():
        return None
    if field.kind == "lines":
        return text_to_lines(text)
    if field.kind == "json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigError(source, f"not valid JSON: {exc}", field=field.name,
                              hint='Write JSON, for example {"15043": -100}.') from None
    return text


def overrides(values: dict[str, Any], scope: str) -> list[str]:
    """`scope.name=value` assignments (for `apply_overrides`) for every value that is set.

    Values are written as JSON, which YAML reads back exactly (strings quoted, lists, mappings).
    """
    return [f"{scope}.{name}={json.dumps(value, ensure_ascii=False)}" for name, value in values.items()
            if value is not None]


def together_errors(values: dict[str, Any], scope: str) -> list[str]:
    """What the schema refuses in the values a form filled in at one scope taken together ('grammar' with
    'json_schema'), said as the schema says it. Their overrides would not be refused: `apply_overrides` lets
    the later of the pair replace the other (a CLI `--set grammar=...` replaces the file's json_schema), so
    the form would silently drop one. `scope`: "defaults" or a stage's name, as in `overrides`."""
    given = {k: v for k, v in values.items() if k in _TOGETHER and v is not None}
    if len(given) < 2:
        return []
    try:
        GenerationParams.model_validate(given)
    except ValidationError as exc:
        where = "all stages" if scope == "defaults" else f"stage '{scope}'"
        return [f"{where}: " + "".join(f"{part}: " for part in e["loc"][:1]) + e["msg"].removeprefix("Value error, ")
                for e in exc.errors(include_url=False)]
    return []


_TOGETHER = ("grammar", "json_schema")  # fields the schema checks as a pair (GenerationParams._one_constraint)


def current_values(node: BaseModel | dict[str, Any] | None, fields: list[ParamField]) -> dict[str, Any]:
    """The values `fields` have on a defaults, stage or slot (None where it does not set one)."""
    if node is None:
        return dict.fromkeys(f.name for f in fields)
    data = node if isinstance(node, dict) else node.model_dump(mode="python")
    return {f.name: data.get(f.name) for f in fields}


__all__ = ["COMMON", "ParamField", "current_values", "describe", "generation_fields", "int_bounds", "lines_to_text",
           "load_fields", "overrides", "text_to_lines", "text_to_value", "together_errors", "value_to_text"]
