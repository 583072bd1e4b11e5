"""An eval in a background thread whose progress the UI polls (Streamlit reruns its script on every click).

Like ui/live.py's LiveRun: the work runs here, `progress` is read at any time, and a stop
button calls `cancel()` from whatever thread it is on; the eval is left 'interrupted' and can be resumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from orchestrator.engine.run import CancelToken
from orchestrator.eval.report import EvalReport
from orchestrator.eval.run import Progress
from ui.background import Background

StartFn = Callable[[Callable[[Progress], None], CancelToken], EvalReport]


class LiveEval(Background[EvalReport]):
    """Start with a function that runs the eval to the end given (on_progress, cancel)."""

    def __init__(self, eval_id: str, start: StartFn) -> None:
        super().__init__("chorus-live-eval", eval_id)
        self.eval_id = eval_id
        self._progress = Progress()
        self._begin(lambda cancel: start(self.on_progress, cancel))

    @property
    def report(self) -> EvalReport | None:
        return self.result

    def on_progress(self, progress: Progress) -> None:
        with self._lock:
            self._progress = dataclasses.replace(progress)

    @property
    def progress(self) -> Progress:
        with self._lock:
            return dataclasses.replace(self._progress)
