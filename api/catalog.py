"""What `model` may name: every runnable pipeline as `chorus/<name>`, every registered model by its name.

The front door (`Chorus.pipelines`, `Chorus.pipeline_by_id`) decides which pipelines run: the base
pipeline (pipeline.yaml) is `chorus/base`, run in base mode; each `<config dir>/pipelines/*.yaml` is
`chorus/<file stem>`, run in manual mode; one whose models are not all registered, or whose file does not
load, is absent. Pipeline files are read on each call, so one added or edited while the API runs is picked
up; the registry (models) is read at start. This module only renders them as OpenAI model objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.app import PREFIX, Chorus, Pipeline
from orchestrator.config.registry import ModelRecord
from orchestrator.config.schema import ChorusConfig


@dataclass(frozen=True)
class PipelineModel:
    id: str
    pipeline: Pipeline

    def to_dict(self, created: int) -> dict[str, Any]:
        spec = self.pipeline.spec
        stages = [s.name for s in spec.stages]
        description = spec.description or f"chorus pipeline: {' -> '.join(stages)}"
        path = self.pipeline.path
        return {"id": self.id, "object": "model", "created": created, "owned_by": "chorus",
                "description": description,
                "chorus": {"kind": "pipeline", "mode": self.pipeline.mode, "stages": stages,
                           "file": path.name if path else None}}  # the name only: not this machine's folders


@dataclass(frozen=True)
class RegisteredModel:
    id: str
    record: ModelRecord

    def to_dict(self, created: int) -> dict[str, Any]:
        rec = self.record
        return {"id": self.id, "object": "model", "created": created,
                "owned_by": "remote" if rec.is_remote else "local",
                "description": rec.entry.description or ("remote endpoint" if rec.is_remote else "local GGUF model"),
                "chorus": {"kind": "model", "mode": rec.mode, "remote": rec.is_remote}}


Entry = PipelineModel | RegisteredModel


def list_models(chorus: Chorus) -> list[Entry]:
    runnable: list[Entry] = [PipelineModel(p.id or "", p) for p in chorus.pipelines()]
    return runnable + [RegisteredModel(name, rec) for name, rec in chorus.models().items()]


def resolve(chorus: Chorus, model: str) -> Entry:
    """The pipeline or model `model` names; ModelUnavailable (404) when there is none, with why."""
    if model.startswith(PREFIX):
        return PipelineModel(model, chorus.pipeline_by_id(model))
    return RegisteredModel(model, chorus.model(model))


def created(entry: Entry, config: ChorusConfig, fallback: int) -> int:
    """The entry's `created`, the same in the list and for one model and stable from call to call: a pipeline's
    file's modification time, a model's models.yaml's; `fallback` (the API's start) when it cannot be read."""
    path: Path | None = entry.pipeline.path if isinstance(entry, PipelineModel) else config.paths.models
    try:
        return int(path.stat().st_mtime) if path is not None else fallback
    except OSError:
        return fallback
