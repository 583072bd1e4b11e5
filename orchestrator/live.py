"""A run in a background thread whose progress can be read at any time (the UI polls it).

Streamlit reruns its script on every click, so a run must not live in the script thread: it runs
here, collects events, and a stop button calls `cancel()` from whatever thread it is on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import ChorusError
from orchestrator.engine.events import (
    AggregationDone,
    Event,
    ModelFinished,
    ModelStarted,
    Notice,
    StageFinished,
    StageStarted,
    Token,
)
from orchestrator.engine.run import CancelToken
from orchestrator.records import error_dict, error_text
from orchestrator.runs import RunOutcome


@dataclass
class ModelView:
    label: str
    model: str
    text: str = ""
    status: str = "running"
    error: str | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    seconds: float | None = None


@dataclass
class StageView:
    index: int
    name: str
    status: str = "running"
    models: dict[str, ModelView] = field(default_factory=dict)
    merged_by: str | None = None
    output: str = ""
    error: str | None = None


class LiveRun:
    """Start with a function that runs to completion given (on_event, cancel); read `stages` live."""

    def __init__(self, start: Callable[[Callable[[Event], None], CancelToken], RunOutcome]) -> None:
        self.cancel_token = CancelToken()
        self.stages: list[StageView] = []
        self.notices: list[str] = []
        self.outcome: RunOutcome | None = None
        self.error: dict[str, Any] | None = None
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, args=(start,), name="chorus-live-run", daemon=True)
        self._thread.start()

    def _main(self, start: Callable[[Callable[[Event], None], CancelToken], RunOutcome]) -> None:
        try:
            self.outcome = start(self.on_event, self.cancel_token)
        except ChorusError as exc:
            self.error = error_dict(exc)
        except Exception as exc:  # the UI shows it; a thread must never die silently
            self.error = error_dict(exc)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        self.cancel_token.cancel()

    def on_event(self, event: Event) -> None:
        with self._lock:
            self._apply(event)

    def _apply(self, event: Event) -> None:
        current = self.stages[-1] if self.stages else None
        match event:
            case StageStarted(index=index, stage=name):
                self.stages.append(StageView(index, name))
            case Notice(message=message):
                self.notices.append(message)
            case ModelStarted(label=label, model=model) if current is not None:
                current.models[label] = ModelView(label, model)
            case Token(label=label, text=text) if current is not None:
                view = current.models.get(label)
                if view is not None:
                    view.text += text
            case ModelFinished(response=r) if current is not None:
                view = current.models.setdefault(r.label, ModelView(r.label, r.model))
                view.text, view.status = r.text, r.status
                view.error = error_text(r.error) or None
                view.tokens, view.tokens_per_s, view.seconds = r.completion_tokens, r.tokens_per_s, r.total_s
            case AggregationDone(aggregation=agg) if current is not None:
                current.merged_by = agg.kind
            case StageFinished(record=st):
                stage_view = next((s for s in self.stages if s.name == st.name), None)
                if stage_view is None:  # a stage that failed before any model started (or a copied one) still shows
                    stage_view = StageView(st.index, st.name)
                    self.stages.append(stage_view)
                stage_view.status, stage_view.output = st.status, st.output
                stage_view.error = error_text(st.error) or None

    def snapshot(self) -> list[StageView]:
        """A consistent copy for rendering while the run goes on."""
        with self._lock:
            return [StageView(s.index, s.name, s.status, {k: ModelView(**vars(m)) for k, m in s.models.items()},
                              s.merged_by, s.output, s.error) for s in self.stages]
