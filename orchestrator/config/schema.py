"""The config boundary: app.yaml, models.yaml and pipeline.yaml as strict pydantic models.

Unknown keys are rejected everywhere so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from launcher.process.server import MAX_N_CTX, MIN_N_CTX
from orchestrator.config.hosts import allowed_host_entry
from orchestrator.config.locations import find_config_dir, relative_base
from orchestrator.config.yamlio import load_model
from orchestrator.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_TEMPLATE_CHECKER = ImmutableSandboxedEnvironment()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1 and false as 0 for a number: `max_tokens: true` gave one token."""
        if not isinstance(value, bool):  # every field of every model passes here: the common case first
            return value
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _wants_a_number(cast(Hashable, field.annotation)):
            raise ValueError("a number is expected here, not true or false")
        return value


@functools.lru_cache(maxsize=512)
def _wants_a_number(annotation: Any) -> bool:
    """An int or float field (or an optional one) that takes no bool."""
    kinds: list[Any] = []
    todo = [annotation]
    while todo:
        current = todo.pop()
        origin = typing.get_origin(current)
        if origin is Annotated:
            todo.append(typing.get_args(current)[0])
        elif origin in (typing.Union, types.UnionType):
            todo.extend(typing.get_args(current))
        elif origin is Literal and all(type(a) is int for a in typing.get_args(current)):
            kinds.append(int)  # mirostat: 0, 1 or 2 (True == 1 would pass)
        else:
            kinds.append(current)
    if any(k is bool or k is Any or k is StrictBool for k in kinds):
        return False
    return any(k in (int, float) for k in kinds)


def _check_template(value: str | None) -> str | None:
    if value is not None:
        try:
            _TEMPLATE_CHECKER.parse(value)
        except TemplateSyntaxError as exc:
            raise ValueError(f"template syntax error on its line {exc.lineno}: {exc.message}") from None
        except RecursionError:
            raise ValueError("template nests too deeply") from None
    return value


def label_format_pieces(fmt: str) -> list[tuple[str, str | None]]:
    """Split a concat `label_format` into literal text and {label}/{model} fields; anything fancier is refused
    (ValueError naming label_format), so a malformed one is caught when the pipeline is loaded.

    Only the two plain names are allowed (no attribute access, indexing, conversions or format specs),
    so a label format cannot reach object internals or build huge padded strings.
    """
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise ValueError(f"label_format {fmt!r} is malformed: {exc} (use {{label}} and {{model}}; write {{{{ and "
                         "}} for literal braces)") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if literal:
            pieces.append((literal, None))
        if name is None:
            continue
        if name not in ("label", "model") or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"label_format field {shown} is not allowed: only {{label}} and {{model}} may appear")
        pieces.append(("", name))
    return pieces


def _check_label_format(value: str) -> str:
    label_format_pieces(value)
    return value


def _check_path(value: Any) -> Any:
    """A path from a config file: no NUL byte (the OS cannot take it; Path() would raise ValueError later)."""
    if value is not None and "\x00" in str(value):
        raise ValueError("a path cannot contain a NUL character")
    return value


# ---------------------------------------------------------------- app.yaml

class ResourceMargins(Strict):
    """Memory kept free when deciding what fits: fraction of the total plus a fixed amount."""

    fraction: float = Field(0.10, ge=0, lt=1)
    fixed_mib: int = Field(512, ge=0)


class ServerSettings(Strict):
    startup_timeout_s: float = Field(120.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    idle_timeout_s: float = Field(900.0, gt=0)
    stop_grace_s: float = Field(5.0, ge=0)
    memory_budget_mib: int | None = Field(None, gt=0)
    max_slots: int = Field(4, ge=1, le=64)  # the most slots a server takes for runs and requests that share it


class AggregatorSettings(Strict):
    """Installed functions a pipeline may name as a custom aggregation, besides the config's aggregators/ files."""

    allowed: list[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")]] = Field(
        default_factory=list)

    @field_validator("allowed", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class DocsSettings(Strict):
    """Document collections (`chorus docs`, the retrieve stage): chunk sizes in characters, overlap between
    neighbouring chunks, and the embedding model used by `chorus docs add` when none is named (None: BM25 only).

    `allowed_roots`: the only folders the UI's Documents page may index (besides its own uploads folder); the
    CLI is the operator's and may index any path. `max_file_mib`: larger files are skipped, by both.
    """

    chunk_chars: int = Field(1000, ge=100, le=100_000)
    overlap_chars: int = Field(150, ge=0, le=50_000)
    embedding_model: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    allowed_roots: list[Path] = Field(default_factory=list)
    max_file_mib: int = Field(50, ge=1, le=4096)

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        """None is none allowed; each path without a NUL byte."""
        return [] if value is None else [_check_path(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _overlap_below_size(self) -> DocsSettings:
        if self.overlap_chars >= self.chunk_chars:
            raise ValueError("overlap_chars must be smaller than chunk_chars")
        return self


class ApiOptions(Strict):
    """`chorus api`: `Host:` names it answers besides loopback ones (the DNS-rebinding guard,
    orchestrator/config/hosts.py); None: loopback names only while it listens on loopback, `*`: any name."""

    allowed_hosts: list[str] | None = None

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [allowed_host_entry(v) for v in value]


class AppConfig(Strict):
    models_dir: Path = Path("../models")
    sessions_dir: Path = Path("../sessions")
    logs_dir: Path = Path("../logs")
    llama_server: Path | None = None
    resources: ResourceMargins = ResourceMargins()
    server: ServerSettings = ServerSettings()
    api: ApiOptions = ApiOptions()  # see orchestrator/config/hosts.py
    aggregators: AggregatorSettings = AggregatorSettings()  # see orchestrator/config/aggregators.py
    docs: DocsSettings = DocsSettings()  # see orchestrator/rag/

    _check_paths = field_validator("models_dir", "sessions_dir", "logs_dir", "llama_server")(_check_path)


# ---------------------------------------------------------------- models.yaml

# llama-server flags chorus sets itself (argv in launcher/process/server.py), each with what to use instead.
_MANAGED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file",
                     "-dr", "--docker-repo"), "the model's 'file'"),
    **dict.fromkeys(("--host", "--port", "--path", "--api-prefix", "--ssl-key-file", "--ssl-cert-file",
                     "--reuse-port"), "nothing: chorus picks the address of each server it starts"),
    **dict.fromkeys(("--api-key", "--api-key-file"), "nothing: chorus gives each server its own key"),
    **dict.fromkeys(("-c", "--ctx-size"), "'default_n_ctx' (or n_ctx in pipeline.yaml)"),
    **dict.fromkeys(("-np", "--parallel"), "'parallel'"),
    **dict.fromkeys(("-ngl", "--gpu-layers", "--n-gpu-layers"), "'default_gpu_layers' (or n_gpu_layers)"),
    **dict.fromkeys(("-t", "--threads"), "'threads'"),
    **dict.fromkeys(("--chat-template", "--chat-template-file"), "'chat_template'"),
    **dict.fromkeys(("--ui", "--webui", "--no-ui", "--no-webui", "--metrics", "-fit", "--fit", "-cram",
                     "--cache-ram", "--log-file", "--models-dir", "--models-preset", "--models-max"),
                    "nothing: chorus sets it (memory checks, logs and `chorus ps` depend on it)"),
}


def _check_extra_arg(value: str) -> str:
    """One argv item of a model's `extra_args`: not a flag chorus manages itself (it would fight ours)."""
    if not value or "\x00" in value:
        raise ValueError("an extra argument cannot be empty or contain a NUL character")
    flag = value.split("=", 1)[0]
    if flag.startswith("--"):
        flag = flag.replace("_", "-")  # llama.cpp reads --ctx_size as --ctx-size
    instead = _MANAGED_FLAGS.get(flag)
    if instead is not None:
        raise ValueError(f"'{flag}' is set by chorus itself and cannot be given in extra_args; use {instead}")
    return value


def _check_rpc_worker(value: str) -> str:
    """host:port of a llama.cpp rpc-server (`chorus worker`)."""
    from launcher.process.rpc import parse_endpoint

    parse_endpoint(value)  # ValueError with the expected form
    return value.strip()


class ModelEntry(Strict):
    file: str | None = None
    default_n_ctx: int = Field(4096, ge=MIN_N_CTX, le=MAX_N_CTX)
    default_gpu_layers: int = Field(0, ge=-1)
    description: str = ""
    mode: Literal["chat", "completion"] | None = None
    chat_template: str | None = None
    threads: int | None = Field(None, ge=1)
    parallel: int = Field(1, ge=1, le=64)
    url: str | None = None
    api_key_env: str | None = None
    idle_timeout_s: float | None = Field(None, gt=0)  # keep-alive of this model's servers; app.yaml's when unset
    extra_args: list[Annotated[str, AfterValidator(_check_extra_arg)]] = Field(default_factory=list, max_length=256)
    role: Literal["generate", "embedding"] = "generate"  # embedding: served with --embeddings, for `chorus docs`
    # llama.cpp RPC workers (`chorus worker` on each) that hold part of this local model's layers
    rpc: list[Annotated[str, AfterValidator(_check_rpc_worker)]] = Field(default_factory=list, max_length=64)
    # several OpenAI-compatible base URLs serving this model: calls spread over the healthy ones
    replicas: list[Annotated[str, Field(pattern=r"^https?://\S+$")]] = Field(default_factory=list, max_length=64)

    _check_file = field_validator("file")(_check_path)

    @model_validator(mode="before")
    @classmethod
    def _endpoints_alias(cls, data: Any) -> Any:
        """`endpoints:` is another name for `replicas:`; with replicas and no url, the first replica is the url."""
        if isinstance(data, dict):
            data = dict(data)
            if "endpoints" in data:
                if "replicas" in data:
                    raise ValueError("give 'replicas' or 'endpoints' (the same list), not both")
                data["replicas"] = data.pop("endpoints")
            replicas = data.get("replicas")
            if isinstance(replicas, list) and replicas and not data.get("url") and not data.get("file"):
                data["url"] = replicas[0]
        return data

    @field_validator("extra_args", "rpc", "replicas", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _file_or_url(self) -> ModelEntry:
        if self.rpc and not self.file:
            raise ValueError("'rpc' workers hold layers of a local model: give 'file', not 'url'")
        if self.replicas and self.file:
            raise ValueError("'replicas' are remote URLs serving the model: give them instead of 'file'")
        if len(set(self.rpc)) != len(self.rpc):
            raise ValueError("'rpc' names a worker twice")
        if not self.file and not self.url:
            raise ValueError("give either 'file' (a .gguf in models_dir) or 'url' (a remote endpoint)")
        if self.file and self.url:
            raise ValueError("give 'file' or 'url', not both")
        if self.url and not re.match(r"^https?://", self.url):
            raise ValueError("'url' must start with http:// or https://")
        if self.url and self.extra_args:
            raise ValueError("'extra_args' are flags for a local llama-server; a remote 'url' runs none here")
        if self.role == "generate" and {"--embedding", "--embeddings"} & {a.split("=", 1)[0] for a in self.extra_args}:
            raise ValueError("'--embeddings' in extra_args makes a server that answers no completion: give the "
                             "model 'role: embedding' instead (chorus then adds --embeddings itself)")
        return self


class ModelsFile(Strict):
    models: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ModelEntry] = Field(default_factory=dict)

    @field_validator("models", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


# ---------------------------------------------------------------- pipeline.yaml

class GenerationParams(Strict):
    """Every sampling parameter llama-server takes, defined once: the pipeline's defaults, a stage and a
    model slot inherit these fields, resolve.py layers them (slot → stage → defaults) and launcher/process/client.py's
    GenerationRequest carries them under the same names. None means "not set here": the server's default.

    Ranges are llama-server's own: repeat_penalty 1.0, top_k 0, min_p 0.0, typical_p 1.0 and mirostat 0 are
    "off". OpenAI's presence/frequency penalties and logit_bias keep OpenAI's ranges.
    """

    # built when first used on its own: at import only its subclasses are (they set defer_build back to False)
    model_config = ConfigDict(defer_build=True)

    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)           # 0 = every token
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)             # 1 = off
    repeat_penalty: float | None = Field(None, ge=0, le=10)       # 1 = off; 1.1-1.3 stops small models looping
    repeat_last_n: int | None = Field(None, ge=-1, le=1_000_000)  # tokens the penalties look back; -1 = context
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    mirostat: Literal[0, 1, 2] | None = None                      # 0 = off, 1 = Mirostat, 2 = Mirostat 2.0
    mirostat_tau: float | None = Field(None, ge=0, le=100)
    mirostat_eta: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=-1, le=2**32 - 1)           # -1 = random
    stop: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(None, max_length=64)
    grammar: str | None = Field(None, min_length=1, max_length=100_000)  # GBNF; exclusive with json_schema
    json_schema: dict[str, Any] | None = None                     # output constrained to this JSON schema
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1000)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_ids_as_keys(cls, value: Any) -> Any:
        """YAML reads `{15043: -100}` with an int key: a token id, kept as its text as in OpenAI's API."""
        if isinstance(value, dict):
            return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
        return value

    @field_validator("json_schema")
    @classmethod
    def _json_schema_is_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:  # a YAML date, a set, NaN: not JSON
                raise ValueError(f"json_schema must be plain JSON data: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationParams:
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("give 'grammar' or 'json_schema', not both (llama-server refuses the pair)")
        return self

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The generation parameter names (GenerationParams' own fields, not a subclass's)."""
        return GENERATION_KEYS


GENERATION_KEYS: tuple[str, ...] = tuple(GenerationParams.model_fields)  # every sampling parameter, named once


class LoadParams(Strict):
    model_config = ConfigDict(defer_build=True)  # as GenerationParams: its subclasses are built at import

    n_ctx: int | None = Field(None, ge=MIN_N_CTX, le=MAX_N_CTX)
    n_gpu_layers: int | None = Field(None, ge=-1)


class ModelSlot(GenerationParams):
    """One model call in a stage; the same model may appear several times with its own overrides."""

    model_config = ConfigDict(defer_build=False)

    model: Annotated[str, Field(pattern=NAME_PATTERN)]
    label: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    system_prompt: str | None = None


class VoteOptions(Strict):
    extract: Literal["whole", "last_line", "regex"] = "last_line"
    pattern: str | None = None
    similarity: float = Field(0.85, ge=0, le=1)
    tie_break: Literal["first", "synthesis"] = "first"

    @model_validator(mode="after")
    def _pattern_for_regex(self) -> VoteOptions:
        if self.extract == "regex":
            if not self.pattern:
                raise ValueError("extract: regex needs a 'pattern'")
            try:
                re.compile(self.pattern)
            except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}, (((((...
                raise ValueError(f"'pattern' is not a valid regex: {exc or type(exc).__name__}") from None
        return self


AggregationType = Literal["concat", "majority_vote", "synthesis", "custom_template", "custom", "judge"]


class AggregationSpec(Strict):
    type: AggregationType = "concat"
    separator: str = "\n\n"
    label_format: str = "### {label}"
    synthesis_model: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    synthesis_prompt: str | None = None
    template: str | None = None
    function: str | None = None
    vote: VoteOptions = VoteOptions()
    judge_model: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None  # type judge: scores every answer
    judge_prompt: str | None = None  # Jinja: question, answer, reference (score); answer_a, answer_b (pairwise)
    judge_mode: Literal["score", "pairwise"] = "score"

    _check_templates = field_validator("synthesis_prompt", "template", "judge_prompt")(_check_template)
    _check_label = field_validator("label_format")(_check_label_format)

    @model_validator(mode="after")
    def _needs(self) -> AggregationSpec:
        if self.type == "synthesis" and not self.synthesis_model:
            raise ValueError("aggregation 'synthesis' needs 'synthesis_model'")
        if self.type == "majority_vote" and self.vote.tie_break == "synthesis" and not self.synthesis_model:
            raise ValueError("vote tie_break 'synthesis' needs 'synthesis_model'")
        if self.type == "custom_template" and not self.template:
            raise ValueError("aggregation 'custom_template' needs 'template'")
        if self.type == "custom" and not (self.function and re.match(r"^[\w.]+:[\w]+$", self.function)):
            raise ValueError("aggregation 'custom' needs 'function' as 'module:function'")
        if self.type == "judge" and not self.judge_model:
            raise ValueError("aggregation 'judge' needs 'judge_model'")
        return self


class StageSpec(GenerationParams, LoadParams):
    model_config = ConfigDict(defer_build=False)

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    kind: Literal["generate", "retrieve"] = "generate"
    models: list[ModelSlot] = Field(default_factory=list, validate_default=True)
    # kind retrieve: passages of a `chorus docs` collection; `top_k` (GenerationParams') is then the passage count
    collection: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    query_from: Literal["question", "previous"] = "question"
    system_prompt: str = ""
    prompt: str = "{{ previous if previous else question }}"
    execution: Literal["auto", "parallel", "sequential"] = "auto"
    aggregation: AggregationSpec = AggregationSpec()
    on_error: Literal["continue", "stop"] = "continue"

    _check_prompt = field_validator("prompt")(_check_template)

    @field_validator("models", mode="before")
    @classmethod
    def _names_to_slots(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("models")
    @classmethod
    def _models_for_generate(cls, value: list[ModelSlot], info: ValidationInfo) -> list[ModelSlot]:
        kind = info.data.get("kind", "generate")
        if kind == "generate" and not value:
            raise ValueError("a stage needs at least 1 model")
        if kind == "retrieve" and value:
            raise ValueError("a retrieve stage runs no model: leave out 'models'")
        return value

    @model_validator(mode="after")
    def _retrieve_needs(self) -> StageSpec:
        if self.kind == "retrieve":
            if not self.collection:
                raise ValueError("a retrieve stage needs 'collection' (a `chorus docs` collection name)")
            if self.top_k is not None and not 1 <= self.top_k <= 100:
                raise ValueError("top_k of a retrieve stage is the number of passages: 1 to 100")
            given = [k for k in (*GENERATION_KEYS, *LoadParams.model_fields)
                     if k != "top_k" and getattr(self, k) is not None]
            if given:  # as 'models': refused, not ignored (a --set s.temperature=0.5 changed nothing)
                raise ValueError(f"a retrieve stage runs no model: leave out {', '.join(map(repr, given))}")
        elif self.collection is not None:
            raise ValueError("'collection' is for stages of kind: retrieve")
        return self

    @property
    def passages(self) -> int:
        """A retrieve stage's passage count (`top_k`, 5 when unset)."""
        return self.top_k or 5

    @model_validator(mode="after")
    def _labels(self) -> StageSpec:
        seen: set[str] = set()
        for slot in self.models:
            if slot.label is None:
                repeats = sum(s.model == slot.model for s in self.models) > 1
                base = slot.model
                slot.label = base if not repeats else next(
                    f"{base}-{i}" for i in range(1, 1000) if f"{base}-{i}" not in seen)
            if slot.label in seen:
                raise ValueError(f"two models in stage '{self.name}' share the label '{slot.label}'")
            seen.add(slot.label)
        return self


class PipelineDefaults(GenerationParams, LoadParams):
    model_config = ConfigDict(defer_build=False)

    # chorus api: a streamed answer shows every call but the answer's own as `reasoning_content` (api/stream.py);
    # false leaves the earlier stages to the `chorus` field only. A request's `reasoning_format` wins.
    stream_reasoning: StrictBool = True


class PipelineSpec(Strict):
    name: str = "pipeline"
    description: str = ""
    defaults: PipelineDefaults = PipelineDefaults()
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageSpec]) -> list[StageSpec]:  # a field check: names 'stages'
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        return stages

    def model_names(self) -> list[str]:
        """Every model the pipeline needs, in first-use order (synthesis and judge models included: a missing
        judge blocks base mode like a missing stage model)."""
        out: list[str] = []
        for stage in self.stages:
            agg = stage.aggregation
            names = [s.model for s in stage.models] + [agg.synthesis_model or "", agg.judge_model or ""]
            out.extend(n for n in names if n and n not in out)
        return out


# ---------------------------------------------------------------- loading

@dataclass(frozen=True)
class ConfigPaths:
    config_dir: Path
    app: Path
    models: Path
    pipeline: Path


@dataclass
class ChorusConfig:
    """Everything loaded from one config dir, paths already resolved."""

    paths: ConfigPaths
    app: AppConfig
    models: dict[str, ModelEntry]

    @property
    def models_dir(self) -> Path:
        return self.app.models_dir

    @property
    def sessions_dir(self) -> Path:
        return self.app.sessions_dir

    def load_pipeline(self, path: Path | None = None) -> PipelineSpec:
        return load_pipeline(path or self.paths.pipeline)


def default_config_dir() -> Path:
    """The config folder when none is given: $CHORUS_CONFIG_DIR, $CHORUS_HOME, ./config, the user's, the packaged.

    The order and its reasons are in orchestrator/config/locations.py.
    """
    return find_config_dir().path


def _resolve(base: Path, value: Path, *, file: Path | str, field: str) -> Path:
    try:
        value = Path(os.path.expandvars(str(value))).expanduser()
        return value if value.is_absolute() else (base / value).resolve()
    except (RuntimeError, ValueError, OSError) as exc:  # '~nosuchuser/x', a NUL from $VAR, a symlink loop
        raise ConfigError(str(file), f"path '{value}' cannot be resolved: {exc}", field=field,
                          hint="Use an absolute path, or one relative to the config folder.") from None


def load_app_config(config_dir: Path) -> AppConfig:
    path = config_dir / "app.yaml"
    app = load_model(AppConfig, path) if path.exists() else AppConfig()
    base = relative_base(config_dir)  # the config folder, or <data home>/config for the packaged defaults
    env_models = os.environ.get("CHORUS_MODELS_DIR")
    env_sessions = os.environ.get("CHORUS_SESSIONS_DIR")
    app.models_dir = (_resolve(Path.cwd(), Path(env_models), file="$CHORUS_MODELS_DIR", field="models_dir")
                      if env_models else _resolve(base, app.models_dir, file=path, field="models_dir"))
    app.sessions_dir = (_resolve(Path.cwd(), Path(env_sessions), file="$CHORUS_SESSIONS_DIR", field="sessions_dir")
                        if env_sessions else _resolve(base, app.sessions_dir, file=path, field="sessions_dir"))
    app.logs_dir = _resolve(base, app.logs_dir, file=path, field="logs_dir")
    if app.llama_server is not None:
        app.llama_server = _resolve(base, app.llama_server, file=path, field="llama_server")
    app.docs.allowed_roots = [_resolve(base, root, file=path, field=f"docs.allowed_roots.{i}")
                              for i, root in enumerate(app.docs.allowed_roots)]
    return app


def load_models_file(path: Path) -> dict[str, ModelEntry]:
    return load_model(ModelsFile, path).models


def load_pipeline(path: Path) -> PipelineSpec:
    return load_model(PipelineSpec, path)


def load_config(config_dir: Path | str | None = None) -> ChorusConfig:
    """Load app.yaml and models.yaml; pipeline.yaml is loaded on demand (base mode may be unused)."""
    cdir = find_config_dir(config_dir).path.resolve()
    if not cdir.is_dir():
        raise ConfigError(str(cdir), "config directory not found",
                          hint="Pass --config-dir or set $CHORUS_CONFIG_DIR to a folder with models.yaml, "
                               "or write one with `chorus init DIR`.")
    paths = ConfigPaths(cdir, cdir / "app.yaml", cdir / "models.yaml", cdir / "pipeline.yaml")
    return ChorusConfig(paths=paths, app=load_app_config(cdir), models=load_models_file(paths.models))
