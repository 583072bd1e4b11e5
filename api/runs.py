"""Pipeline runs for HTTP requests: start one on the event loop, answer it whole or as a stream.

A run is an asyncio task around the front door's `Chorus.arun` with a `RunFeed` observer; the response only reads the
feed's queue. The run holds a place of the admission (api/admission.py: a limit, then a bounded queue)
until the task ends, not until the response ends, so a client that goes away cannot leave more runs
going than the limit. A client that goes away
cancels its run (CancelToken): noticed on the next write (a heartbeat is written while a stream is
idle) or, for a non-streamed answer, by polling the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.admission import Admission
from api.catalog import PipelineModel
from api.errors import error_body, status_of
from api.mapping import check_pipeline_request, history_kwargs, with_sampling
from api.schemas import CompletionFields
from api.stream import (
    DONE,
    HEARTBEAT,
    Chunks,
    Content,
    Done,
    Item,
    Progress,
    Reasoning,
    RunFeed,
    finish_reason,
    sse,
    usage,
)
from orchestrator.app import Chorus
from orchestrator.engine.backend import Backend
from orchestrator.engine.run import CancelToken
from orchestrator.history.recorder import Recorder
from orchestrator.history.store import SessionStore
from orchestrator.records import ErrorInfo
from orchestrator.runs import RunOutcome

log = logging.getLogger("chorus.api")

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5
GONE = 499  # nginx's "client closed request": nobody reads it, the logs do


class NotifyingStore(SessionStore):
    """The session store, telling the request which session its run got as soon as it is created."""

    def __init__(self, sessions_dir: Path, created: asyncio.Future[str | None]) -> None:
        super().__init__(sessions_dir)
        self._created = created

    def create(self, snapshot: dict[str, Any]) -> Recorder:
        try:
            recorder = super().create(snapshot)
        except BaseException:
            self._settle(None)  # the run goes on unsaved; the response must not wait for a session
            raise
        self._settle(recorder.id)
        return recorder

    def _settle(self, session_id: str | None) -> None:
        if not self._created.done():
            self._created.set_result(session_id)


@dataclass
class StartedRun:
    task: asyncio.Task[RunOutcome]
    feed: RunFeed
    cancel: CancelToken
    session_id: str | None
    history_used: bool
    ignored: list[str]

    @property
    def queue(self) -> asyncio.Queue[Item]:
        return self.feed.queue


class PipelineRuns:
    def __init__(self, chorus: Chorus, limiter: Admission, *,
                 backend_factory: Callable[[], Backend] | None = None) -> None:
        self.chorus = chorus
        self.limiter = limiter
        self.backend_factory = backend_factory
        self.tasks: set[asyncio.Task[RunOutcome]] = set()
        self.tokens: set[CancelToken] = set()

    async def start(self, entry: PipelineModel, request: CompletionFields, question: str,
                    history: list[dict[str, str]], client: Request) -> StartedRun | None:
        """Start the run; returns once it has begun (its session created, its RunStarted seen) or ended;
        None if the client left while the request waited for its place (no run, no session).

        Errors raised before anything runs (a bad question, an aggregator not allowed) are raised here,
        so they answer with their status code rather than inside a stream.
        """
        check_pipeline_request(request)
        pipeline = entry.pipeline.with_spec(with_sampling(entry.pipeline.spec, request))
        loop = asyncio.get_running_loop()
        created: asyncio.Future[str | None] = loop.create_future()
        feed = RunFeed(asyncio.Queue(), level=request.chorus.events)
        cancel = CancelToken()
        extra = history_kwargs(history)
        store = NotifyingStore(self.chorus.config.sessions_dir, created)
        backend = self.backend_factory() if self.backend_factory else None
        if not await admitted(client, self.limiter):  # a place, or a wait in the queue (429 when it is full)
            return None
        admitted_at = time.monotonic()
        task = asyncio.ensure_future(self.chorus.arun(pipeline, question, observers=[feed], cancel=cancel,
                                                      allow_sequential=True, backend=backend, store=store, **extra))
        self.tasks.add(task)
        self.tokens.add(cancel)

        def finished(t: asyncio.Task[RunOutcome]) -> None:
            self.limiter.release(time.monotonic() - admitted_at)
            self.tasks.discard(t)
            self.tokens.discard(cancel)
            feed.queue.put_nowait(Done())

        task.add_done_callback(finished)
        began = asyncio.ensure_future(feed.began.wait())  # so the stream's first chunk has the whole run_started
        try:
            await asyncio.wait({began, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            began.cancel()
        error = task.exception() if task.done() else None
        if error is not None:
            raise error
        session_id = created.result() if created.done() else task.result().session_id
        return StartedRun(task, feed, cancel, session_id, bool(extra), request.ignored())

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Cancel every run and give them `grace_s` to record how they ended."""
        for token in list(self.tokens):
            token.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace_s)


def summary(run: StartedRun, outcome: RunOutcome) -> dict[str, Any]:
    """The `chorus` field of an answer: where the run was saved and how each stage went."""
    record = outcome.run
    return {"type": "run_finished", "session_id": outcome.session_id, "status": record.status,
            "history_error": outcome.history_error, "history_used": run.history_used, "ignored": run.ignored,
            "stages": [{"name": s.name, "status": s.status} for s in record.stages],
            "warnings": list(record.warnings)}


def failure(outcome: RunOutcome) -> ErrorInfo:
    """The typed error of a run that gave no answer."""
    record = outcome.run
    if record.status == "cancelled":
        return ErrorInfo("Cancelled", "the run was cancelled")
    return record.error or ErrorInfo("RunFailed", f"the run ended {record.status} without an answer")


def answered(outcome: RunOutcome) -> bool:
    return outcome.run.status in ("completed", "partial")


async def until_done_or_gone(request: Request, coro: Coroutine[Any, Any, T] | asyncio.Future[T],
                             on_gone: Callable[[], None]) -> tuple[bool, T | None]:
    """Await `coro` while watching the connection; (False, None) and `on_gone()` if the client left first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return True, task.result()
            if await request.is_disconnected():
                on_gone()
                return False, None
    finally:
        if not task.done():
            task.cancel()


async def admitted(request: Request, limiter: Admission, *, ahead: bool = False) -> bool:
    """A place from `limiter` (TooManyRuns when its queue is full), or False if the client left while it
    waited in the queue: nobody listens for a disconnect while a handler awaits, so the wait watches the
    connection itself, and the place is given up (or passed on, had it come just then)."""
    if limiter.acquire_now(ahead=ahead):
        return True
    waiting = asyncio.ensure_future(limiter.acquire(ahead=ahead))
    finished, _ = await until_done_or_gone(request, waiting, lambda: None)
    if not finished and waiting.done() and not waiting.cancelled() and waiting.exception() is None:
        limiter.release()  # the place came as the client was found gone
    return finished


async def answer(request: Request, run: StartedRun, chunks: Chunks) -> Response:
    """The non-streamed answer: wait for the run (cancelled if the client leaves), then one JSON body."""
    finished, _ = await until_done_or_gone(request, asyncio.shield(run.task), run.cancel.cancel)
    if not finished:
        return Response(status_code=GONE)
    outcome = run.task.result()
    headers = {"X-Chorus-Session": outcome.session_id} if outcome.session_id else {}
    if not answered(outcome):
        error = failure(outcome)
        return JSONResponse(error_body(error, session_id=outcome.session_id), status_code=status_of(error).http,
                            headers=headers)
    record = outcome.run
    body = chunks.response(record.final, finish=finish_reason(record), usage=usage(record),
                           chorus=summary(run, outcome), reasoning=run.feed.reasoning)
    return JSONResponse(body, headers=headers)


async def stream(run: StartedRun, chunks: Chunks, *, include_usage: bool, heartbeat_s: float) -> AsyncIterator[str]:
    """The streamed answer: the earlier calls as reasoning, the final answer as content, progress in
    `chorus`, then [DONE].

    Leaving this generator early (the client went away) cancels the run.
    """
    getter: asyncio.Future[Item] | None = None
    try:
        started = {"type": "run_started", **(run.feed.started or {}), "session_id": run.session_id}
        yield chunks.chunk(role=True, content="", chorus=started)  # the only run_started of the stream
        while True:
            if getter is None:
                getter = asyncio.ensure_future(run.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=heartbeat_s)
            if not done:
                yield HEARTBEAT
                continue
            item, getter = getter.result(), None
            if isinstance(item, Content):
                yield chunks.chunk(content=item.text)
            elif isinstance(item, Reasoning):
                yield chunks.chunk(reasoning=item.text)
            elif isinstance(item, Progress):
                yield chunks.chunk(chorus=item.data)
            elif isinstance(item, Done):
                break
        try:
            outcome = run.task.result()
        except Exception as exc:  # Runner.arun does not raise once running; if it does, say so in the stream
            log.exception("pipeline run failed")
            yield sse(error_body(exc, session_id=run.session_id))
            yield DONE
            return
        if answered(outcome):
            record = outcome.run
            rest = run.feed.text.rest(record.final)
            if rest:
                yield chunks.chunk(content=rest)
            elif rest is None:  # the streamed tokens are not the answer's start: give the answer whole
                yield chunks.chunk(chorus={"type": "final", "text": record.final})
            yield chunks.chunk(finish=finish_reason(record), chorus=summary(run, outcome))
            if include_usage:
                yield chunks.chunk(usage=usage(record), choices=False)
        else:
            yield sse(error_body(failure(outcome), session_id=outcome.session_id))
        yield DONE
    finally:
        if getter is not None:
            getter.cancel()
        if not run.task.done():
            run.cancel.cancel()
            log.info("client left: run of session %s cancelled", run.session_id)
