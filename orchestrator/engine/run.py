"""The pipeline engine: execute a resolved `RunPlan` for one question, stage by stage.

Each stage renders its prompt (sandboxed Jinja), sends it to its calls through the backend (concurrently
when they fit in memory together, else in sequential waves), and merges the answers. A call that fails
is recorded on its step and the stage goes on with the others; nothing raises out of `run`. Progress
goes out as typed events to the observers (CLI progress, UI, recorder): one stream, one mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from launcher.errors import ChorusError, InsufficientMemory, RequestTimeout, ServerCrashed
from orchestrator.engine.backend import Backend, WaveStep
from orchestrator.engine.events import (
    AggregationDone,
    Event,
    ModelFinished,
    ModelStarted,
    Notice,
    Observer,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
    Token,
)
from orchestrator.engine.templates import build_context, render_async
from orchestrator.plan.resolve import CallPlan, RunPlan, StagePlan, Target
from orchestrator.rag.embed import HttpEmbedder
from orchestrator.rag.retrieval import format_context, sources_in_prompt
from orchestrator.rag.retrieval import search as rag_search
from orchestrator.rag.retrieval import stage_output as retrieve_output
from orchestrator.records import (
    AggregationRecord,
    ErrorInfo,
    ResponseRecord,
    RunRecord,
    StageRecord,
    StageStatus,
    to_dict,
)

log = logging.getLogger("chorus.engine")

T = TypeVar("T")


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


class RunRefused(ChorusError):
    """Before anything ran: some model of the run does not fit in memory even alone."""

    def __init__(self, reasons: dict[str, str]) -> None:
        stages = "; ".join(f"stage '{s}': {r}" for s, r in reasons.items())
        super().__init__(f"the run does not fit in memory: {stages}",
                         hint="Use a smaller n_ctx or fewer slots, a smaller model, or free memory (`chorus ps`).")
        self.reasons = dict(reasons)


class SynthesisFailed(ChorusError):
    """The synthesis model's call failed; its typed error is in the message and on the event."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"synthesis by '{model}' failed: {reason}")
        self.model = model
        self.reason = reason


class CancelToken:
    """Thread-safe cancellation: a UI button or Ctrl-C handler may call `cancel()` from any thread."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

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

    async def guard(self, coro: Coroutine[Any, Any, T]) -> T:
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


class Engine:
    """Executes run plans through one backend. One engine may run several plans concurrently."""

    def __init__(self, backend: Backend, *, observers: Sequence[Observer] = (),
                 allow_sequential: AllowSequential | bool = True) -> None:
        self.backend = backend
        self.observers = list(observers)
        self.allow_sequential = allow_sequential

    async def run(self, plan: RunPlan, question: str, *, prior_stages: Sequence[StageRecord] | None = None,
                  parent_session: str | None = None, cancel: CancelToken | None = None,
                  history: Sequence[dict[str, str]] = ()) -> RunRecord:
        """Run to the end and return the record; observers see every event on the way.

        With `prior_stages` (a rerun), those records are copied as they are and running starts at the
        first stage after them.
        """
        cancel = cancel or CancelToken()
        cancel.bind(asyncio.get_running_loop())
        prior = list(prior_stages or [])
        run = RunRecord(question=question, mode=plan.mode, pipeline=plan.pipeline.model_dump(mode="json"),
                        parent_session=parent_session,
                        rerun_from_stage=len(prior) + 1 if prior_stages is not None else None,
                        history=[dict(turn) for turn in history])
        self._emit(run, RunStarted(run, plan))
        try:
            if plan.blocked is not None:
                run.status, run.error = "failed", plan.blocked
            else:
                await self._stages(run, plan, prior, cancel)
        except asyncio.CancelledError:
            run.status = "cancelled"
        except StageRefused as exc:  # the user said no to waves: their choice, not a failure
            run.status, run.error = "cancelled", ErrorInfo.of(exc)
        except ChorusError as exc:  # expected trouble (a refused plan): recorded, no traceback
            run.status, run.error = "failed", ErrorInfo.of(exc)
        except Exception as exc:  # the engine never raises into its caller; the run records why
            log.exception("run failed")
            run.status, run.error = "failed", ErrorInfo.of(exc)
        if run.status == "completed":
            run.final = run.stages[-1].output if run.stages else ""
        run.finished_at = time.time()
        self._emit(run, RunFinished(run))
        return run

    def _emit(self, run: RunRecord, event: Event) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception as exc:  # an observer that fails (history that cannot be saved) must not lose the answer
                log.warning("observer %r failed on %s: %s", observer, type(event).__name__, exc)
                run.warnings.append(f"{type(exc).__name__}: {exc}")

    async def _stages(self, run: RunRecord, plan: RunPlan, prior: list[StageRecord], cancel: CancelToken) -> None:
        for stage_rec in prior:
            copied = copy.deepcopy(stage_rec)
            copied.status = "copied"
            run.stages.append(copied)
            self._emit(run, StageFinished(run, copied))
        to_run = plan.stages[len(prior):]
        in_waves = await self._preflight(run, to_run)
        for stage in to_run:
            if cancel.cancelled:
                run.status = "cancelled"
                return
            record = await self._run_stage(run, plan, stage, cancel, stage.index in in_waves)
            run.stages.append(record)
            self._emit(run, StageFinished(run, record))
            if record.status in ("failed", "cancelled"):
                run.status = "cancelled" if record.status == "cancelled" else "failed"
                run.error = record.error
                return
        run.status = "partial" if any(s.status == "partial" for s in run.stages) else "completed"
        if run.status == "partial":  # some calls failed, yet every stage produced an answer
            run.final = run.stages[-1].output

    # ---------------------------------------------------------------- one stage

    async def _preflight(self, run: RunRecord, stages: Sequence[StagePlan]) -> set[int]:
        """Ask the scheduler for the whole run's what-if before stage 1 (each stage from the state the
        earlier ones leave, their servers warm), so nothing runs only to be refused later.

        A call whose model does not fit even alone refuses the run; every stage that must run in waves is
        announced (and in manual mode asked about) now. Returns the indexes of those stages.
        """
        local = [s for s in stages if any(c.target.kind == "local" for c in s.all_calls())]
        if not local:
            return set()
        try:
            forecasts = await self.backend.forecast(local)
        except ChorusError as exc:  # no estimate (a file damaged since registration): its call reports it
            log.info("no memory forecast: %s", exc)
            return set()
        in_waves: set[int] = set()
        unfit: dict[str, str] = {}
        for stage, waves in zip(local, forecasts, strict=True):
            if waves.unfit:
                unfit[stage.name] = waves.reason
            elif not waves.fits_together and stage.spec.execution == "auto" and len(stage.labels) > 1:
                self._allow_waves(run, stage.name, waves.waves, waves.reason)
                in_waves.add(stage.index)
        if unfit:
            raise RunRefused(unfit)
        return in_waves

    def _allow_waves(self, run: RunRecord, stage: str, waves: list[list[str]], reason: str) -> None:
        """Ask (manual mode) and announce that `stage` runs in waves; raise StageRefused on a no."""
        question = SequentialQuestion(stage, [list(w) for w in waves], reason)
        if run.mode == "manual" and not self._ask_sequential(question):
            raise StageRefused(stage, question.reason or "not enough memory")
        self._emit(run, Notice(stage, f"stage '{stage}' runs in {len(question.waves)} waves: {question.reason}",
                               question.waves))

    async def _run_stage(self, run: RunRecord, plan: RunPlan, stage: StagePlan, cancel: CancelToken,
                         allowed_waves: bool = False) -> StageRecord:
        if stage.retrieval is not None:
            return await self._retrieve(run, stage, cancel)
        spec = stage.spec
        record = StageRecord(index=stage.index, name=stage.name, system_prompt=spec.system_prompt,
                             params={"execution": spec.execution, "on_error": spec.on_error,
                                     "aggregation": spec.aggregation.model_dump(mode="json"),
                                     "models": [{"label": c.label, "model": c.model, **c.public_params()}
                                                for c in stage.calls]},
                             started_at=time.time(), status="running")
        self._emit(run, StageStarted(stage.index, stage.name, stage.labels))
        previous = run.stages[-1].output if run.stages else ""
        context = build_context(run.question, previous, run.stages, run.history)
        try:
            record.prompt = await render_async(spec.prompt, context, where=f"stage '{stage.name}' prompt")
        except ChorusError as exc:
            return self._finish(run, record, "failed", error=ErrorInfo.of(exc))
        if sources := sources_in_prompt(run.stages, record.prompt):  # which retrieved passages this prompt got
            record.params["sources"] = sources
        record.responses = [ResponseRecord(label=c.label, model=c.model, system_prompt=c.request.system_prompt,
                                           prompt=record.prompt, params=c.public_params()) for c in stage.calls]
        responses = {r.label: r for r in record.responses}
        try:
            async for step in self._waves(run, stage, allowed_waves):
                for label, error in step.unfit.items():  # does not fit even alone: failed, the others go on
                    self._emit(run, ModelStarted(stage.name, label, responses[label].model))
                    responses[label].status, responses[label].error = "failed", error
                    self._emit(run, ModelFinished(stage.name, responses[label]))
                if not step.calls:
                    continue
                record.waves.append([c.label for c in step.calls])
                record.wave_servers.append(step.record)
                try:
                    async with self.backend.running(step):
                        since = max(step.since, record.started_at or 0.0) if step.since is not None else None
                        await asyncio.gather(*(self._call(run, stage.name, call, responses[call.label], cancel,
                                                          since=since) for call in step.calls))
                except InsufficientMemory as exc:  # memory changed since the wave was decided
                    for call in step.calls:
                        if responses[call.label].status == "pending":
                            responses[call.label].status, responses[call.label].error = "failed", ErrorInfo.of(exc)
                if cancel.cancelled:
                    return self._finish(run, record, "cancelled")
                if spec.on_error == "stop" and any(r.status == "failed" for r in record.responses):
                    break
        except ChorusError as exc:
            return self._finish(run, record, "failed", error=ErrorInfo.of(exc))
        record.execution = "parallel" if len(record.waves) <= 1 else "sequential"
        ok = [r for r in record.responses if r.ok]
        failed = [r for r in record.responses if r.status == "failed"]
        if not ok:
            first = failed[0].error if failed else None
            return self._finish(run, record, "failed",
                                error=first or ErrorInfo("StageFailed", "no model answered"))
        if failed and spec.on_error == "stop":
            return self._finish(run, record, "failed", error=failed[0].error)
        synthesis_calls: list[ResponseRecord] = []
        # imported when the first stage merges (aggregation, judge): a cold start spawns its first server sooner
        from orchestrator.engine.aggregation import AggregationError, Candidate, aggregate

        try:
            record.aggregation = await aggregate(
                spec.aggregation, run.question, [Candidate(r.label, r.model, r.text) for r in ok],
                synthesize=self._synthesizer(run, stage, cancel, synthesis_calls),
                config_dir=plan.config_dir, context=context)
        except (AggregationError, ChorusError) as exc:
            return self._finish(run, record, "failed", error=ErrorInfo.of(exc))
        if synthesis_calls:  # the synthesis model's tokens and timings, kept with the merge they made
            record.aggregation.details["synthesis_calls"] = [to_dict(c) for c in synthesis_calls]
        record.output = record.aggregation.output
        self._emit(run, AggregationDone(stage.name, record.aggregation))
        return self._finish(run, record, "partial" if failed else "ok")

    async def _retrieve(self, run: RunRecord, stage: StagePlan, cancel: CancelToken) -> StageRecord:
        """A retrieve stage: the collection's best passages for the question (or the previous output); no model.

        The query is embedded by the collection's embedding model through the backend (a leased server, the
        same memory admission) for hybrid ranking; the SQLite search runs off the event loop.
        """
        plan = stage.retrieval
        assert plan is not None
        record = StageRecord(index=stage.index, name=stage.name,
                             params={"kind": "retrieve", "collection": plan.collection, "top_k": plan.top_k,
                                     "query_from": plan.query_from}, started_at=time.time(), status="running")
        self._emit(run, StageStarted(stage.index, stage.name, []))
        previous = run.stages[-1].output if run.stages else ""
        query = previous if plan.query_from == "previous" and previous.strip() else run.question
        record.prompt = query
        vector: list[float] | None = None
        from orchestrator.rag.store import DocStore  # sqlite and chunking only for pipelines that retrieve

        try:
            if plan.embedder is not None:
                record.params["embedding_model"] = plan.embedder.model
                vector = await cancel.guard(self._embed_query(plan.embedder, query))
            passages = await cancel.guard(asyncio.to_thread(
                rag_search, DocStore(plan.db), plan.collection, query, plan.top_k, vector))
        except asyncio.CancelledError:
            return self._finish(run, record, "cancelled")
        except ChorusError as exc:
            return self._finish(run, record, "failed", error=ErrorInfo.of(exc))
        context = format_context(passages)
        record.output = retrieve_output(context, run.question)
        record.aggregation = AggregationRecord(
            kind="retrieve", output=record.output,
            details={"collection": plan.collection, "query": query, "ranking": "hybrid" if vector else "bm25",
                     "context": context, "passages": [p.to_dict() for p in passages]})
        self._emit(run, AggregationDone(stage.name, record.aggregation))
        return self._finish(run, record, "ok")

    async def _embed_query(self, target: Target, query: str) -> list[float]:
        async with self.backend.endpoint(target) as ep:
            embedder = HttpEmbedder(ep.model, ep.base_url, ep.api_key, remote=ep.remote)
            return (await asyncio.to_thread(embedder.embed, [query]))[0]

    def _finish(self, run: RunRecord, record: StageRecord, status: StageStatus, *,
                error: ErrorInfo | None = None) -> StageRecord:
        record.status = status
        record.error = error
        record.finished_at = time.time()
        return record

    async def _waves(self, run: RunRecord, stage: StagePlan, allowed: bool) -> AsyncIterator[WaveStep]:
        """The stage's waves, each decided by the scheduler when it is about to run (from the servers the
        waves before it left), so the record holds what really ran. `execution: parallel` runs every call
        at once as planned; `sequential` one model at a time (its calls together, on its slots).

        Asked again only if the stage did not need waves when the run was planned (memory changed since).
        """
        execution = stage.spec.execution
        groups = _one_model_at_a_time(stage.calls) if execution == "sequential" else [list(stage.calls)]
        asked = allowed or execution != "auto" or len(stage.calls) <= 1
        for group in groups:
            pending = list(group)
            while pending:
                step = await self.backend.next_wave(pending, together=execution == "parallel")
                if not asked and step.waves_left > 1:
                    self._allow_waves(run, stage.name, step.waves, step.reason)
                asked = True
                yield step
                done = {c.label for c in step.calls} | set(step.unfit)
                if not done:
                    break
                pending = [c for c in pending if c.label not in done]

    def _ask_sequential(self, question: SequentialQuestion) -> bool:
        if isinstance(self.allow_sequential, bool):
            return self.allow_sequential
        return bool(self.allow_sequential(question))

    # ---------------------------------------------------------------- one model call

    async def _call(self, run: RunRecord, stage: str, call: CallPlan, rec: ResponseRecord,
                    cancel: CancelToken, *, since: float | None = None) -> None:
        """`since`: when the call's wait began, if before now (its server's start, begun ahead of the wave)."""
        now = time.time()
        rec.started_at = min(since, now) if since is not None else now
        self._emit(run, ModelStarted(stage, call.label, call.model, waited_s=now - rec.started_at))

        def on_token(piece: str) -> None:
            self._emit(run, Token(stage, call.label, piece))

        try:
            if call.target.kind == "unavailable":
                rec.status, rec.error = "failed", call.target.error
            else:
                await cancel.guard(self._generate(call, rec, on_token))
                rec.status = "ok"
        except asyncio.CancelledError:
            rec.status, rec.error = "cancelled", ErrorInfo("Cancelled", "cancelled by the user")
        except ChorusError as exc:
            rec.status, rec.error = "failed", ErrorInfo.of(exc)
        except Exception as exc:
            log.exception("model call failed")
            rec.status, rec.error = "failed", ErrorInfo.of(exc)
        rec.finished_at = time.time()
        self._emit(run, ModelFinished(stage, rec))

    async def _generate(self, call: CallPlan, rec: ResponseRecord, on_token: Callable[[str], None]) -> None:
        request = dataclasses.replace(call.request, prompt=rec.prompt)
        tries = 2 if len(call.target.urls) > 1 else 1  # replicas: a connection-level failure is retried once
        for attempt in range(tries):
            async with self.backend.endpoint(call.target) as endpoint:
                try:
                    result = await self.backend.generate(endpoint, request, on_token)
                    break
                except RequestTimeout:
                    await self.backend.discard(endpoint)  # a hung server is replaced on next use
                    raise
                except ServerCrashed as exc:  # the connection failed: that replica is down, try another once
                    if tries == 1:
                        raise
                    await self.backend.mark_down(endpoint)
                    if attempt + 1 >= tries:
                        raise
                    log.warning("%s: replica %s failed (%s); retrying on another", call.label,
                                endpoint.base_url, exc.detail)
        rec.server = endpoint.base_url
        rec.text = result.text
        rec.prompt_tokens, rec.completion_tokens = result.prompt_tokens, result.completion_tokens
        rec.first_token_s, rec.total_s, rec.tokens_per_s = result.first_token_s, result.total_s, result.tokens_per_s
        rec.finish_reason, rec.server_timings = result.finish_reason, dict(result.server_timings)

    def _synthesizer(self, run: RunRecord, stage: StagePlan, cancel: CancelToken,
                     calls: list[ResponseRecord]) -> Callable[[str, str], Coroutine[Any, Any, str]] | None:
        call = stage.synthesis
        if call is None:
            return None

        async def synthesize(model: str, prompt: str) -> str:
            if model != call.model:
                raise SynthesisFailed(model, f"the plan resolved the synthesis model as '{call.model}'")
            rec = ResponseRecord(label=call.label, model=model, prompt=prompt, params=call.public_params())
            calls.append(rec)
            step = await self.backend.next_wave([call])  # a wave of its own, decided now
            if step.unfit:
                raise SynthesisFailed(model, step.unfit[call.label].text())
            try:
                async with self.backend.running(step):
                    await self._call(run, stage.name, step.calls[0], rec, cancel)
            except InsufficientMemory as exc:
                rec.status, rec.error = "failed", ErrorInfo.of(exc)
            if rec.status == "cancelled":
                raise asyncio.CancelledError
            if not rec.ok:
                raise SynthesisFailed(model, rec.error.message if rec.error else "failed")
            return rec.text

        return synthesize


def _one_model_at_a_time(calls: Sequence[CallPlan]) -> list[list[CallPlan]]:
    """Sequential execution: one model at a time (calls to one model stay together on its slots)."""
    groups: dict[str, list[CallPlan]] = {}
    for call in calls:
        groups.setdefault(call.model, []).append(call)
    return list(groups.values())
