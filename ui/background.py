"""Work in a daemon thread that a front end polls (Streamlit reruns its script on every click).

The work gets a CancelToken that a stop button may trigger from any thread; its result or its error
(as data) is kept for the next rerun to show. A thread must never die silently.

Every piece of work in progress is also listed in the process-wide `ACTIVE`: a browser session's own
handle (st.session_state) is gone after a reload, and the work must still be found there to be watched
and stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from orchestrator.engine.run import CancelToken
from orchestrator.records import ErrorInfo

T = TypeVar("T")


class Background(Generic[T]):
    def __init__(self, name: str, title: str = "") -> None:
        self.title = title  # what the user started, for a page that finds it in ACTIVE
        self.started_at = time.time()
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
        ACTIVE.add(self)

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


W = TypeVar("W", bound=Background)  # type: ignore[type-arg]


class Active:
    """The background work of this process still running, oldest first (done work drops out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work: list[Background] = []  # type: ignore[type-arg]

    def add(self, work: Background) -> None:  # type: ignore[type-arg]
        with self._lock:
            self._work = [w for w in self._work if not w.done] + [work]

    def running(self, kind: type[W]) -> list[W]:
        with self._lock:
            self._work = [w for w in self._work if not w.done]
            return [w for w in self._work if isinstance(w, kind)]


ACTIVE = Active()
