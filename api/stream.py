"""A pipeline run as OpenAI chunks: the final answer as content, the rest as a `chorus` extension field.

`RunFeed` is the run's observer. It learns from the plan which call writes the final answer (the last
stage's synthesis call, or its only model when the stage passes one answer through) and turns that
call's tokens into content as they come; every other event becomes a small progress record. Plain
OpenAI clients read `choices[0].delta.content` and never see the records (their delta is empty);
clients that know chorus read the chunk's `chorus` field. When no single call writes the answer
(a vote, a concatenation of several answers, a template), the answer is sent whole when the run ends.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.engine.events import (
    AggregationDone,
    Event,
    ModelFinished,
    ModelStarted,
    Notice,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
    Token,
)
from orchestrator.plan.resolve import RunPlan
from orchestrator.records import RunRecord, error_text

Kind = Literal["chat", "text"]
EventLevel = Literal["none", "progress", "tokens"]


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Progress:
    data: dict[str, Any]


class Done:
    """The run task has ended (its result or exception is on the task)."""


Item = Content | Progress | Done


def answer_writer(plan: RunPlan) -> tuple[str, str, bool] | None:
    """(stage, label, stripped) of the call whose text is the final answer, if one call writes it."""
    if not plan.stages:
        return None
    last = plan.stages[-1]
    kind = last.spec.aggregation.type
    if kind == "synthesis" and last.synthesis is not None:
        return last.name, last.synthesis.label, True  # the synthesis output is stripped
    if kind == "concat" and len(last.calls) == 1:
        return last.name, last.calls[0].label, False  # one answer passes through as it is
    return None


class FinalText:
    """The answer as streamed so far. Trailing whitespace is held back until more text follows (the run's
    answer may end without it); with `strip`, leading whitespace is dropped (a stripped synthesis)."""

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.sent = ""
        self._pending = ""

    def feed(self, piece: str) -> str:
        text = self._pending + piece
        if self.strip and not self.sent:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body):]
        self.sent += body
        return body

    def rest(self, final: str) -> str | None:
        """What is left to send so the client holds `final`; None if the stream went another way."""
        if not final.startswith(self.sent):
            return None
        rest = final[len(self.sent):]
        self.sent = final
        return rest


@dataclass
class RunFeed:
    """The run's observer: events to an asyncio.Queue (it is called on the run's event loop)."""

    queue: asyncio.Queue[Item]
    level: EventLevel = "progress"
    writer: tuple[str, str] | None = None
    text: FinalText = field(default_factory=lambda: FinalText(False))
    started: dict[str, Any] | None = None  # the run_started record, sent once by the stream's first chunk
    began: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            found = answer_writer(event.plan)
            if found is not None:
                self.writer = (found[0], found[1])
                self.text = FinalText(found[2])
            self.started = progress(event)  # not queued: the stream opens with it, session id added
            self.began.set()
            return
        if isinstance(event, Token) and self.writer == (event.stage, event.label):
            piece = self.text.feed(event.text)
            if piece:
                self.queue.put_nowait(Content(piece))
            return
        if self.level == "none" or (isinstance(event, Token) and self.level != "tokens"):
            return
        data = progress(event)
        if data is not None:
            self.queue.put_nowait(Progress(data))


def progress(event: Event) -> dict[str, Any] | None:
    """A small JSON record of an event (stage outputs included; the run's records are in history)."""
    base: dict[str, Any] = {"type": event.type}
    if isinstance(event, RunStarted):
        return {**base, "pipeline": event.plan.pipeline.name, "mode": event.plan.mode,
                "stages": [s.name for s in event.plan.stages]}
    if isinstance(event, StageStarted):
        return {**base, "index": event.index, "stage": event.stage, "labels": list(event.labels)}
    if isinstance(event, ModelStarted):
        return {**base, "stage": event.stage, "label": event.label, "model": event.model}
    if isinstance(event, Token):
        return {**base, "stage": event.stage, "label": event.label, "text": event.text}
    if isinstance(event, ModelFinished):
        r = event.response
        return {**base, "stage": event.stage, "label": r.label, "model": r.model, "status": r.status,
                "completion_tokens": r.completion_tokens, "seconds": r.total_s,
                "error": error_text(r.error) or None}
    if isinstance(event, Notice):
        return {**base, "stage": event.stage, "message": event.message, "waves": event.waves}
    if isinstance(event, AggregationDone):
        return {**base, "stage": event.stage, "aggregation": event.aggregation.kind}
    if isinstance(event, StageFinished):
        s = event.record
        return {**base, "index": s.index, "stage": s.name, "status": s.status, "output": s.output,
                "error": error_text(s.error) or None}
    if isinstance(event, RunFinished):
        return None  # the last chunk says how the run ended, with the session id
    return {**base}


def usage(run: RunRecord) -> dict[str, int]:
    """Tokens over every call of the run (each stage's models and synthesis calls)."""
    prompt = completion = 0
    for stage in run.stages:
        if stage.status == "copied":
            continue
        calls: list[Any] = [(r.prompt_tokens, r.completion_tokens) for r in stage.responses]
        details = stage.aggregation.details if stage.aggregation else {}
        calls += [(c.get("prompt_tokens"), c.get("completion_tokens")) for c in details.get("synthesis_calls", [])]
        for p, c in calls:
            prompt += p or 0
            completion += c or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(run: RunRecord) -> str:
    """'length' when the call that wrote the answer ran out of tokens, else 'stop'."""
    if not run.stages:
        return "stop"
    last = run.stages[-1]
    details = last.aggregation.details if last.aggregation else {}
    writers = [c.get("finish_reason") for c in details.get("synthesis_calls", [])] or [
        r.finish_reason for r in last.responses]
    return "length" if any(w in ("length", "limit") for w in writers) else "stop"


class Chunks:
    """OpenAI chunk objects for one response (chat.completion.chunk or text_completion)."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def chunk(self, *, content: str | None = None, role: bool = False, finish: str | None = None,
              chorus: dict[str, Any] | None = None, usage: dict[str, int] | None = None,
              choices: bool = True) -> str:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "choices": [choice] if choices else []}
        if usage is not None:
            data["usage"] = usage
        if chorus is not None:
            data["chorus"] = chorus
        return sse(data)

    def response(self, text: str, *, finish: str, usage: dict[str, int], chorus: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage, "chorus": chorus}


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


DONE = sse("[DONE]")
HEARTBEAT = ": keep-alive\n\n"  # an SSE comment: clients ignore it; a closed connection shows on the write
