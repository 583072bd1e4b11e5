"""The typed events of a run: one stream, read by every observer (CLI progress, UI, API, the recorder).

The engine calls each observer with each event, in order, on the engine's event loop: an observer must
return quickly (the recorder hands its writes to a writer thread). An observer that raises is logged and
its message kept on the run's warnings; the run goes on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.records import AggregationRecord, ResponseRecord, RunRecord, StageRecord

if TYPE_CHECKING:
    from orchestrator.plan.resolve import RunPlan


@dataclass(frozen=True)
class Event:
    at: float = field(default_factory=time.time, kw_only=True)

    @property
    def type(self) -> str:
        """The event's wire name ('stage_started'), as SSE and JSON logs show it."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()


@dataclass(frozen=True)
class RunStarted(Event):
    run: RunRecord
    plan: RunPlan


@dataclass(frozen=True)
class StageStarted(Event):
    index: int
    stage: str
    labels: list[str]


@dataclass(frozen=True)
class Notice(Event):
    """Something the user should know that is not an error (a stage runs in waves)."""

    stage: str | None
    message: str
    waves: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class ModelStarted(Event):
    stage: str
    label: str
    model: str
    waited_s: float = 0.0  # already spent on this call before it was sent: its server's start, begun ahead


@dataclass(frozen=True)
class Token(Event):
    stage: str
    label: str
    text: str


@dataclass(frozen=True)
class ModelFinished(Event):
    stage: str
    response: ResponseRecord

    @property
    def label(self) -> str:
        return self.response.label


@dataclass(frozen=True)
class AggregationDone(Event):
    stage: str
    aggregation: AggregationRecord


@dataclass(frozen=True)
class StageFinished(Event):
    """A stage ended (ok, partial, failed, cancelled) or was copied from a parent session in a rerun."""

    run: RunRecord
    record: StageRecord

    @property
    def stage(self) -> str:
        return self.record.name


@dataclass(frozen=True)
class RunFinished(Event):
    run: RunRecord


Observer = Callable[[Event], None]

__all__ = ["AggregationDone", "Event", "ModelFinished", "ModelStarted", "Notice", "Observer", "RunFinished",
           "RunStarted", "StageFinished", "StageStarted", "Token"]
