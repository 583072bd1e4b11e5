"""An eval in a background thread whose progress the UI polls (Streamlit reruns its script on every click).

Like orchestrator/live.py's LiveRun: the work runs here, `progress` is read at any time, and a stop
button calls `cancel()` from whatever thread it is on; the eval is left 'interrupted' and can be resumed.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from orchestrator.engine.run import CancelToken
from orchestrator.eval.report import EvalReport
from orchestrator.eval.run import Progress
from orchestrator.records import error_dict

StartFn = Callable[[Callable[[Progress], None], CancelToken], EvalReport]


class LiveEval:
    """Start with a function that runs the eval to the end given (on_progress, cancel)."""

    def __init__(self, eval_id: str, start: StartFn) -> None:
        self.eval_id = eval_id
        self.cancel_token = CancelToken()
        self.report: EvalReport | None = None
        self.error: dict[str, Any] | None = None
        self._progress = Progress()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, args=(start,), name="chorus-live-eval", daemon=True)
        self._thread.start()

    def _main(self, start: StartFn) -> None:
        try:
            self.report = start(self.on_progress, self.cancel_token)
        except Exception as exc:  # the UI shows it; a thread must never die silently
            self.error = error_dict(exc)

    def on_progress(self, progress: Progress) -> None:
        with self._lock:
            self._progress = dataclasses.replace(progress)

    @property
    def progress(self) -> Progress:
        with self._lock:
            return dataclasses.replace(self._progress)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        self.cancel_token.cancel()
