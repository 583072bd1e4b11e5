"""chorus's typed errors as OpenAI error bodies with the status codes OpenAI clients act on.

The same table serves a live exception (walked up its class hierarchy, so a new subclass of
ServerStartError is still a 502) and an error a run recorded on its step (an ErrorInfo with its type's
name: the engine never raises, it records). The body keeps OpenAI's shape, `{"error": {message, type, param,
code}}`, plus what chorus knows (the model, need vs have, the hint) for clients that look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ChorusError
from orchestrator.records import ErrorInfo


@dataclass(frozen=True)
class Status:
    http: int
    type: str   # OpenAI's error type: invalid_request_error, server_error...
    code: str   # a stable machine-readable code


NOT_FOUND = Status(404, "invalid_request_error", "model_not_found")
BAD_REQUEST = Status(400, "invalid_request_error", "invalid_request")
NO_MEMORY = Status(503, "server_error", "insufficient_memory")
UPSTREAM = Status(502, "server_error", "model_server_error")
PIPELINE = Status(500, "server_error", "pipeline_error")  # the pipeline's own templates or merge failed
INTERNAL = Status(500, "server_error", "internal_error")

# chorus error type name -> status. Keys are class names so recorded errors (ErrorInfo) map the same way.
STATUS_BY_TYPE: dict[str, Status] = {
    "ModelUnavailable": NOT_FOUND,
    "PipelineBlocked": NOT_FOUND,
    "ConfigError": BAD_REQUEST,
    "QuestionError": BAD_REQUEST,
    "InvalidServerSpec": BAD_REQUEST,
    "InsufficientMemory": NO_MEMORY,
    "ServerOutOfMemory": NO_MEMORY,
    "StageRefused": NO_MEMORY,
    "RunRefused": NO_MEMORY,
    "AggregatorNotAllowed": BAD_REQUEST,
    "ServerStartTimeout": Status(504, "server_error", "model_server_timeout"),
    "RequestTimeout": Status(504, "server_error", "model_server_timeout"),
    "ServerStartError": UPSTREAM,
    "ServerCrashed": UPSTREAM,
    "RequestFailed": UPSTREAM,
    "SynthesisFailed": UPSTREAM,
    "ServerError": UPSTREAM,
    "GGUFError": UPSTREAM,
    "BinaryNotFound": Status(503, "server_error", "llama_server_not_found"),
    "TooManyRuns": Status(429, "rate_limit_error", "too_many_runs"),
    "Unauthorized": Status(401, "invalid_request_error", "invalid_api_key"),
    "HostNotAllowed": Status(403, "invalid_request_error", "host_not_allowed"),
    "BodyTooLarge": Status(413, "invalid_request_error", "request_too_large"),
    "Cancelled": Status(499, "server_error", "cancelled"),
    "ShuttingDown": Status(503, "server_error", "shutting_down"),
    "TemplateError": PIPELINE,
    "AggregationError": PIPELINE,
    "SessionError": Status(500, "server_error", "history_error"),
    "RecordError": Status(500, "server_error", "history_error"),
}

# fields of a chorus error worth showing a client (never the server's command line or log tail)
PUBLIC_FIELDS = ("model", "need", "have", "hint", "reason", "reasons", "missing", "stage", "exit_code", "field",
                 "limit")


class ApiError(ChorusError):
    """An error of the API itself (not of a run): the request, its size, its key, the run limit."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


class BadRequest(ApiError):
    pass


class TooManyRuns(ApiError):
    """The queue is full: `limit` going and `queued` waiting. `retry_after_s` goes out as Retry-After."""

    def __init__(self, limit: int, *, queued: int = 0, retry_after_s: int = 1) -> None:
        super().__init__(f"too many requests at once: {limit} going and {queued} waiting, the queue is full",
                         hint=f"Retry in about {retry_after_s} s, or raise the limits with `chorus api "
                              "--max-runs/--max-queue`.")
        self.limit = limit
        self.queued = queued
        self.retry_after_s = retry_after_s


class Unauthorized(ApiError):
    pass


class HostNotAllowed(ApiError):
    """A request naming a host this API does not answer (DNS rebinding: see orchestrator/config/hosts.py)."""

    def __init__(self, host: str | None, allowed: str) -> None:
        shown = "no Host header" if host is None else f"Host {host[:100]!r}"
        super().__init__(f"{shown} is not allowed: this API answers {allowed}",
                         hint="Use http://127.0.0.1:PORT or http://localhost:PORT, or add the name to "
                              "api.allowed_hosts in app.yaml (or `chorus api --allowed-host NAME`).")
        self.host = host[:100] if host is not None else None


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes",
                         hint="Send a shorter request, or raise `chorus api --max-body-kib`.")
        self.limit = limit


def status_of(error: BaseException | ErrorInfo) -> Status:
    """The status of a live error (by its class and its parents) or of a recorded one (by its type name;
    a type this process does not know by the data it carries)."""
    if isinstance(error, BaseException):
        names = [cls.__name__ for cls in type(error).__mro__]
    else:
        known = _error_types().get(error.type)
        names = [cls.__name__ for cls in known.__mro__] if known else [error.type]
        if error.need is not None and error.have is not None:
            names.append("InsufficientMemory")
        if error.exit_code is not None or error.log_tail is not None:
            names.append("ServerError")
    if isinstance(error, BadRequest):
        return BAD_REQUEST
    for name in names:
        if name in STATUS_BY_TYPE:
            return STATUS_BY_TYPE[name]
    return INTERNAL


def _error_types() -> dict[str, type]:
    """Every ChorusError subclass loaded, by name: a recorded error's type name gives its parents too."""
    found: dict[str, type] = {}
    todo: list[type] = [ChorusError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_body(error: BaseException | ErrorInfo, *, session_id: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for `error`, with chorus's data beside it (a recorded error serialised here)."""
    status = status_of(error)
    if isinstance(error, BaseException):
        data: dict[str, Any] = error.to_dict() if isinstance(error, ChorusError) else {
            "type": type(error).__name__, "message": str(error)}
        message = str(error)
    else:
        data, message = error.to_dict(), error.text()
    body: dict[str, Any] = {"message": message, "type": status.type, "param": data.get("param"),
                            "code": status.code, "chorus_type": data.get("type")}
    body.update({k: data[k] for k in PUBLIC_FIELDS if data.get(k) is not None})
    if session_id:
        body["session_id"] = session_id
    return {"error": body}


__all__ = [
    "STATUS_BY_TYPE",
    "ApiError",
    "BadRequest",
    "BodyTooLarge",
    "HostNotAllowed",
    "Status",
    "TooManyRuns",
    "Unauthorized",
    "error_body",
    "status_of",
]
