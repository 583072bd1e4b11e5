"""Plan, run and record one pipeline run, and what a rerun starts from.

No checks here: the front door (`orchestrator.app.Chorus`) cleans the question and checks the pipeline
once before it calls `Runner`; evals and tests call `Runner` with what they already checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import ChorusError
from launcher.process.binary import binary_version
from orchestrator import __version__
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.registry import PipelineStatus
from orchestrator.config.schema import PipelineSpec
from orchestrator.engine.backend import Backend
from orchestrator.engine.events import Observer
from orchestrator.engine.local import LocalBackend
from orchestrator.engine.run import AllowSequential, CancelToken, Engine
from orchestrator.history.store import SessionError, SessionStore
from orchestrator.plan.resolve import RunMode, RunPlan
from orchestrator.records import RunRecord, StageRecord, to_dict
from orchestrator.runtime import Runtime

log = logging.getLogger("chorus.runs")


@dataclass
class RunOutcome:
    run: RunRecord
    session_id: str | None
    session_dir: Path | None
    history_error: str | None = None  # set when the run could not be saved; the answer is still here

    def to_dict(self) -> dict[str, Any]:
        """The run as the one serializer writes it, plus where it was saved."""
        return {"session_id": self.session_id, "session_dir": str(self.session_dir) if self.session_dir else None,
                "history_error": self.history_error, **to_dict(self.run)}


def config_snapshot(runtime: Runtime, plan: RunPlan, question: str) -> dict[str, Any]:
    """Everything needed to know later what produced a session, the resolved plan included."""
    pipeline = plan.pipeline
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
    return {"mode": plan.mode, "question": question, "pipeline": pipeline.model_dump(mode="json"),
            "plan": plan.to_dict(), "models": models,
            "versions": {"chorus": __version__, "llama_server": server_version},
            "config_dir": str(runtime.config.paths.config_dir),
            "models_dir": str(runtime.config.models_dir)}


class Runner:
    """Plan, run and record: what the front door (and evals) call to run a checked pipeline."""

    def __init__(self, runtime: Runtime, *, store: SessionStore | None = None) -> None:
        self.runtime = runtime
        self.store = store or SessionStore(runtime.config.sessions_dir)

    def run(self, pipeline: PipelineSpec, question: str, *, mode: RunMode = "manual",
            observers: Sequence[Observer] = (), cancel: CancelToken | None = None,
            allow_sequential: AllowSequential | bool = True, prior_stages: list[StageRecord] | None = None,
            parent_session: str | None = None, history: Sequence[dict[str, str]] = (),
            status: PipelineStatus | None = None) -> RunOutcome:
        """Run to the end, saving history as it goes. Never raises for model, memory or history trouble."""
        return asyncio.run(self.arun(pipeline, question, mode=mode, observers=observers, cancel=cancel,
                                     allow_sequential=allow_sequential, prior_stages=prior_stages,
                                     parent_session=parent_session, history=history, status=status))

    async def arun(self, pipeline: PipelineSpec, question: str, *, mode: RunMode = "manual",
                   observers: Sequence[Observer] = (), cancel: CancelToken | None = None,
                   allow_sequential: AllowSequential | bool = True, prior_stages: list[StageRecord] | None = None,
                   parent_session: str | None = None, backend: Backend | None = None,
                   history: Sequence[dict[str, str]] = (), status: PipelineStatus | None = None) -> RunOutcome:
        """`run` for callers that have an event loop (the HTTP API); `backend` replaces the real one in tests.
        `status`: the front door's models check, taken by the plan instead of asking the registry again."""
        plan = self.runtime.plan(pipeline, mode, status=status)
        recorder = None
        history_error = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                if backend is None:
                    backend = await stack.enter_async_context(LocalBackend(self.runtime))
                if plan.blocked is None:  # the first servers load while the session is written
                    try:
                        await backend.prepare(plan.stages[len(prior_stages or []):])
                    except Exception:  # only a head start: the engine starts what it needs, and says why not
                        log.exception("no head start for this run")
                try:
                    recorder = self.store.create(config_snapshot(self.runtime, plan, question))
                except SessionError as exc:
                    history_error = f"history could not be saved: {exc}"
                    log.warning("%s", history_error)
                engine = Engine(backend, allow_sequential=allow_sequential,
                                observers=[*([recorder] if recorder else []), *observers])
                run = await engine.run(plan, question, cancel=cancel, prior_stages=prior_stages,
                                       parent_session=parent_session, history=history)
        finally:
            write_error = await asyncio.to_thread(recorder.close) if recorder else None
        if write_error and history_error is None:
            history_error = f"history could not be saved completely: {write_error}"
        warnings = run.warnings
        if warnings and history_error is None:  # a full disk fails every write the same way: say it once
            history_error = "history could not be saved completely: " + "; ".join(dict.fromkeys(warnings))
        return RunOutcome(run, recorder.id if recorder else None, recorder.dir if recorder else None, history_error)

    def prepare_rerun(self, session_id: str, stage: int) -> Rerun:
        """What a rerun of `session_id` from `stage` starts from; SessionError when it cannot be rerun."""
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
        damaged = [p for p in parent.problems if any(f"step{i}" in p for i in range(1, stage))]
        if damaged:
            raise SessionError(parent.dir, f"cannot rerun from stage {stage}: the steps before it are damaged "
                               f"({'; '.join(damaged)})", hint="Rerun from stage 1, or from an earlier stage.")
        question, mode = parent.meta.get("question"), parent.meta.get("mode")
        if not isinstance(question, str) or not question.strip() or mode not in ("base", "manual"):
            raise SessionError(parent.dir, "cannot be rerun: its question or mode could not be read",
                               hint="Run the question again with `chorus run`.")
        return Rerun(pipeline, question, mode, parent.stages[: stage - 1], parent.id)

    def rerun(self, session_id: str, stage: int, *, overrides: list[str] | None = None,
              observers: Sequence[Observer] = (), cancel: CancelToken | None = None,
              allow_sequential: AllowSequential | bool = True) -> RunOutcome:
        """A new session linked to its parent: steps before `stage` are copied, the rest run again."""
        again = self.prepare_rerun(session_id, stage)
        pipeline = again.pipeline
        if overrides:
            pipeline = apply_overrides(pipeline, overrides, config_dir=self.runtime.config.paths.config_dir)
        return self.run(pipeline, again.question, mode=again.mode, observers=observers, cancel=cancel,
                        allow_sequential=allow_sequential, prior_stages=again.prior, parent_session=again.parent)


@dataclass(frozen=True)
class Rerun:
    """A session's pipeline, question and mode, the steps to copy, and its id (the new run's parent)."""

    pipeline: PipelineSpec
    question: str
    mode: RunMode
    prior: list[StageRecord]
    parent: str


__all__ = ["Rerun", "RunOutcome", "Runner", "config_snapshot"]
