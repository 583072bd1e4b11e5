"""Work in a daemon thread that a front end polls (Streamlit reruns its script on every click).

The work gets a CancelToken that a stop button may trigger from any thread; its result or its error
(as data) is kept for the next rerun to show. A thread must never die silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from orchestrator.engine.run import CancelToken
from orchestrator.records import ErrorInfo

T = TypeVar("T")


class Background(Generic[T]):
    def __init__(self, name: str) -> None:
        self.cancel_token = CancelToken()
        self.result: T | None = None
        self.error: ErrorInfo | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._work: Callable[[CancelToken], T] | None = None

    def _begin(self, work: Callable[[CancelToken], T]) -> None:
        """Start `work` (called last by a subclass's __init__, once its own state exists)."""
        self._work = work
        self._thread.start()

    def _main(self) -> None:
        assert self._work is not None
        try:
            self.result = self._work(self.cancel_token)
        except Exception as exc:  # the UI shows it
            self.error = ErrorInfo.of(exc)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        self.cancel_token.cancel()
