"""Run records: what happened in a run, stage by stage and model by model.

Plain dataclasses, JSON-serialisable with `to_dict`; sessions store them and reruns load them back.
An error is stored on the record it belongs to and the run goes on where it can.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from launcher.errors import ChorusError

ResponseStatus = Literal["pending", "ok", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "ok", "partial", "failed", "cancelled", "copied"]
RunStatus = Literal["running", "completed", "partial", "failed", "cancelled", "interrupted"]


@dataclass(frozen=True)
class ErrorInfo:
    """A typed error as stored on a record: what every error has, the data chorus errors carry, the rest in
    `extra`. Records hold it; it becomes a dict only at the edges (session files, API bodies, --json).

    `to_dict` gives the dict `ChorusError.to_dict` gave (or the one read from a file) key for key and in the
    same order, so sessions written before and after this type read and write back identical.
    """

    type: str                          # the exception's class name
    message: str
    hint: str | None = None
    model: str | None = None           # the model the error is about
    reason: str | None = None          # why, in words (ModelUnavailable, StageRefused...)
    detail: str | None = None          # the message without its context (ServerError, ConfigError...)
    need: dict[str, int] | None = None  # InsufficientMemory, RpcWorkerShort: bytes per device or worker
    have: dict[str, int] | None = None
    file: str | None = None            # ConfigError: the file, line and dotted field
    line: int | None = None
    field: str | None = None
    path: str | None = None            # GGUFError, SessionError: the file or folder
    exit_code: int | None = None       # ServerError: how the server ended, its log
    log_path: str | None = None
    log_tail: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other field, as stored
    order: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)  # the stored key order

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """A caught exception as data: a ChorusError with the fields it carries, anything else type and message."""
        if isinstance(exc, ChorusError):
            return cls.from_dict(exc.to_dict(), where=type(exc).__name__)
        return cls(type(exc).__name__, str(exc) or type(exc).__name__)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "error") -> ErrorInfo:
        """An error as stored (a session file, an older chorus): RecordError unless it has a text type and
        message; a field of another type than declared (a newer chorus) stays in `extra`, as it was."""
        if not isinstance(data, dict):
            raise RecordError(where, f"is {_kind(data)}, not an object")
        for name in ("type", "message"):
            if not isinstance(data.get(name), str):
                raise RecordError(where, f"'{name}' is {_kind(data.get(name))}, not text")
        typed: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in copy.deepcopy(data).items():
            if key in _ERROR_FIELDS and _fits(value, _ERROR_FIELDS[key]):
                typed[key] = value
            else:
                extra[str(key)] = value
        return cls(**typed, extra=extra, order=tuple(str(k) for k in data))

    def to_dict(self) -> dict[str, Any]:
        """The stored shape (a deep copy): the keys it was read or made with, in their order, then any field
        set since."""
        values: dict[str, Any] = {name: getattr(self, name) for name in _ERROR_FIELDS}
        values.update(self.extra)
        added = [k for k in values if k not in self.order and (k in ("type", "message") or values[k] is not None)]
        return {k: copy.deepcopy(values[k]) for k in (*self.order, *added) if k in values}

    def text(self) -> str:
        """One line for people: the message, then the hint when there is one."""
        text = self.message or self.type or "error"
        return f"{text} Hint: {self.hint}" if self.hint and self.hint not in text else text


_ERROR_FIELDS: dict[str, Any] = {name: hint for name, hint in typing.get_type_hints(ErrorInfo).items()
                                  if name not in ("extra", "order")}  # field -> its declared type


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
    error: ErrorInfo | None = None
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
    error: ErrorInfo | None = None
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
    error: ErrorInfo | None = None
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
    """A record as JSON-ready data (a deep copy: safe to hand to another thread); errors as their dicts."""
    if isinstance(record, RunRecord):
        return run_to_dict(record)
    data: dict[str, Any] = _plain(record)
    if isinstance(record, StageRecord):
        data["duration_s"] = record.duration_s
    return data


def run_to_dict(run: RunRecord) -> dict[str, Any]:
    data: dict[str, Any] = _plain(run)
    for stage, stage_data in zip(run.stages, data["stages"], strict=True):
        stage_data["duration_s"] = stage.duration_s
    return data


def _plain(value: Any) -> Any:
    """`dataclasses.asdict`, but an ErrorInfo becomes its stored dict (`to_dict`), not its fields."""
    if isinstance(value, ErrorInfo):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


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
        if expected == ErrorInfo | None:  # an error is read into its type
            values[f.name] = None if value is None else ErrorInfo.from_dict(value, where=f"{where}, '{f.name}'")
            continue
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
