"""What `chorus run` shows while it runs: a progress display on stderr, the answer streamed to stdout.

An observer of the engine's typed events. On a terminal the models that are running sit in a small area
at the bottom of stderr, redrawn in place (ANSI cursor moves, no extra dependency) with each one's tokens,
tokens per second and elapsed time; finished steps scroll above it as plain lines. When stderr is not a
terminal (a log file, CI) only the plain lines are written. The final stage's answer goes to stdout as
it is generated, so `chorus run ... | less` and a terminal both see it grow; a merge that is not one
model's text (concat of several, a vote) is printed by the caller when the run ends.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

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
from orchestrator.records import ResponseRecord

CLEAR_BELOW = "\x1b[J"      # erase from the cursor to the end of the screen


def cursor_up_lines(n: int) -> str:
    """Move to the start of the line `n` lines up (CPL)."""
    return f"\x1b[{n}F" if n > 0 else ""


def answer_call(plan: RunPlan) -> tuple[str, str] | None:
    """(stage, label) of the call whose text is the run's answer, when one call's tokens are the answer:
    the synthesis call of a last stage merged by synthesis, or the only call of a last stage passed through
    by concat. None when the answer is built from several texts (concat, vote, template, judge)."""
    if not plan.stages:
        return None
    last = plan.stages[-1]
    kind = last.spec.aggregation.type
    if kind == "synthesis" and last.synthesis is not None:
        return last.name, last.synthesis.label
    if kind == "concat" and len(last.calls) == 1:
        return last.name, last.calls[0].label
    return None


@dataclass
class CallProgress:
    """One running model call as the display counts it (a streamed piece is one token)."""

    label: str
    model: str
    started: float
    tokens: int = 0
    first_token: float | None = None

    def line(self, now: float) -> str:
        elapsed = now - self.started
        if self.first_token is None:
            return f"  {self.label} ({self.model}): waiting for the first token  {elapsed:5.1f}s"
        generating = now - self.first_token
        rate = self.tokens / generating if generating > 0.05 else 0.0
        return (f"  {self.label} ({self.model}): {self.tokens:5d} tokens  {rate:6.1f} tok/s  "
                f"{elapsed:5.1f}s")


class AnswerStream:
    """The answer's tokens to stdout as they come: leading whitespace dropped and trailing whitespace held
    back, so what is printed is the stripped answer; a reader that went away (`| head`) ends it quietly."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.pieces: list[str] = []
        self._held = ""
        self.started = False
        self.broken_pipe = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def write(self, piece: str) -> None:
        self.pieces.append(piece)
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        stripped = piece.rstrip()
        if not stripped:  # only whitespace: held until text follows it
            self._held += piece
            return
        self._emit(self._held + stripped)
        self._held = piece[len(stripped):]

    def end(self) -> None:
        """The answer is complete: end its line (trailing whitespace is dropped)."""
        if self.started:
            self._emit("\n")
        self._held = ""

    def _emit(self, text: str) -> None:
        if self.broken_pipe:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            self.broken_pipe = True


class ProgressPrinter:
    """The run's observer for a terminal: progress on `err`, the answer's tokens on `answer_out`.

    `live` (default: whether `err` is a terminal) redraws the running models in place; a ticker thread
    keeps elapsed times moving while a model loads or thinks. Events arrive on the engine's loop: each
    only updates counters or writes a line, under one lock shared with the ticker.
    """

    def __init__(self, err: TextIO | None = None, *, answer_out: TextIO | None = None, live: bool | None = None,
                 refresh_s: float = 0.25, clock: Callable[[], float] = time.monotonic, tick: bool = True) -> None:
        self.err = err if err is not None else sys.stderr
        self.answer = AnswerStream(answer_out) if answer_out is not None else None
        self.live = _isatty(self.err) if live is None else live
        # an answer streaming to the same terminal pauses the redraws; one piped elsewhere does not
        self._answer_on_terminal = answer_out is not None and _isatty(answer_out)
        self.refresh_s = refresh_s
        self.clock = clock
        self.tick = tick               # redraw on a timer too, so elapsed times move while no token comes
        self._last_draw = 0.0
        self.total = 0
        self.plan: RunPlan | None = None  # the run's plan, for what a stage does besides calling models
        self.running: dict[tuple[str, str], CallProgress] = {}
        self._answer_key: tuple[str, str] | None = None
        self._answer_open = False
        self.answered = False          # the answer call finished ok after its tokens were streamed
        self._drawn = 0                # lines of the live area now on screen
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def streamed(self) -> str:
        return self.answer.text if self.answer is not None else ""

    @property
    def broken_pipe(self) -> bool:
        return self.answer is not None and self.answer.broken_pipe

    def answer_shown(self, final: str | None) -> bool:
        """Whether `final` is already on stdout, streamed (then the caller must not print it again)."""
        return self.answered and final is not None and final.strip() == self.streamed.strip()

    # ---------------------------------------------------------------- events

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._handle(event)

    def _handle(self, event: Event) -> None:
        match event:
            case RunStarted(run=run, plan=plan):
                self.total = len(run.pipeline.get("stages", []))
                self.plan = plan
                self._answer_key = answer_call(plan) if self.answer is not None else None
            case StageStarted(index=index, stage=stage, labels=labels):
                self._line(f"[{index}/{self.total}] {stage}: {self._stage_work(index, labels)}")
            case Notice(message=message):
                self._line(f"  note: {message}")
            case ModelStarted(stage=stage, label=label, model=model, waited_s=waited_s):
                self.running[(stage, label)] = CallProgress(label, model, self.clock() - waited_s)
                self._start_ticker()
                self._redraw()
            case Token(stage=stage, label=label, text=text):
                self._token(stage, label, text)
            case ModelFinished(stage=stage, response=r):
                call = self.running.pop((stage, r.label), None)
                if (stage, r.label) == self._answer_key and self._answer_open:
                    assert self.answer is not None
                    self.answer.end()
                    self._answer_open = False
                    self.answered = r.ok
                self._line(_finished(r, self.clock() - call.started if call is not None else None))
            case AggregationDone(aggregation=agg) if len(agg.inputs) > 1:
                extra = f" (agreement {agg.details['agreement']:.0%})" if "agreement" in agg.details else ""
                self._line(f"  merged by {agg.kind}{extra}")
            case StageFinished(record=st) if st.status not in ("ok", "copied"):
                err = st.error.text() if st.error else ""
                self._line(f"  stage {st.name}: {st.status}" + (f": {err}" if err else ""))
            case RunFinished():
                self.close()

    def _stage_work(self, index: int, labels: list[str]) -> str:
        """The model calls of a stage, or what a retrieve stage (no model) reads."""
        stages = self.plan.stages if self.plan is not None else []
        retrieval = stages[index - 1].retrieval if 0 < index <= len(stages) else None
        if retrieval is not None:
            return f"retrieve from {retrieval.collection} (top_k {retrieval.top_k})"
        return ", ".join(labels)

    def _token(self, stage: str, label: str, text: str) -> None:
        call = self.running.get((stage, label))
        if call is not None:
            call.tokens += 1
            if call.first_token is None:
                call.first_token = self.clock()
            if self.clock() - self._last_draw >= self.refresh_s:
                self._redraw()
        if (stage, label) == self._answer_key and self.answer is not None:
            if not self._answer_open:
                if self._answer_on_terminal:  # the answer takes the terminal: no redraws until it ends
                    self._clear()
                self._answer_open = True
            self.answer.write(text)

    # ---------------------------------------------------------------- drawing

    def _line(self, text: str) -> None:
        """A permanent line above the live area."""
        self._clear()
        self._write(text + "\n")
        self._redraw()

    def _redraw(self) -> None:
        if not self.live or (self._answer_open and self._answer_on_terminal):
            return
        now = self.clock()
        width = max(20, _columns(self.err) - 1)  # a wrapped line would break the cursor arithmetic
        lines = [call.line(now)[:width] for call in self.running.values()]
        if not lines and not self._drawn:
            return
        self._write(cursor_up_lines(self._drawn) + CLEAR_BELOW + "".join(f"{line}\n" for line in lines))
        self._drawn = len(lines)
        self._last_draw = now

    def _clear(self) -> None:
        if self.live and self._drawn:
            self._write(cursor_up_lines(self._drawn) + CLEAR_BELOW)
            self._drawn = 0

    def _write(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except (OSError, ValueError):  # a closed or gone stderr costs the progress display only
            pass

    # ---------------------------------------------------------------- ticker

    def _start_ticker(self) -> None:
        if not self.live or not self.tick or self._ticker is not None:
            return

        def tick() -> None:
            while not self._stop.wait(max(self.refresh_s, 0.05)):
                with self._lock:
                    if self.running:
                        self._redraw()

        self._ticker = threading.Thread(target=tick, name="chorus-progress", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop redrawing and leave the terminal clean (called on RunFinished; safe to call again)."""
        self._stop.set()
        with self._lock:
            self.running.clear()
            self._clear()
            if self._answer_open and self.answer is not None:
                self.answer.end()
                self._answer_open = False


def _finished(r: ResponseRecord, call_s: float | None = None) -> str:
    """A finished call's line. Its time is the call's whole time on the live line's clock (`call_s`, from
    ModelStarted: a server start included), so it ends where the live line stopped; the part spent before
    the request (a server starting, a busy slot) is named when it is noticeable."""
    if r.ok:
        rate = f", {r.tokens_per_s:.1f} tok/s" if r.tokens_per_s else ""
        cut = " (cut at max_tokens)" if r.finish_reason == "length" else ""
        request_s = r.total_s or 0.0
        took = max(call_s or 0.0, request_s)
        wait = took - request_s
        waited = f" ({wait:.1f}s of it waiting for its server)" if wait >= 0.5 else ""
        return f"  {r.label}: {r.completion_tokens or 0} tokens in {took:.1f}s{rate}{cut}{waited}"
    return f"  {r.label}: {r.status.upper()}: {r.error.text() if r.error else ''}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size().columns  # $COLUMNS, else 80
