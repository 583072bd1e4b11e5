"""A run in a background thread whose progress can be read at any time (the UI polls it).

Streamlit reruns its script on every click, so a run must not live in the script thread: it runs
here, collects events, and a stop button calls `cancel()` from whatever thread it is on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
from orchestrator.runs import RunOutcome
from ui.background import Background


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


class LiveRun(Background[RunOutcome]):
    """Start with a function that runs to completion given (on_event, cancel); read `stages` live."""

    def __init__(self, start: Callable[[Callable[[Event], None], CancelToken], RunOutcome], title: str = "") -> None:
        super().__init__("chorus-live-run", title)
        self.stages: list[StageView] = []
        self.notices: list[str] = []
        self._begin(lambda cancel: start(self.on_event, cancel))

    @property
    def outcome(self) -> RunOutcome | None:
        return self.result

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
                view.error = r.error.text() if r.error else None
                view.tokens, view.tokens_per_s, view.seconds = r.completion_tokens, r.tokens_per_s, r.total_s
            case AggregationDone(aggregation=agg) if current is not None:
                current.merged_by = agg.kind
            case StageFinished(record=st):
                stage_view = next((s for s in self.stages if s.name == st.name), None)
                if stage_view is None:  # a stage that failed before any model started (or a copied one) still shows
                    stage_view = StageView(st.index, st.name)
                    self.stages.append(stage_view)
                stage_view.status, stage_view.output = st.status, st.output
                stage_view.error = st.error.text() if st.error else None

    def snapshot(self) -> list[StageView]:
        """A consistent copy for rendering while the run goes on."""
        with self._lock:
            return [StageView(s.index, s.name, s.status, {k: ModelView(**vars(m)) for k, m in s.models.items()},
                              s.merged_by, s.output, s.error) for s in self.stages]
