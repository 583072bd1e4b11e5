"""Start runs and reruns with their history: the one entry point the CLI and the UI share."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from launcher.binary import binary_version
from launcher.errors import ChorusError
from orchestrator import __version__
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.schema import PipelineSpec
from orchestrator.engine.run import AllowSequential, CancelToken, Engine, Event, run_sync
from orchestrator.history.store import SessionError, SessionStore
from orchestrator.records import RunRecord, StageRecord, error_dict
from orchestrator.runtime import Runtime

log = logging.getLogger("chorus.runs")


@dataclass
class RunOutcome:
    run: RunRecord
    session_id: str | None
    session_dir: Path | None
    history_error: str | None = None  # set when the run could not be saved; the answer is still here

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "session_dir": str(self.session_dir) if self.session_dir else None,
            "status": self.run.status,
            "final": self.run.final,
            "error": self.run.error,
            "history_error": self.history_error,
            "stages": [{
                "name": s.name, "status": s.status, "output": s.output,
                "responses": [{"model": r.model, "label": r.label, "text": r.text, "error": r.error,
                               "completion_tokens": r.completion_tokens, "tokens_per_s": r.tokens_per_s}
                              for r in s.responses],
                "aggregation": (None if s.aggregation is None else
                                {"kind": s.aggregation.kind, "output": s.aggregation.output,
                                 "details": s.aggregation.details}),
                "error": s.error,
            } for s in self.run.stages],
        }


def config_snapshot(runtime: Runtime, pipeline: PipelineSpec, mode: str, question: str) -> dict[str, Any]:
    """Everything needed to know later what produced a session."""
    models: dict[str, Any] = {}
    for name in pipeline.model_names():
        rec = runtime.registry.records.get(name)
        if rec is None:
            models[name] = {"status": "undefined"}
            continue
        models[name] = {**rec.entry.model_dump(mode="json"), "status": rec.status, "reason": rec.reason,
                        "path": str(rec.path) if rec.path else None, "size_bytes": rec.size_bytes,
                        "mtime_ns": rec.mtime_ns, "mode": rec.mode}
    try:
        server_version = binary_version(runtime.binary)
    except ChorusError:
        server_version = "not found"
    return {"mode": mode, "question": question, "pipeline": pipeline.model_dump(mode="json"), "models": models,
            "versions": {"chorus": __version__, "llama_server": server_version},
            "config_dir": str(runtime.config.paths.config_dir),
            "models_dir": str(runtime.config.models_dir)}


class Runner:
    def __init__(self, runtime: Runtime, *, store: SessionStore | None = None) -> None:
        self.runtime = runtime
        self.store = store or SessionStore(runtime.config.sessions_dir)

    def run(self, pipeline: PipelineSpec, question: str, *, mode: Literal["base", "manual"] = "manual",
            on_event: Callable[[Event], None] | None = None, cancel: CancelToken | None = None,
            allow_sequential: AllowSequential | bool = True, prior_stages: list[StageRecord] | None = None,
            parent_session: str | None = None) -> RunOutcome:
        """Run to the end, saving history as it goes. Never raises for model, memory or history trouble."""
        writer = None
        history_error = None
        try:
            writer = self.store.create(config_snapshot(self.runtime, pipeline, mode, question))
        except SessionError as exc:
            history_error = f"history could not be saved: {exc}"
            log.warning("%s", history_error)
        engine = Engine(self.runtime, allow_sequential=allow_sequential, sinks=[writer] if writer else [])
        run = run_sync(engine, pipeline, question, on_event=on_event, cancel=cancel, mode=mode,
                       prior_stages=prior_stages, parent_session=parent_session)
        warnings = run.warnings
        if warnings and history_error is None:  # a full disk fails every write the same way: say it once
            history_error = "history could not be saved completely: " + "; ".join(dict.fromkeys(warnings))
        return RunOutcome(run, writer.id if writer else None, writer.dir if writer else None, history_error)

    def rerun(self, session_id: str, stage: int, *, overrides: list[str] | None = None,
              on_event: Callable[[Event], None] | None = None, cancel: CancelToken | None = None,
              allow_sequential: AllowSequential | bool = True) -> RunOutcome:
        """A new session linked to its parent: steps before `stage` are copied, the rest run again."""
        parent = self.store.load(session_id)
        try:
            pipeline = PipelineSpec.model_validate(parent.snapshot["pipeline"])
        except (KeyError, ValueError) as exc:
            raise SessionError(parent.dir / "config_snapshot.json", f"has no usable pipeline ({exc})") from None
        if not 1 <= stage <= len(pipeline.stages):
            raise SessionError(parent.dir, f"stage {stage} is out of range 1..{len(pipeline.stages)}",
                               hint="Stages are numbered from 1, as in stepN.json.")
        if stage - 1 > len(parent.stages):
            raise SessionError(parent.dir, f"stage {stage} cannot be rerun: the session has only "
                               f"{len(parent.stages)} finished step(s)")
        if overrides:
            pipeline = apply_overrides(pipeline, overrides)
        prior = parent.stages[: stage - 1]
        return self.run(pipeline, parent.meta.get("question", ""), mode=parent.meta.get("mode", "manual"),
                        on_event=on_event, cancel=cancel, allow_sequential=allow_sequential,
                        prior_stages=prior, parent_session=parent.id)


__all__ = ["RunOutcome", "Runner", "config_snapshot", "error_dict"]
