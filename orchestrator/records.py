"""Run records: what happened in a run, stage by stage and model by model.

Plain dataclasses, JSON-serialisable with `to_dict`; sessions store them and reruns load them back.
An error is stored on the record it belongs to and the run goes on where it can.
"""

from __future__ import annotations

import functools
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from launcher.errors import ChorusError

ResponseStatus = Literal["pending", "ok", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "ok", "partial", "failed", "cancelled", "copied"]
RunStatus = Literal["running", "completed", "partial", "failed", "cancelled", "interrupted"]


def error_dict(exc: BaseException) -> dict[str, Any]:
    """A typed error as data: its type, message and the fields it carries."""
    if isinstance(exc, ChorusError):
        return exc.to_dict()
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
    finish_reason: str | None = None  # 'stop', 'length' (max_tokens reached)...
    server_timings: dict[str, Any] = field(default_factory=dict)  # llama-server's own timings
    server: str | None = None  # which server answered (base URL)
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


@dataclass
class StageRecord:
    index: int  # 1-based, as in stepN.json
    name: str
    system_prompt: str = ""
    prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    execution: str = ""
    waves: list[list[str]] = field(default_factory=list)
    # per wave, as the scheduler decided it when the wave ran: its servers (model, labels, slots, started
    # or warm), the warm servers stopped before it, and its need vs what was usable
    wave_servers: list[dict[str, Any]] = field(default_factory=list)
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
    history: list[dict[str, str]] = field(default_factory=list)  # earlier chat turns ({role, content}), from the API


# ---------------------------------------------------------------- the one serializer (record <-> JSON data)


class RecordError(ChorusError):
    """Stored data does not have the shape of its record (a damaged or hand-edited file)."""

    def __init__(self, where: str, message: str) -> None:
        joined = " " if message.startswith(("is ", "has ")) else ": "  # 'step1.json is null', 'x.json: 'a' is 3'
        super().__init__(f"{where}{joined}{message}")
        self.where = where
        self.detail = message


def to_dict(record: Any) -> dict[str, Any]:
    """A record as JSON-ready data (a deep copy: safe to hand to another thread)."""
    if isinstance(record, RunRecord):
        return run_to_dict(record)
    data = asdict(record)
    if isinstance(record, StageRecord):
        data["duration_s"] = record.duration_s
    return data


def run_to_dict(run: RunRecord) -> dict[str, Any]:
    data = asdict(run)
    for stage, stage_data in zip(run.stages, data["stages"], strict=True):
        stage_data["duration_s"] = stage.duration_s
    return data


def response_from_dict(data: Any, *, where: str = "response") -> ResponseRecord:
    return ResponseRecord(**_checked(ResponseRecord, data, where))


def aggregation_from_dict(data: Any, *, where: str = "aggregation") -> AggregationRecord:
    return AggregationRecord(**_checked(AggregationRecord, data, where))


def stage_from_dict(data: Any, *, where: str = "stage") -> StageRecord:
    values = _checked(StageRecord, data, where, nested=("responses", "aggregation"))
    responses = data.get("responses", [])
    if not isinstance(responses, list):
        raise RecordError(where, f"'responses' is {_kind(responses)}, not a list")
    values["responses"] = [response_from_dict(r, where=f"{where}, response {i + 1}") for i, r in enumerate(responses)]
    agg = data.get("aggregation")
    values["aggregation"] = aggregation_from_dict(agg, where=f"{where}, aggregation") if agg is not None else None
    return StageRecord(**values)


def run_from_dict(data: Any, *, where: str = "run") -> RunRecord:
    values = _checked(RunRecord, data, where, nested=("stages",))
    stages = data.get("stages", [])
    if not isinstance(stages, list):
        raise RecordError(where, f"'stages' is {_kind(stages)}, not a list")
    values["stages"] = [stage_from_dict(s, where=f"{where}, stage {i + 1}") for i, s in enumerate(stages)]
    return RunRecord(**values)


def _checked(cls: type, data: Any, where: str, nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` found in `data`, each of its declared type; unknown keys are ignored (newer files)."""
    if not isinstance(data, dict):
        raise RecordError(where, f"is {_kind(data)}, not an object")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecordError(where, f"has no '{f.name}'")
            continue
        if f.name in nested:
            continue
        value, expected = data[f.name], _hints(cls)[f.name]
        if not _fits(value, expected):
            raise RecordError(where, f"'{f.name}' is {_kind(value)}, not {_expected(expected)}")
        values[f.name] = value
    return values


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if origin is Literal:
        return isinstance(value, str)  # a status from a newer version is still a status
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or expected)


def _expected(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_expected(arg) for arg in typing.get_args(expected))
    names = {str: "text", int: "an integer", float: "a number", bool: "true/false", type(None): "null",
             list: "a list", dict: "an object"}
    return names.get(typing.get_origin(expected) or expected, "text")


def _kind(value: Any) -> str:
    names = {type(None): "null", list: "a list", dict: "an object", str: "text", bool: "true/false",
             int: "a number", float: "a number"}
    shown = repr(value) if isinstance(value, str | int | float) and len(repr(value)) <= 40 else ""
    return names.get(type(value), type(value).__name__) + (f" ({shown})" if shown else "")
