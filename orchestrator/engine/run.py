"""The pipeline engine: run a pipeline spec for one question, stage by stage, streaming events.

Each stage renders its prompt (sandboxed Jinja), sends it to its models (concurrently when they fit
in memory together, else in sequential waves), and merges the answers. A model that fails is
recorded on its step and the stage goes on with the others; nothing raises out of `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from launcher.client import GenerationClient, GenerationRequest
from launcher.errors import ChorusError, RequestTimeout
from orchestrator.config.schema import PipelineSpec, StageSpec
from orchestrator.engine.aggregation import AggregationError, Candidate, aggregate
from orchestrator.engine.templates import build_context, render
from orchestrator.errors import PipelineBlocked
from orchestrator.plan.memory import plan_stage
from orchestrator.plan.resolve import SlotParams, pipeline_slot_counts, slot_params, synthesis_params
from orchestrator.records import (
    ResponseRecord,
    RunRecord,
    StageRecord,
    error_dict,
    to_dict,
)
from orchestrator.runtime import Runtime

log = logging.getLogger("chorus.pipeline")

EventType = Literal["run_started", "stage_started", "notice", "model_started", "token", "model_finished",
                    "aggregation_done", "stage_finished", "run_finished"]


@dataclass
class Event:
    type: EventType
    stage: str | None = None
    label: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


class RunSink(Protocol):
    """Receives the run as it progresses (sessions write files from these calls)."""

    def run_started(self, run: RunRecord) -> None: ...
    def stage_finished(self, run: RunRecord, stage: StageRecord) -> None: ...
    def run_finished(self, run: RunRecord) -> None: ...


@dataclass(frozen=True)
class SequentialQuestion:
    """Asked in manual mode before a stage whose models do not fit together runs in waves."""

    stage: str
    waves: list[list[str]]
    reason: str


AllowSequential = Callable[[SequentialQuestion], bool]


class StageRefused(ChorusError):
    """A stage's models do not fit together and the user declined sequential execution."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"stage '{stage}': its models do not fit in memory together ({reason}) and "
                         "sequential execution was not allowed",
                         hint="Allow sequential execution (--allow-sequential, or the UI's 'run sequentially').")
        self.stage = stage
        self.reason = reason


class SynthesisFailed(ChorusError):
    """The synthesis model's call failed; its typed error is in the message and on the event."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"synthesis by '{model}' failed: {reason}")
        self.model = model
        self.reason = reason


class Engine:
    """Runs pipelines on one Runtime. One engine may run several pipelines concurrently."""

    def __init__(self, runtime: Runtime, *, allow_sequential: AllowSequential | bool = True,
                 sinks: list[RunSink] | None = None) -> None:
        self.runtime = runtime
        self.allow_sequential = allow_sequential
        self.sinks = list(sinks or [])
        self.request_timeout_s = runtime.config.app.server.request_timeout_s

    async def run(self, pipeline: PipelineSpec, question: str, *, mode: Literal["base", "manual"] = "manual",
                  prior_stages: list[StageRecord] | None = None, parent_session: str | None = None,
                  cancel: CancelToken | None = None) -> AsyncIterator[Event]:
        """Yield events until the run ends; the last event is run_finished with data['run'] = RunRecord.

        With `prior_stages` (a rerun), those records are kept as they are and running starts at the
        first stage after them.
        """
        run = RunRecord(question=question, mode=mode, pipeline=pipeline.model_dump(mode="json"),
                        parent_session=parent_session,
                        rerun_from_stage=len(prior_stages) + 1 if prior_stages is not None else None)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        cancel = cancel or CancelToken()
        cancel.bind(asyncio.get_running_loop())
        task = asyncio.create_task(self._execute(run, pipeline, list(prior_stages or []), queue.put_nowait, cancel))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if not task.done():
                cancel.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # ---------------------------------------------------------------- the run

    async def _execute(self, run: RunRecord, pipeline: PipelineSpec, prior: list[StageRecord],
                       emit: Callable[[Event], None], cancel: CancelToken) -> None:
        emit(Event("run_started", data={"run": run}))
        self._notify("run_started", run)
        try:
            if run.mode == "base":
                self.runtime.registry.pipeline_status(pipeline).raise_if_blocked()
            for stage_rec in prior:
                copied = copy.deepcopy(stage_rec)
                copied.status = "copied"
                run.stages.append(copied)
                self._notify("stage_finished", run, copied)
            slots_per_key = pipeline_slot_counts(pipeline)
            async with GenerationClient(timeout_s=self.request_timeout_s) as client:
                for index, stage in enumerate(pipeline.stages[len(prior):], start=len(prior) + 1):
                    if cancel.cancelled:
                        run.status = "cancelled"
                        break
                    record = await self._run_stage(run, pipeline, stage, index, client, slots_per_key, emit, cancel)
                    run.stages.append(record)
                    self._notify("stage_finished", run, record)
                    if record.status in ("failed", "cancelled"):
                        run.status = "cancelled" if record.status == "cancelled" else "failed"
                        run.error = record.error
                        break
            if run.status == "running":
                run.status = "completed"
            run.final = run.stages[-1].output if run.stages and run.status == "completed" else ""
        except PipelineBlocked as exc:
            run.status, run.error = "failed", error_dict(exc)
        except asyncio.CancelledError:
            run.status = "cancelled"
        except Exception as exc:  # the engine never raises into its caller; the run records why
            log.exception("run failed")
            run.status, run.error = "failed", error_dict(exc)
        run.finished_at = time.time()
        self._notify("run_finished", run)
        emit(Event("run_finished", data={"run": run, "status": run.status, "final": run.final}))

    def _notify(self, method: str, run: RunRecord, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(run, *args)
            except Exception as exc:  # history that cannot be saved must not lose the answer
                log.warning("could not record %s: %s", method, exc)
                run.warnings.append(f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- one stage

    async def _run_stage(self, run: RunRecord, pipeline: PipelineSpec, stage: StageSpec, index: int,
                         client: GenerationClient, slots_per_key: dict, emit: Callable[[Event], None],
                         cancel: CancelToken) -> StageRecord:
        params = slot_params(pipeline, stage)
        record = StageRecord(index=index, name=stage.name, system_prompt=stage.system_prompt,
                             params={"execution": stage.execution, "on_error": stage.on_error,
                                     "aggregation": stage.aggregation.model_dump(mode="json"),
                                     "models": [vars(p) for p in params]},
                             started_at=time.time(), status="running")
        emit(Event("stage_started", stage.name, data={"index": index, "models": [p.label for p in params]}))
        previous = run.stages[-1].output if run.stages else ""
        context = build_context(run.question, previous, run.stages)
        try:
            record.prompt = render(stage.prompt, context, where=f"stage '{stage.name}' prompt")
            waves = await self._plan_waves(run, pipeline, stage, params, emit)
        except ChorusError as exc:
            return self._finish(record, "failed", emit, error=error_dict(exc))
        record.waves = waves
        record.execution = "parallel" if len(waves) <= 1 else "sequential"
        by_label = {p.label: p for p in params}
        record.responses = [ResponseRecord(label=p.label, model=p.model, system_prompt=p.system_prompt,
                                           prompt=record.prompt, params=_public_params(p)) for p in params]
        for wave in waves:
            tasks = [self._call(client, by_label[label], record.response(label), slots_per_key,  # type: ignore[arg-type]
                                stage.name, emit, cancel) for label in wave]
            await asyncio.gather(*tasks)
            if cancel.cancelled:
                return self._finish(record, "cancelled", emit)
            if stage.on_error == "stop" and any(r.status == "failed" for r in record.responses):
                break
        ok = [r for r in record.responses if r.ok]
        failed = [r for r in record.responses if r.status == "failed"]
        if not ok:
            first = failed[0].error if failed else None
            return self._finish(record, "failed", emit, error=first or {"type": "StageFailed",
                                                                        "message": "no model answered"})
        if failed and stage.on_error == "stop":
            return self._finish(record, "failed", emit, error=failed[0].error)
        synthesis_calls: list[ResponseRecord] = []
        try:
            record.aggregation = await aggregate(
                stage.aggregation, run.question, [Candidate(r.label, r.model, r.text) for r in ok],
                synthesize=self._synthesizer(client, pipeline, stage, slots_per_key, emit, cancel, synthesis_calls),
                config_dir=self.runtime.config.paths.config_dir, context=context)
        except (AggregationError, ChorusError) as exc:
            return self._finish(record, "failed", emit, error=error_dict(exc))
        if synthesis_calls:  # the synthesis model's tokens and timings, kept with the merge they made
            record.aggregation.details["synthesis_calls"] = [to_dict(c) for c in synthesis_calls]
        record.output = record.aggregation.output
        emit(Event("aggregation_done", stage.name, data={"aggregation": record.aggregation}))
        return self._finish(record, "partial" if failed else "ok", emit)

    def _finish(self, record: StageRecord, status: str, emit: Callable[[Event], None], *,
                error: dict[str, Any] | None = None) -> StageRecord:
        record.status = status  # type: ignore[assignment]
        record.error = error
        record.finished_at = time.time()
        emit(Event("stage_finished", record.name, data={"stage": record, "status": status}))
        return record

    async def _plan_waves(self, run: RunRecord, pipeline: PipelineSpec, stage: StageSpec,
                          params: list[SlotParams], emit: Callable[[Event], None]) -> list[list[str]]:
        """All labels in one wave when they fit together (or when forced), else the planner's waves."""
        labels = [p.label for p in params]
        if stage.execution == "sequential":
            return _group_waves(params)
        if len(labels) <= 1:
            return [labels]
        plan = await asyncio.to_thread(plan_stage, self.runtime, stage, pipeline)
        if plan.fits_together or stage.execution == "parallel":
            return [labels]
        waves = [list(w) for w in plan.waves]
        question = SequentialQuestion(stage.name, waves, plan.reason)
        if run.mode == "manual" and not self._ask_sequential(question):
            raise StageRefused(stage.name, question.reason or "not enough memory")
        emit(Event("notice", stage.name, data={"message": f"models of stage '{stage.name}' do not fit in memory "
                                                          f"together: running in {len(waves)} waves",
                                               "waves": waves}))
        return waves

    def _ask_sequential(self, question: SequentialQuestion) -> bool:
        if isinstance(self.allow_sequential, bool):
            return self.allow_sequential
        return bool(self.allow_sequential(question))

    # ---------------------------------------------------------------- one model call

    async def _call(self, client: GenerationClient, params: SlotParams, rec: ResponseRecord,
                    slots_per_key: dict, stage: str, emit: Callable[[Event], None], cancel: CancelToken) -> None:
        rec.started_at = time.time()
        emit(Event("model_started", stage, params.label, data={"model": params.model}))
        try:
            result = await cancel.guard(self._generate(client, params, rec.prompt, slots_per_key,
                                                       lambda piece: emit(Event("token", stage, params.label,
                                                                                data={"text": piece}))))
        except asyncio.CancelledError:
            rec.status, rec.error = "cancelled", {"type": "Cancelled", "message": "cancelled by the user"}
        except ChorusError as exc:
            rec.status, rec.error = "failed", error_dict(exc)
        except Exception as exc:
            log.exception("model call failed")
            rec.status, rec.error = "failed", error_dict(exc)
        else:
            rec.status = "ok"
            rec.text = result.text
            rec.prompt_tokens, rec.completion_tokens = result.prompt_tokens, result.completion_tokens
            rec.first_token_s, rec.total_s, rec.tokens_per_s = (result.first_token_s, result.total_s,
                                                                 result.tokens_per_s)
        rec.finished_at = time.time()
        emit(Event("model_finished", stage, params.label, data={"response": rec}))

    async def _generate(self, client: GenerationClient, params: SlotParams, prompt: str, slots_per_key: dict,
                        on_token: Callable[[str], None] | None):
        rec = self.runtime.registry.get(params.model)
        n_ctx, ngl = params.load_params(rec.entry)
        slots = slots_per_key.get((params.model, params.n_ctx, params.n_gpu_layers), 1)
        request = GenerationRequest(prompt=prompt, system_prompt=params.system_prompt, **params.generation)
        async with self.runtime.aendpoint(params.model, n_ctx=n_ctx, n_gpu_layers=ngl, slots=slots) as endpoint:
            try:
                return await client.generate(endpoint, request, on_token)
            except RequestTimeout:
                # a hung server is replaced on next use; stopping it may take stop_grace_s, off the event loop
                await asyncio.to_thread(self.runtime.discard_server, endpoint)
                raise

    def _synthesizer(self, client: GenerationClient, pipeline: PipelineSpec, stage: StageSpec,
                     slots_per_key: dict, emit: Callable[[Event], None], cancel: CancelToken,
                     calls: list[ResponseRecord]):
        params = synthesis_params(pipeline, stage)

        async def synthesize(model: str, prompt: str) -> str:
            assert params is not None
            p = SlotParams(label=params.label, model=model, system_prompt="", generation=params.generation,
                           n_ctx=params.n_ctx, n_gpu_layers=params.n_gpu_layers)
            rec = ResponseRecord(label=p.label, model=model, prompt=prompt, params=_public_params(p))
            calls.append(rec)
            await self._call(client, p, rec, slots_per_key, stage.name, emit, cancel)
            if rec.status == "cancelled":
                raise asyncio.CancelledError
            if not rec.ok:
                raise SynthesisFailed(model, (rec.error or {}).get("message", "failed"))
            return rec.text

        return synthesize if params is not None else None


def _public_params(p: SlotParams) -> dict[str, Any]:
    return {**p.generation, "n_ctx": p.n_ctx, "n_gpu_layers": p.n_gpu_layers}


def _group_waves(params: list[SlotParams]) -> list[list[str]]:
    """Sequential execution: one model at a time (calls to one model stay together on its slots)."""
    waves: dict[str, list[str]] = {}
    for p in params:
        waves.setdefault(p.model, []).append(p.label)
    return list(waves.values())


class CancelToken:
    """Thread-safe cancellation: a UI button or Ctrl-C handler may call `cancel()` from any thread."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def cancel(self) -> None:
        self._flag.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._cancel_tasks)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def guard(self, coro):
        """Run `coro` as a task that `cancel()` stops (closing its HTTP stream stops the server's work)."""
        if self.cancelled:
            coro.close()
            raise asyncio.CancelledError
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        try:
            return await task
        finally:
            self._tasks.discard(task)


def run_sync(engine: Engine, pipeline: PipelineSpec, question: str, *, on_event: Callable[[Event], None] | None = None,
             cancel: CancelToken | None = None, **kwargs: Any) -> RunRecord:
    """Run to the end from synchronous code (CLI, Streamlit); events go to `on_event`."""

    async def consume() -> RunRecord:
        final: RunRecord | None = None
        async for event in engine.run(pipeline, question, cancel=cancel, **kwargs):
            if on_event is not None:
                on_event(event)
            if event.type == "run_finished":
                final = event.data["run"]
        assert final is not None
        return final

    return asyncio.run(consume())
