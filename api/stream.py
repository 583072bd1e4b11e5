"""A pipeline run as OpenAI chunks: the answer as content, the earlier stages as reasoning, the rest in `chorus`.

`RunFeed` is the run's observer. It learns from the plan which call writes the final answer (the last
stage's synthesis call, or its only model when the stage passes one answer through) and turns that
call's tokens into content as they come. Every other model call streams live as `reasoning_content`
(`Thinking`: a header per stage and model, then its text), the field llama-server, DeepSeek and the
chat front ends (Open WebUI, LibreChat) use for "the model is working": a plain OpenAI client shows
progress from the first call on instead of an empty stream until the synthesis starts. The pipeline's
`defaults.stream_reasoning: false` or a request's `reasoning_format: "none"` turns that off. Every event
also becomes a small progress record in the chunk's `chorus` field, for clients that know chorus. When
no single call writes the answer (a vote, a concatenation of several answers, a template), every call
is reasoning and the answer is sent whole when the run ends.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
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
from orchestrator.records import RunRecord

Kind = Literal["chat", "text"]
EventLevel = Literal["none", "progress", "tokens"]


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Progress:
    data: dict[str, Any]


class Done:
    """The run task has ended (its result or exception is on the task)."""


Item = Content | Reasoning | Progress | Done


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


ROLES = {"synthesis": "synthesis", "judge": "judge", "majority_vote": "tie-break"}  # an aggregation call's role
RETRIEVAL = ""  # the label of a retrieve stage's one block (it has no model call)


def call_names(plan: RunPlan) -> dict[tuple[str, str], str]:
    """What each call's header calls it: its label, with the model when the label is another name; an
    aggregation call by its role; a retrieve stage by its collection."""
    names: dict[tuple[str, str], str] = {}
    for stage in plan.stages:
        for call in stage.calls:
            names[stage.name, call.label] = call.label if call.label == call.model else f"{call.label} ({call.model})"
        if stage.synthesis is not None:
            role = ROLES.get(stage.spec.aggregation.type, "aggregation")
            names[stage.name, stage.synthesis.label] = f"{role} ({stage.synthesis.model})"
        if stage.retrieval is not None:
            names[stage.name, RETRIEVAL] = f"passages from '{stage.retrieval.collection}'"
    return names


@dataclass
class Block:
    """One call's part of the reasoning: a header line, then the call's text."""

    header: str
    text: FinalText = field(default_factory=lambda: FinalText(True))
    held: str = ""       # written while another call was on air
    on_air: bool = False
    done: bool = False


class Thinking:
    """The reasoning stream: every call but the answer's writer, under a header, one call at a time.

    A stage's parallel calls write at once; their tokens interleaved would be unreadable, and a reader of
    a thinking block reads one model at a time anyway. So one call is *on air*: its header goes out when
    it starts (before its server is leased, so a client sees which model is working even during a cold
    start) and its tokens as they come. The others' text is held; when the call on air finishes, the next
    in start order (the stage's order) goes on air: its header and what it wrote so far at once, then its
    tokens live; one that already finished goes out whole. Each model's text reads whole under its own
    header, and while any call runs the one on air is running, so the block never stalls behind a finished
    call. `text` is everything sent: a non-streamed answer's `reasoning_content` is the same text.
    """

    def __init__(self, plan: RunPlan, writer: tuple[str, str] | None, send: Callable[[str], None]) -> None:
        self.names = call_names(plan)
        self.retrieving = {s.name for s in plan.stages if s.retrieval is not None}
        self.writer = writer
        self.text = ""
        self._send_out = send
        self._order: list[Block] = []                    # started, not yet sent whole, in start order
        self._running: dict[tuple[str, str], Block] = {}  # by (stage, label)

    def __call__(self, event: Event) -> None:
        if isinstance(event, ModelStarted):
            key = (event.stage, event.label)
            if key == self.writer:  # the answer follows as content: say whose it is, after any reasoning
                if self.text or self._order:
                    self._begin(key, " → the answer", done=True)
            else:
                self._running[key] = self._begin(key)
        elif isinstance(event, Token):
            block = self._running.get((event.stage, event.label))
            if block is not None:
                self._write(block, block.text.feed(event.text))
        elif isinstance(event, ModelFinished):
            r = event.response
            why = (r.error.message if r.error else "") or "error"  # the hint is for the operator: in `chorus`
            note = f"_(failed: {why})_" if r.status == "failed" else ""
            self._end((event.stage, r.label), note)
        elif isinstance(event, StageStarted) and event.stage in self.retrieving:
            self._running[event.stage, RETRIEVAL] = self._begin((event.stage, RETRIEVAL))
        elif isinstance(event, AggregationDone) and event.aggregation.kind == "retrieve":
            found = len(event.aggregation.details.get("passages", []))
            self._end((event.stage, RETRIEVAL), f"{found} passage{'' if found == 1 else 's'} found.")

    def _begin(self, key: tuple[str, str], suffix: str = "", *, done: bool = False) -> Block:
        block = Block(f"## {key[0]} · {self.names.get(key, key[1])}{suffix}", done=done)
        self._order.append(block)
        self._pump()
        return block

    def _write(self, block: Block, piece: str) -> None:
        if not piece:
            return
        if block.on_air:
            self._send(piece)
        else:
            block.held += piece

    def _end(self, key: tuple[str, str], note: str) -> None:
        block = self._running.pop(key, None)
        if block is None:
            return
        if note:
            self._write(block, block.text.feed(("\n\n" if block.text.sent else "") + note))
        block.done = True
        self._pump()

    def _pump(self) -> None:
        """Put the first unfinished block on air, sending every finished one before it whole."""
        while self._order:
            block = self._order[0]
            if not block.on_air:
                block.on_air = True
                gap = "" if not self.text or self.text.endswith("\n\n") else "\n\n"
                self._send(f"{gap}{block.header}\n\n{block.held}")
                block.held = ""
            if not block.done:
                return
            self._order.pop(0)

    def _send(self, text: str) -> None:
        self.text += text
        self._send_out(text)


@dataclass
class RunFeed:
    """The run's observer: events to an asyncio.Queue (it is called on the run's event loop)."""

    queue: asyncio.Queue[Item]
    level: EventLevel = "progress"
    writer: tuple[str, str] | None = None
    text: FinalText = field(default_factory=lambda: FinalText(False))
    started: dict[str, Any] | None = None  # the run_started record, sent once by the stream's first chunk
    began: asyncio.Event = field(default_factory=asyncio.Event)
    thinking: Thinking | None = None  # the reasoning stream, unless the run's pipeline turned it off

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            found = answer_writer(event.plan)
            if found is not None:
                self.writer = (found[0], found[1])
                self.text = FinalText(found[2])
            if event.plan.pipeline.defaults.stream_reasoning:
                self.thinking = Thinking(event.plan, self.writer, lambda t: self.queue.put_nowait(Reasoning(t)))
            self.started = progress(event)  # not queued: the stream opens with it, session id added
            self.began.set()
            return
        if self.thinking is not None:
            self.thinking(event)
        if isinstance(event, Token) and self.writer == (event.stage, event.label):
            piece = self.text.feed(event.text)
            if piece:
                self.queue.put_nowait(Content(piece))
            if self.level != "tokens":  # "tokens": every stage's, the answer's too
                return
        if self.level == "none" or (isinstance(event, Token) and self.level != "tokens"):
            return
        data = progress(event)
        if data is not None:
            self.queue.put_nowait(Progress(data))

    @property
    def reasoning(self) -> str | None:
        """The reasoning sent so far; None when the run streams none."""
        return self.thinking.text if self.thinking is not None and self.thinking.text else None


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
                "error": r.error.text() if r.error else None}
    if isinstance(event, Notice):
        return {**base, "stage": event.stage, "message": event.message, "waves": event.waves}
    if isinstance(event, AggregationDone):
        return {**base, "stage": event.stage, "aggregation": event.aggregation.kind}
    if isinstance(event, StageFinished):
        s = event.record
        return {**base, "index": s.index, "stage": s.name, "status": s.status, "output": s.output,
                "error": s.error.text() if s.error else None}
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

    def chunk(self, *, content: str | None = None, reasoning: str | None = None, role: bool = False,
              finish: str | None = None, chorus: dict[str, Any] | None = None, usage: dict[str, int] | None = None,
              choices: bool = True) -> str:
        """One chunk. Reasoning is `delta.reasoning_content` (chat) or `choices[0].reasoning_content` beside
        an empty `text` (text completions, which have no delta)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            if reasoning is not None:
                delta["reasoning_content"] = reasoning
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
            if reasoning is not None:
                choice["reasoning_content"] = reasoning
            obj = "text_completion"
        data: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "choices": [choice] if choices else []}
        if usage is not None:
            data["usage"] = usage
        if chorus is not None:
            data["chorus"] = chorus
        return sse(data)

    def response(self, text: str, *, finish: str, usage: dict[str, int], chorus: dict[str, Any],
                 reasoning: str | None = None) -> dict[str, Any]:
        """The non-streamed answer; reasoning in `message.reasoning_content` (chat) or the choice's (text)."""
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if reasoning is not None:
                choice["reasoning_content"] = reasoning
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage, "chorus": chorus}


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


DONE = sse("[DONE]")
HEARTBEAT = ": keep-alive\n\n"  # an SSE comment: clients ignore it; a closed connection shows on the write
