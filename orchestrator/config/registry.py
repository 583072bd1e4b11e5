"""The model registry: which configured models can actually be used right now, and why not.

A missing models dir (an unplugged removable disk), a missing file or an unreadable GGUF never
raise: the model is kept apart as unavailable with its reason and a warning is logged.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher.errors import GGUFError
from launcher.memory.gguf import GGUFMetadata, read_gguf
from launcher.process.server import MIN_N_CTX
from orchestrator.config.schema import NAME_PATTERN, ChorusConfig, ModelEntry, PipelineSpec
from orchestrator.errors import ConfigError, ModelUnavailable, PipelineBlocked
from orchestrator.spelling import closest

log = logging.getLogger("chorus.registry")

Status = Literal["available", "missing", "invalid"]


def gguf_fields(meta: GGUFMetadata | None) -> dict[str, object]:
    """What `chorus models` shows of a GGUF header (None for each when the header is unknown)."""
    return {"architecture": meta.architecture if meta else None, "size_label": meta.size_label if meta else None,
            "quantization": meta.quantization if meta else None,
            "context_length": meta.context_length if meta else None,
            "block_count": meta.block_count if meta else None,
            "has_chat_template": meta.has_chat_template if meta else None}


@dataclass
class ModelRecord:
    """One models.yaml entry and what the registry found for it."""

    name: str
    entry: ModelEntry
    status: Status
    reason: str | None = None
    path: Path | None = None
    size_bytes: int | None = None
    mtime_ns: int | None = None
    metadata: GGUFMetadata | None = None

    @property
    def available(self) -> bool:
        return self.status == "available"

    @property
    def is_remote(self) -> bool:
        return self.entry.url is not None

    @property
    def mode(self) -> Literal["chat", "completion"]:
        """chat or completion: the config wins, else a GGUF without a chat template means completion."""
        if self.entry.mode:
            return self.entry.mode
        if self.entry.chat_template or self.is_remote:
            return "chat"
        if self.metadata is not None and not self.metadata.has_chat_template:
            return "completion"
        return "chat"

    @property
    def known_mode(self) -> Literal["chat", "completion"] | None:
        """`mode` where something says it; None for a file whose header was not read (missing, invalid) and
        whose entry sets neither mode nor chat_template: listings show "-", not a guessed "chat"."""
        if self.metadata is None and not (self.entry.mode or self.entry.chat_template or self.is_remote):
            return None
        return self.mode

    def to_dict(self) -> dict[str, object]:
        meta = self.metadata
        return {
            "name": self.name,
            "file": self.entry.file,
            "url": self.entry.url,
            "path": str(self.path) if self.path else None,
            "status": self.status,
            "reason": self.reason,
            "description": self.entry.description,
            "mode": self.known_mode,
            "size_bytes": self.size_bytes,
            **gguf_fields(meta),
            "default_n_ctx": self.entry.default_n_ctx,
            "default_gpu_layers": self.entry.default_gpu_layers,
        }


# llama.cpp's built-in chat template names (src/llama-chat.cpp LLM_CHAT_TEMPLATES, at the llama.cpp that
# scripts/build_llama_server.sh pins: llama-cpp-python 0.3.36): what `chat_template: NAME` may be.
BUILTIN_CHAT_TEMPLATES = frozenset({"chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip",
    "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4", "falcon3",
    "zephyr", "monarch", "gemma", "orion", "openchat", "vicuna", "vicuna-orca", "deepseek", "deepseek2", "deepseek3",
    "deepseek-ocr", "command-r", "llama3", "chatglm3", "chatglm4", "glmedge", "minicpm", "exaone3", "exaone4",
    "exaone-moe", "rwkv-world", "granite", "granite-4.0", "granite-4.1", "gigachat", "megrez", "yandex", "bailing",
    "bailing-think", "bailing2", "llama4", "smolvlm", "hunyuan-moe", "gpt-oss", "hunyuan-dense", "hunyuan-vl",
    "kimi-k2", "seed_oss", "grok-2", "pangu-embedded", "solar-open"})


def chat_template_kind(template: str) -> Literal["text", "file", "name"]:
    """How llama-server is given a `chat_template` (launcher.process.server.chat_template_args decides the
    same way): Jinja text, a template file, or a built-in name."""
    if "{%" in template or "{{" in template:
        return "text"
    if template.endswith((".jinja", ".j2", ".txt")) or os.sep in template:
        return "file"
    return "name"


def check_chat_template(template: str, config_dir: Path) -> tuple[str, str | None]:
    """(the template as the server gets it, why it cannot be used or None). A file is resolved against the
    config folder (not the current directory, which changes with where chorus is started) and must be a
    readable file; a name must be one of llama.cpp's built-in templates."""
    kind = chat_template_kind(template)
    if kind == "text":
        return template, None
    if kind == "name":
        if template in BUILTIN_CHAT_TEMPLATES:
            return template, None
        close = closest(template, sorted(BUILTIN_CHAT_TEMPLATES))
        return template, (f"chat_template: '{template}' is not one of llama.cpp's built-in templates"
                          + (f" (did you mean '{close}'?)" if close else "")
                          + "; give a built-in name, Jinja text, or a .jinja file")
    try:
        given = Path(os.path.expandvars(template)).expanduser()
        path = given if given.is_absolute() else (config_dir / given).resolve()
    except (RuntimeError, ValueError, OSError) as exc:
        return template, f"chat_template: cannot resolve {template}: {exc}"
    where = "" if given.is_absolute() else f" (relative to the config folder {config_dir})"
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        return str(path), f"chat_template: file not found: {path}{where}"
    except IsADirectoryError:
        return str(path), f"chat_template: {path} is a folder, not a template file"
    except OSError as exc:
        return str(path), f"chat_template: cannot read {path}: {exc.strerror or exc}"
    return str(path), None


SUGGESTED_N_CTX = 4096          # a new entry's default_n_ctx, unless the model's own context is smaller
_LATER_SPLIT_PART = re.compile(r"-(?!0*1-of-)\d+-of-\d+\.gguf$", re.IGNORECASE)  # llama.cpp loads part 1


@dataclass
class UnregisteredFile:
    """A .gguf file in models_dir that no models.yaml entry uses: what it is, and the entry that would add it."""

    path: Path
    size_bytes: int | None
    suggested_name: str
    metadata: GGUFMetadata | None = None
    reason: str | None = None      # why it cannot be added (not a valid GGUF file)

    @property
    def file(self) -> str:
        return self.path.name

    def entry(self) -> dict[str, Any] | None:
        """The models.yaml entry for this file (None for a file that is not a valid GGUF)."""
        meta = self.metadata
        if meta is None:
            return None
        what = " ".join(p for p in (meta.architecture, meta.size_label, meta.quantization) if p)
        mode = "chat template" if meta.has_chat_template else "no chat template: completion mode"
        n_ctx = min(SUGGESTED_N_CTX, meta.context_length) if meta.context_length else SUGGESTED_N_CTX
        return {"file": self.file, "default_n_ctx": max(MIN_N_CTX, n_ctx), "default_gpu_layers": -1,
                "description": f"{what} ({mode})"}

    def to_dict(self) -> dict[str, object]:
        meta = self.metadata
        return {
            "name": None,
            "suggested_name": self.suggested_name,
            "file": self.file,
            "url": None,
            "path": str(self.path),
            "status": "unregistered",
            "reason": self.reason,
            "size_bytes": self.size_bytes,
            **gguf_fields(meta),
            "entry": self.entry(),
        }


def suggest_name(file_name: str, taken: set[str] | dict[str, Any]) -> str:
    """A models.yaml name for a file: its stem in lower case with other characters as '-', unique."""
    stem = file_name[:-5] if file_name.lower().endswith(".gguf") else file_name
    base = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:60] or "model"
    name, n = base, 2
    while name in taken or not re.match(NAME_PATTERN, name):
        name, n = f"{base}-{n}", n + 1
    return name


@dataclass(frozen=True)
class PipelineStatus:
    """Whether a pipeline can run on the registered models; `missing` maps model -> reason."""

    available: bool
    missing: dict[str, str] = field(default_factory=dict)
    pipeline: str | None = None  # the pipeline's name in messages; None: "the base pipeline"

    @property
    def reason(self) -> str | None:
        if self.available:
            return None
        return "; ".join(f"{m}: {r}" for m, r in self.missing.items())

    def raise_if_blocked(self) -> None:
        if not self.available:
            raise PipelineBlocked(self.missing, pipeline=self.pipeline)


class Registry:
    """Registered vs. unavailable models, built once at start (and again on `refresh()`)."""

    def __init__(self, config: ChorusConfig) -> None:
        self.config = config
        self.records: dict[str, ModelRecord] = {}
        self.refresh()

    def refresh(self) -> None:
        models_dir = self.config.models_dir
        dir_ok = models_dir.is_dir()
        if not dir_ok and any(e.file for e in self.config.models.values()):
            log.warning("models directory %s is not there (removable disk unplugged?): "
                        "every file model is unavailable", models_dir)
        self.records = {name: self._with_template(self._check(name, entry, models_dir, dir_ok))
                        for name, entry in self.config.models.items()}
        for rec in self.records.values():
            if not rec.available and dir_ok:
                log.warning("model '%s' is not registered: %s", rec.name, rec.reason)

    def _with_template(self, record: ModelRecord) -> ModelRecord:
        """A local model's `chat_template` checked now, not at its server's start: a file resolved against the
        config folder (the record's entry then names it by its full path), a name known to llama.cpp."""
        template = record.entry.chat_template
        if not template or record.is_remote:
            return record
        resolved, problem = check_chat_template(template, self.config.paths.config_dir)
        if resolved != template:
            record.entry = record.entry.model_copy(update={"chat_template": resolved})
        if problem is not None and record.status == "available":
            record.status, record.reason = "invalid", f"{self.config.paths.models}, model '{record.name}': {problem}"
        return record

    @staticmethod
    def _check(name: str, entry: ModelEntry, models_dir: Path, dir_ok: bool) -> ModelRecord:
        if entry.url:
            return ModelRecord(name, entry, "available")
        assert entry.file is not None
        try:
            given = Path(entry.file).expanduser()
        except RuntimeError as exc:  # '~nosuchuser/model.gguf'
            return ModelRecord(name, entry, "missing", f"cannot resolve {entry.file}: {exc}", Path(entry.file))
        path = given if given.is_absolute() else models_dir / given
        if not dir_ok and not given.is_absolute():
            return ModelRecord(name, entry, "missing", f"models directory {models_dir} not found", path)
        try:
            st = path.stat()
        except FileNotFoundError:
            return ModelRecord(name, entry, "missing", f"file not found: {path}", path)
        except OSError as exc:
            return ModelRecord(name, entry, "missing", f"cannot access {path}: {exc.strerror or exc}", path)
        try:
            meta = read_gguf(path)
        except GGUFError as exc:
            return ModelRecord(name, entry, "invalid", f"not a valid GGUF file: {exc.message}", path,
                               st.st_size, st.st_mtime_ns)
        return ModelRecord(name, entry, "available", None, path, st.st_size, st.st_mtime_ns, meta)

    def unregistered_files(self) -> list[UnregisteredFile]:
        """The .gguf files at the top of models_dir that no entry uses (the first part of a split model only),
        each with its metadata and a suggested entry; nothing is registered by listing them."""
        models_dir = self.config.models_dir
        try:
            candidates = sorted(p for p in models_dir.iterdir() if p.name.lower().endswith(".gguf"))
        except OSError:
            return []
        used = set()
        for rec in self.records.values():
            if rec.path is not None:
                try:
                    used.add(rec.path.resolve())
                except (OSError, RuntimeError):
                    continue
        taken: set[str] = set(self.records)
        out = []
        for path in candidates:
            try:
                if path.resolve() in used or _LATER_SPLIT_PART.search(path.name) or not path.is_file():
                    continue
                size: int | None = path.stat().st_size
            except (OSError, RuntimeError):
                continue
            name = suggest_name(path.name, taken)
            taken.add(name)
            try:
                out.append(UnregisteredFile(path, size, name, read_gguf(path)))
            except GGUFError as exc:
                out.append(UnregisteredFile(path, size, name, reason=f"not a valid GGUF file: {exc.message}"))
        return out

    @property
    def available(self) -> dict[str, ModelRecord]:
        return {n: r for n, r in self.records.items() if r.available}

    @property
    def generators(self) -> dict[str, ModelRecord]:
        """The available models a generate stage can call (and synthesise or judge with): not `role: embedding`
        ones, which run as llama-server --embeddings and answer no completion."""
        return {n: r for n, r in self.available.items() if r.entry.role != "embedding"}

    @property
    def unavailable(self) -> dict[str, ModelRecord]:
        return {n: r for n, r in self.records.items() if not r.available}

    def get(self, name: str) -> ModelRecord:
        """The record of a usable model, or ModelUnavailable with the reason."""
        rec = self.records.get(name)
        if rec is None:
            raise ModelUnavailable(name, "not defined in models.yaml")
        if not rec.available:
            raise ModelUnavailable(name, rec.reason or rec.status)
        return rec

    def pipeline_status(self, pipeline: PipelineSpec) -> PipelineStatus:
        missing: dict[str, str] = {}
        for name in pipeline.model_names():
            rec = self.records.get(name)
            if rec is None:
                missing[name] = "not defined in models.yaml"
            elif not rec.available:
                missing[name] = rec.reason or rec.status
            elif rec.entry.role == "embedding":
                missing[name] = "an embedding model (role: embedding) cannot answer in a stage"
        return PipelineStatus(not missing, missing)

    def base_pipeline_status(self) -> PipelineStatus:
        """Base mode's status; a broken pipeline.yaml blocks base mode instead of raising."""
        try:
            pipeline = self.config.load_pipeline()
        except ConfigError as exc:
            return PipelineStatus(False, {"pipeline.yaml": str(exc)})
        return self.pipeline_status(pipeline)
