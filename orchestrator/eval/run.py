"""An eval: every question through the pipeline and through each of its member models alone, then scored.

Every answer is a normal run (`Runner.arun`), saved in history like any other; eval.db maps each
(eval, item, system) to its session. Runs and judge calls go at most `concurrency` at a time; each server
start still passes the memory admission check of the runtime's pool. What is stored is done, so
`resume` continues an interrupted eval where it stopped (a cancelled run is not stored: it runs again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from launcher.errors import ChorusError
from orchestrator.config.schema import GENERATION_KEYS, PipelineSpec
from orchestrator.engine.backend import Backend
from orchestrator.engine.judge import judge_pair, judge_score
from orchestrator.engine.local import LocalBackend
from orchestrator.engine.run import CancelToken, Engine
from orchestrator.eval.items import EvalItem
from orchestrator.eval.report import EvalReport, build_report
from orchestrator.eval.scoring import score_reference
from orchestrator.eval.store import EvalRunning, EvalStore
from orchestrator.limits import JUDGE_MAX_TOKENS as JUDGE_MAX_TOKENS  # defined there, light for the CLI's parser
from orchestrator.plan.resolve import RunMode, RunPlan
from orchestrator.records import ErrorInfo, RunRecord
from orchestrator.runs import Runner
from orchestrator.runtime import Runtime

PIPELINE = "pipeline"
BASELINE_PROMPT = "Question: {{ question }}\nAnswer:"
"""A member's prompt when it runs alone: plain enough for chat models, and a base model answers it."""


class EvalError(ChorusError):
    """An eval cannot start or continue (nothing to run, a judge model that is not registered...)."""


@dataclass(frozen=True)
class System:
    """One thing being evaluated: the pipeline, or one member model run alone as a one-stage pipeline."""

    name: str
    kind: Literal["pipeline", "baseline"]
    mode: RunMode
    pipeline: PipelineSpec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "mode": self.mode,
                "pipeline": self.pipeline.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> System:
        return cls(data["name"], data["kind"], data["mode"], PipelineSpec.model_validate(data["pipeline"]))


@dataclass(frozen=True)
class JudgeSettings:
    model: str
    max_tokens: int = JUDGE_MAX_TOKENS
    score: bool = True          # a rubric score for every system's answer
    pairwise: bool = True       # pipeline vs each baseline, both orders


@dataclass
class EvalSpec:
    systems: list[System]
    judge: JudgeSettings | None = None
    concurrency: int = 1

    @property
    def baselines(self) -> list[System]:
        return [s for s in self.systems if s.kind == "baseline"]

    def to_dict(self) -> dict[str, Any]:
        return {"systems": [s.to_dict() for s in self.systems], "judge": asdict(self.judge) if self.judge else None,
                "concurrency": self.concurrency}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalSpec:
        judge = data.get("judge")
        return cls([System.from_dict(s) for s in data["systems"]], JudgeSettings(**judge) if judge else None,
                   int(data.get("concurrency") or 1))


def member_baselines(plan: RunPlan, *, prompt: str = BASELINE_PROMPT) -> list[System]:
    """Each distinct model of the plan (its calls and aggregation calls, in first-use order) as a one-stage
    pipeline with the generation parameters and n_ctx of its first call in the plan. The system prompt is
    not carried over: it belongs to that call's role, not to the model."""
    seen: dict[str, System] = {}
    for stage in plan.stages:
        for call in stage.all_calls():
            if call.model in seen:
                continue
            params = {k: getattr(call.request, k) for k in GENERATION_KEYS if getattr(call.request, k) is not None}
            server = call.target.server
            if server is not None:
                params["n_ctx"] = server.n_ctx
                if plan.machine.has_gpu:
                    params["n_gpu_layers"] = server.n_gpu_layers
            name = call.model if call.model != PIPELINE else f"{PIPELINE}-model"
            spec = PipelineSpec.model_validate({
                "name": f"baseline-{call.model}", "description": f"{call.model} alone (chorus eval baseline)",
                "stages": [{"name": "answer", "models": [call.model], "prompt": prompt, **params}]})
            seen[call.model] = System(name, "baseline", "manual", spec)
    return list(seen.values())


def build_spec(runtime: Runtime, pipeline: PipelineSpec, *, mode: RunMode = "base", baselines: bool = True,
               judge: str | None = None, judge_max_tokens: int = JUDGE_MAX_TOKENS, concurrency: int = 1) -> EvalSpec:
    """The systems of an eval: the pipeline, then (with `baselines`) each member alone. The pipeline's own
    checks (models registered, aggregators allowed) are the front door's (`Chorus.eval_pipeline`), made once."""
    systems = [System(PIPELINE, "pipeline", mode, pipeline)]
    if baselines:
        systems += member_baselines(runtime.plan(pipeline, mode))
    if judge is not None:
        record = runtime.registry.records.get(judge)
        if record is None or not record.available:
            raise EvalError(f"the judge model '{judge}' is not available"
                            + (f": {record.reason}" if record is not None and record.reason else ""),
                            hint="`chorus models` lists the registered models.")
        if record.entry.role == "embedding":
            raise EvalError(f"the judge model '{judge}' cannot judge: an embedding model (role: embedding) "
                            "answers no prompt", hint="Give a generate model: `chorus models` lists them.")
    return EvalSpec(systems, JudgeSettings(judge, judge_max_tokens) if judge else None, max(1, concurrency))


# ---------------------------------------------------------------- progress


@dataclass
class Progress:
    """How far an eval is: steps are answers to get and judge tasks to do."""

    total: int = 0
    done: int = 0
    started_at: float = field(default_factory=time.monotonic)
    last: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None before the first step is done."""
        if not self.done or self.done >= self.total:
            return None if not self.done else 0.0
        elapsed = time.monotonic() - self.started_at
        return elapsed / self.done * (self.total - self.done)


ProgressFn = Callable[[Progress], None]


# ---------------------------------------------------------------- the judge, through the engine


class JudgeCallFailed(ChorusError):
    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"judge '{model}' failed: {reason}")
        self.model = model
        self.reason = reason


class EngineJudge:
    """The judge model as an `Ask`: a one-stage plan (temperature 0, the prompt as it is) run by the engine
    on the eval's backend, so judge calls use the same pool, admission and typed errors as any run."""

    def __init__(self, runtime: Runtime, settings: JudgeSettings, backend: Backend, cancel: CancelToken) -> None:
        self.model = settings.model
        spec = PipelineSpec.model_validate({"name": "judge", "stages": [{
            "name": "judge", "models": [settings.model], "prompt": "{{ question }}", "temperature": 0.0,
            "seed": 0, "max_tokens": settings.max_tokens}]})
        self.plan = runtime.plan(spec, "manual")
        self.engine = Engine(backend)
        self.cancel = cancel
        self.completion_tokens = 0

    async def __call__(self, model: str, prompt: str) -> str:
        if model != self.model:
            raise JudgeCallFailed(model, f"this eval's judge is '{self.model}'")
        record = await self.engine.run(self.plan, prompt, cancel=self.cancel)
        if record.status == "cancelled":
            raise asyncio.CancelledError
        if record.status != "completed":
            raise JudgeCallFailed(model, record.error.text() if record.error else record.status)
        self.completion_tokens += sum(r.completion_tokens or 0 for s in record.stages for r in s.responses)
        return record.final


# ---------------------------------------------------------------- running


def run_tokens(run: RunRecord) -> tuple[int, int]:
    """(prompt, completion) tokens of every model call of a run, aggregation calls (synthesis, judge) included."""
    prompt = completion = 0
    for stage in run.stages:
        if stage.status == "copied":
            continue
        calls: list[Any] = [vars(r) for r in stage.responses]
        if stage.aggregation is not None:
            calls += stage.aggregation.details.get("synthesis_calls", [])
        for c in calls:
            prompt += c.get("prompt_tokens") or 0
            completion += c.get("completion_tokens") or 0
    return prompt, completion


_RUNNING_HERE: set[str] = set()  # evals this process runs now (the UI runs them in threads)
_RUNNING_LOCK = threading.Lock()

ANSWERED = ("completed", "partial", "failed")  # stored; cancelled and interrupted runs are not
DONE = ("completed", "partial")  # a failed run (a server stopped under it: `chorus stop --all`) runs again on resume


class EvalRunner:
    """Start, run and resume evals. `backend` replaces the real one (tests); `on_progress` sees every step."""

    def __init__(self, runtime: Runtime, *, store: EvalStore | None = None, backend: Backend | None = None,
                 on_progress: ProgressFn | None = None) -> None:
        self.runtime = runtime
        self.store = store or EvalStore(runtime.config.sessions_dir)
        self.backend = backend
        self.on_progress = on_progress
        self.runner = Runner(runtime)
        self.progress = Progress()

    def start(self, spec: EvalSpec, items: list[EvalItem], *, source: str) -> str:
        """Record a new eval (spec and items) and return its id; `run` then does the work."""
        if not items:
            raise EvalError("the eval has no question")
        return self.store.create(spec.to_dict(), items, source=source, pipeline=spec.systems[0].pipeline.name)

    def run(self, eval_id: str, *, cancel: CancelToken | None = None, concurrency: int | None = None) -> EvalReport:
        return asyncio.run(self.arun(eval_id, cancel=cancel, concurrency=concurrency))

    async def arun(self, eval_id: str, *, cancel: CancelToken | None = None,
                   concurrency: int | None = None) -> EvalReport:
        """Do what is missing of the eval, then return its report. Ctrl-C or `cancel` leaves it 'interrupted'.
        An eval that a live process (this one included) runs already is refused (EvalRunning): both would
        run its missing answers. `concurrency` replaces the eval's own for this run (a resume's)."""
        row = self.store.get(eval_id)
        eval_id = row["id"]
        spec = EvalSpec.from_dict(row["spec"])
        if concurrency is not None:
            spec.concurrency = max(1, concurrency)
        items = self.store.items(eval_id)
        cancel = cancel or CancelToken()
        cancel.bind(asyncio.get_running_loop())
        with _RUNNING_LOCK:
            if eval_id in _RUNNING_HERE:
                raise EvalRunning(eval_id, os.getpid())
            self.store.claim(eval_id)
            _RUNNING_HERE.add(eval_id)
        status, error = "interrupted", None
        try:
            async with contextlib.AsyncExitStack() as stack:
                backend = self.backend
                if backend is None and spec.judge is not None:
                    backend = await stack.enter_async_context(LocalBackend(self.runtime))
                judge = EngineJudge(self.runtime, spec.judge, backend, cancel) if spec.judge and backend else None
                self.progress = Progress(total=self._steps(eval_id, spec, items))
                self._tick("")
                semaphore = asyncio.Semaphore(spec.concurrency)
                stack.enter_context(self.runtime.expecting(spec.concurrency))  # items share servers' slots
                # Answers are queued system by system (every item's pipeline run, then every item's first
                # baseline...): runs let go together then call the same models in step, so their calls batch
                # on one server's slots instead of two servers fighting over the cores (eval_order).
                stored = self.store.answers(eval_id)
                answers = {(item.index, s.name): asyncio.ensure_future(
                               self._answer(eval_id, item, s, semaphore, cancel,
                                            retry=(item.index, s.name) in stored))
                           for s, item in eval_order(spec.systems, items)
                           if not _done(stored.get((item.index, s.name)))}
                try:
                    await asyncio.gather(*(self._item(eval_id, spec, item, judge, semaphore, cancel, [
                        task for (index, _), task in answers.items() if index == item.index]) for item in items))
                finally:
                    for task in answers.values():  # one failed: the others stop with it, as one gather did
                        task.cancel()
            status = "interrupted" if cancel.cancelled else "completed"
        except asyncio.CancelledError:
            status = "interrupted"
        except Exception as exc:
            status, error = "failed", ErrorInfo.of(exc).text()
            raise
        finally:
            try:
                self.store.set_status(eval_id, status, error=error)
            finally:
                with _RUNNING_LOCK:
                    _RUNNING_HERE.discard(eval_id)
        return build_report(self.store, eval_id)

    def _steps(self, eval_id: str, spec: EvalSpec, items: list[EvalItem]) -> int:
        answers, scores, pairs = (self.store.answers(eval_id), self.store.scores(eval_id),
                                  self.store.pairs(eval_id))
        steps = 0
        for item in items:
            for system in spec.systems:
                steps += not _done(answers.get((item.index, system.name)))
                if spec.judge and spec.judge.score:
                    steps += (item.index, system.name, "judge") not in scores
            if spec.judge and spec.judge.pairwise:
                steps += sum((item.index, b.name) not in pairs for b in spec.baselines)
        return steps

    def _tick(self, what: str, steps: int = 0) -> None:
        self.progress.done += steps
        self.progress.last = what or self.progress.last
        if self.on_progress is not None:
            self.on_progress(self.progress)

    async def _item(self, eval_id: str, spec: EvalSpec, item: EvalItem, judge: EngineJudge | None,
                    semaphore: asyncio.Semaphore, cancel: CancelToken, answering: list[asyncio.Future[None]]) -> None:
        """Wait for the item's answers (already queued), then judge them."""
        await asyncio.gather(*answering)
        if cancel.cancelled or judge is None or spec.judge is None:
            return
        answers = self.store.answers(eval_id)
        if not all(_answered(answers.get((item.index, s.name))) for s in spec.systems):
            return
        scores, pairs = self.store.scores(eval_id), self.store.pairs(eval_id)
        tasks = []
        if spec.judge.score:
            tasks += [self._judge_score(eval_id, item, s.name, answers[(item.index, s.name)], judge, semaphore)
                      for s in spec.systems if (item.index, s.name, "judge") not in scores]
        if spec.judge.pairwise:
            tasks += [self._judge_pair(eval_id, item, answers[(item.index, PIPELINE)], b.name,
                                       answers[(item.index, b.name)], judge, semaphore)
                      for b in spec.baselines if (item.index, b.name) not in pairs]
        await asyncio.gather(*tasks)

    async def _answer(self, eval_id: str, item: EvalItem, system: System, semaphore: asyncio.Semaphore,
                      cancel: CancelToken, *, retry: bool = False) -> None:
        async with semaphore:
            if cancel.cancelled:
                return
            outcome = await self.runner.arun(system.pipeline, item.question, mode=system.mode, cancel=cancel,
                                             allow_sequential=True, backend=self.backend)
        run = outcome.run
        if run.status not in ANSWERED:
            return  # cancelled: not stored, a resume runs it again
        if retry:
            self.store.forget_judgement(eval_id, item.index, system.name, pipeline=PIPELINE)
        text = run.final.strip() if run.status in ("completed", "partial") else ""
        prompt_tokens, completion_tokens = run_tokens(run)
        wall = (run.finished_at or time.time()) - run.started_at
        self.store.put_answer(eval_id, item.index, system.name, session_id=outcome.session_id, status=run.status,
                              answer=text, error=run.error.text() if run.error else None, prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens, wall_s=wall)
        reference = score_reference(item, text)
        if reference is not None:
            self.store.put_score(eval_id, item.index, system.name, "reference", float(reference.correct),
                                 reference.to_dict())
        self._tick(f"{item.id} · {system.name}: {run.status}", 1)

    async def _judge_score(self, eval_id: str, item: EvalItem, system: str, answer: dict[str, Any],
                           judge: EngineJudge, semaphore: asyncio.Semaphore) -> None:
        """A rubric score; a run that gave no answer scores 0 without asking; an unreadable verdict is stored
        as an error (no value) so the report counts it, and the eval goes on."""
        value: float | None
        detail: dict[str, Any]
        if not answer["answer"]:
            value, detail = 0.0, {"note": f"no answer (run {answer['status']}): scored 0 without the judge"}
        else:
            async with semaphore:
                try:
                    verdict = await judge_score(judge, judge.model, item.question, answer["answer"],
                                                reference=item.reference_text)
                    value, detail = verdict.score, verdict.to_dict()
                except ChorusError as exc:
                    value, detail = None, {"error": ErrorInfo.of(exc).to_dict()}
        self.store.put_score(eval_id, item.index, system, "judge", value, detail)
        self._tick(f"{item.id} · judge {system}", 1)

    async def _judge_pair(self, eval_id: str, item: EvalItem, pipeline: dict[str, Any], baseline: str,
                          other: dict[str, Any], judge: EngineJudge, semaphore: asyncio.Semaphore) -> None:
        """Pipeline vs one baseline in both orders. An answer against no answer wins without asking."""
        consistent: bool | None = None
        if not pipeline["answer"] or not other["answer"]:
            points = 0.5 if bool(pipeline["answer"]) == bool(other["answer"]) else float(bool(pipeline["answer"]))
            outcome = "win" if points > 0.5 else "loss" if points < 0.5 else "tie"
            detail: dict[str, Any] = {"note": "decided without the judge: one side (or both) gave no answer"}
        else:
            async with semaphore:
                try:
                    pair = await judge_pair(judge, judge.model, item.question, (PIPELINE, pipeline["answer"]),
                                            (baseline, other["answer"]), reference=item.reference_text)
                except ChorusError as exc:
                    self.store.put_pair(eval_id, item.index, baseline, points=0.5, outcome="error", consistent=None,
                                        detail={"error": ErrorInfo.of(exc).to_dict()})
                    self._tick(f"{item.id} · judge pipeline vs {baseline}", 1)
                    return
            points, outcome, consistent, detail = pair.points_a, pair.outcome, pair.consistent, pair.to_dict()
        self.store.put_pair(eval_id, item.index, baseline, points=points, outcome=outcome, consistent=consistent,
                            detail=detail)
        self._tick(f"{item.id} · judge pipeline vs {baseline}", 1)


def eval_order(systems: list[System], items: list[EvalItem]) -> list[tuple[System, EvalItem]]:
    """The order answers are queued in: system by system, each item in turn."""
    return [(system, item) for system in systems for item in items]


def _answered(answer: dict[str, Any] | None) -> bool:
    """Stored with an outcome the judge can score (a failed run scores 0 without asking)."""
    return answer is not None and answer["status"] in ANSWERED


def _done(answer: dict[str, Any] | None) -> bool:
    """Needs no run: answered by a run that completed (a failed one is tried again by `eval resume`)."""
    return answer is not None and answer["status"] in DONE
