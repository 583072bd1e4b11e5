"""Run records: what happened in a run, stage by stage and model by model.

Plain dataclasses, JSON-serialisable with `to_dict`; sessions store them and reruns load them back.
An error is stored on the record it belongs to and the run goes on where it can.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ResponseStatus = Literal["pending", "ok", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "ok", "partial", "failed", "cancelled", "copied"]
RunStatus = Literal["running", "completed", "failed", "cancelled"]


def error_dict(exc: BaseException) -> dict[str, Any]:
    """A typed error as data: its type, message and the fields it carries."""
    to_dict = getattr(exc, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def error_text(error: dict[str, Any] | None) -> str:
    """One line for people: the message, then the hint when there is one."""
    if not error:
        return ""
    text = str(error.get("message") or error.get("type") or "error")
    hint = error.get("hint")
    return f"{text} Hint: {hint}" if hint and hint not in text else text


@dataclass
class ResponseRecord:
    """One model's answer within a stage."""

    label: str
    model: str
    system_prompt: str = ""
    prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    status: ResponseStatus = "pending"
    error: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    total_s: float | None = None
    tokens_per_s: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class AggregationRecord:
    """How a stage's answers were merged: the kind, the inputs, and what the method decided."""

    kind: str
    inputs: list[dict[str, str]] = field(default_factory=list)
    output: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None


@dataclass
class StageRecord:
    index: int  # 1-based, as in stepN.json
    name: str
    system_prompt: str = ""
    prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    execution: str = ""
    waves: list[list[str]] = field(default_factory=list)
    responses: list[ResponseRecord] = field(default_factory=list)
    aggregation: AggregationRecord | None = None
    output: str = ""
    status: StageStatus = "pending"
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def response(self, label: str) -> ResponseRecord | None:
        return next((r for r in self.responses if r.label == label), None)


@dataclass
class RunRecord:
    question: str
    mode: Literal["base", "manual"]
    pipeline: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    status: RunStatus = "running"
    final: str = ""
    error: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    parent_session: str | None = None
    rerun_from_stage: int | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. history that could not be written

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)


def to_dict(record: Any) -> dict[str, Any]:
    data = asdict(record)
    if isinstance(record, StageRecord):
        data["duration_s"] = record.duration_s
    return data


def response_from_dict(data: dict[str, Any]) -> ResponseRecord:
    return ResponseRecord(**_known(ResponseRecord, data))


def stage_from_dict(data: dict[str, Any]) -> StageRecord:
    values = _known(StageRecord, data)
    values["responses"] = [response_from_dict(r) for r in data.get("responses", [])]
    agg = data.get("aggregation")
    values["aggregation"] = AggregationRecord(**_known(AggregationRecord, agg)) if agg else None
    return StageRecord(**values)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
