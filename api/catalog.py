"""What `model` may name: every runnable pipeline as `chorus/<name>`, every registered model by its name.

The base pipeline (pipeline.yaml) is `chorus/base`, run in base mode; each `<config dir>/pipelines/*.yaml`
is `chorus/<file stem>`, run in manual mode. A pipeline whose models are not all registered is absent, as
in the UI, and so is a pipeline file that does not load (logged). Pipeline files are read on each call, so
one added or edited while the API runs is picked up; the registry (models) is read at start.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.registry import ModelRecord
from orchestrator.config.schema import NAME_PATTERN, PipelineSpec, load_pipeline
from orchestrator.errors import ChorusError, ModelUnavailable
from orchestrator.plan.resolve import RunMode
from orchestrator.runtime import Runtime

log = logging.getLogger("chorus.api")

PREFIX = "chorus/"
BASE = "base"
PIPELINES_DIR = "pipelines"


@dataclass(frozen=True)
class PipelineModel:
    id: str
    spec: PipelineSpec
    mode: RunMode
    path: Path

    def to_dict(self, created: int) -> dict[str, Any]:
        stages = [s.name for s in self.spec.stages]
        description = self.spec.description or f"chorus pipeline: {' -> '.join(stages)}"
        return {"id": self.id, "object": "model", "created": created, "owned_by": "chorus",
                "description": description,
                "chorus": {"kind": "pipeline", "mode": self.mode, "stages": stages,
                           "file": self.path.name}}  # the name only: clients need not learn this machine's folders


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


def pipeline_files(runtime: Runtime) -> dict[str, tuple[Path, RunMode]]:
    """Every pipeline id with its file and run mode (not loaded yet)."""
    config = runtime.config
    files: dict[str, tuple[Path, RunMode]] = {PREFIX + BASE: (config.paths.pipeline, "base")}
    folder = config.paths.config_dir / PIPELINES_DIR
    if folder.is_dir():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem == BASE or not re.match(NAME_PATTERN, path.stem):
                log.warning("pipeline file %s is not offered: its name must match %s and not be '%s'",
                            path, NAME_PATTERN, BASE)
                continue
            files[PREFIX + path.stem] = (path, "manual")
    return files


def load(runtime: Runtime, pipeline_id: str, path: Path, mode: RunMode) -> PipelineModel:
    """The pipeline, if it loads and every model it names is registered; else its ChorusError."""
    spec = load_pipeline(path)
    runtime.registry.pipeline_status(spec).raise_if_blocked()
    return PipelineModel(pipeline_id, spec, mode, path)


def list_models(runtime: Runtime) -> list[Entry]:
    runnable: list[Entry] = []
    for pipeline_id, (path, mode) in pipeline_files(runtime).items():
        try:
            runnable.append(load(runtime, pipeline_id, path, mode))
        except ChorusError as exc:
            log.info("pipeline %s is not offered: %s", pipeline_id, exc)
    runnable += [RegisteredModel(name, rec) for name, rec in runtime.registry.generators.items()]
    return runnable


def resolve(runtime: Runtime, model: str) -> Entry:
    """The pipeline or model `model` names; ModelUnavailable (404) when there is none, with why."""
    if model.startswith(PREFIX):
        found = pipeline_files(runtime).get(model)
        if found is None:
            raise ModelUnavailable(model, "no such pipeline (GET /v1/models lists them)")
        try:
            return load(runtime, model, *found)
        except ChorusError as exc:  # a broken file is named, not shown with its folders
            raise ModelUnavailable(model, exc.message.replace(str(found[0]), found[0].name)) from None
    return RegisteredModel(model, runtime.registry.get(model))
