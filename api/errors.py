"""chorus's typed errors as OpenAI error bodies with the status codes OpenAI clients act on.

The same table serves a live exception (walked up its class hierarchy, so a new subclass of
ServerStartError is still a 502) and an error a run recorded on its step (an ErrorInfo with its type's
name: the engine never raises, it records). The body keeps OpenAI's shape, `{"error": {message, type, param,
code}}`, plus what chorus knows (the model, need vs have, the hint) for clients that look.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
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
# a prompt longer than the model's context: the request's fault, as OpenAI says it (not a 502 to retry)
CONTEXT = Status(400, "invalid_request_error", "context_length_exceeded")
CONTEXT_HINT = ("The prompt is longer than the model's context (n_ctx): send a shorter question or conversation, "
                "or raise n_ctx (a pipeline's defaults.n_ctx, a model's default_n_ctx in models.yaml).")

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


# how llama-server (exceed_context_size_error, "exceeds the available context size") and OpenAI-compatible
# servers (context_length_exceeded, "maximum context length") say that a prompt does not fit
_CONTEXT_TEXT = re.compile(r"exceed_context_size_error|exceeds the available context size|context_length_exceeded"
                           r"|maximum context length", re.IGNORECASE)
# a request failure that carries the upstream's answer: "HTTP 400 from URL: {body}" (launcher/process/client.py)
_REQUEST_ERRORS = ("RequestFailed", "SynthesisFailed")
_HTTP_400 = re.compile(r"\bHTTP 400 from ")


def context_overflow(error: BaseException | ErrorInfo) -> bool:
    """Whether `error` is a model server's HTTP 400 for a prompt over its context (a request failure, live or
    recorded, or a synthesis that failed for that reason): the request's fault, not the server's."""
    if isinstance(error, BaseException):
        names = {cls.__name__ for cls in type(error).__mro__}
        text = str(error)
    else:
        known = _error_types().get(error.type)
        names = {cls.__name__ for cls in known.__mro__} if known else {error.type}
        text = f"{error.message} {error.detail or ''}"
    return (any(name in names for name in _REQUEST_ERRORS) and _HTTP_400.search(text) is not None
            and _CONTEXT_TEXT.search(text) is not None)


def status_of(error: BaseException | ErrorInfo) -> Status:
    """The status of a live error (by its class and its parents) or of a recorded one (by its type name;
    a type this process does not know by the data it carries)."""
    if context_overflow(error):
        return CONTEXT
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
    if status is CONTEXT and not body.get("hint"):
        body["hint"] = CONTEXT_HINT
    if session_id:
        body["session_id"] = session_id
    return {"error": body}


# llama-server answers 500 for a request it could not parse (tools, messages, an image to a text model): the
# request's fault, so 400 (the openai package retries a 5xx three times)
_PARSE_FAILURE = re.compile(r"^Failed to parse|Missing tool|\bExpected\b|Unsupported|is not supported"
                            r"|\[json\.exception\.", re.IGNORECASE)
# the request field a llama-server message is about: the first pattern that matches, then the first of its
# fields the request sent (a JSON schema may come as `json_schema` or in `response_format`), else its first
_PARAM_IN_MESSAGE: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"Field '([A-Za-z_][\w.]*)'"), ()),  # (): the field the message names
    (re.compile(r"Failed to parse messages|image input|audio input", re.I), ("messages",)),
    (re.compile(r"Failed to parse tools|Missing tool function|Unsupported tool type|\btools\b", re.I), ("tools",)),
    (re.compile(r"\btool_choice\b", re.I), ("tool_choice",)),
    (re.compile(r"\bresponse_format\b", re.I), ("response_format",)),
    (re.compile(r"\bjson_schema\b|JSON schema", re.I), ("json_schema", "response_format")),
    (re.compile(r"\bgrammar\b", re.I), ("grammar", "json_schema", "response_format", "tools")),
    (re.compile(r"\bmessages?\b|\bcontent\b", re.I), ("messages",)),
    (re.compile(r"\bprompt\b", re.I), ("prompt",)),
)
# llama-server's error types (server-common: error_type) as string codes; others by status
_CODE_BY_TYPE = {"exceed_context_size_error": "context_length_exceeded", "authentication_error": "invalid_api_key",
                 "not_found_error": "not_found", "permission_error": "permission_denied",
                 "unavailable_error": "model_server_unavailable", "not_supported_error": "not_supported"}
_KEPT_FIELDS = ("n_prompt_tokens", "n_ctx")  # llama-server's numbers for a context overflow


def upstream_error(status: int, data: Any, *, model: str, route: str,
                   sent: Collection[str] | None = None) -> tuple[int, dict[str, Any]]:
    """A model server's error answer (llama-server's `{"error": {code: 500, message, type}}`, an OpenAI-compatible
    server's, or anything else) as (status, OpenAI's error body): `type` invalid_request_error for 4xx, a string
    `code` (context_length_exceeded for a prompt over the context, as OpenAI says it), `param` when the message
    names the field (one of `sent`, the request's fields, when given), the message kept, the model named. A
    request llama-server could not parse is 400, not its 500. `route` ("chat/completions" or "completions") says
    which field a context overflow is about."""
    raw = data.get("error") if isinstance(data, dict) else None
    error: dict[str, Any] = raw if isinstance(raw, dict) else {}
    message = error.get("message") if isinstance(error.get("message"), str) else None
    if not message:
        message = raw if isinstance(raw, str) and raw else _text(data)
    upstream_type = error.get("type") if isinstance(error.get("type"), str) else None
    upstream_code = error.get("code") if isinstance(error.get("code"), str) and error.get("code") else None
    overflow = upstream_type == "exceed_context_size_error" or upstream_code == "context_length_exceeded" or (
        400 <= status < 500 and _CONTEXT_TEXT.search(message) is not None)
    if status >= 500 and not overflow and _PARSE_FAILURE.search(message):
        status = 400
    if overflow and status >= 500:
        status = 400
    code = ("context_length_exceeded" if overflow else upstream_code or _CODE_BY_TYPE.get(upstream_type or "")
            or ("invalid_request" if status == 400 else "not_found" if status == 404
                else "model_server_error" if status >= 500 else f"http_{status}"))
    param = error.get("param") if isinstance(error.get("param"), str) else None
    if param is None and overflow:
        param = "messages" if route == "chat/completions" else "prompt"
    if param is None and 400 <= status < 500:
        param = _param_in(message, sent)
    kind = ("rate_limit_error" if status == 429 else "invalid_request_error" if 400 <= status < 500
            else "server_error")
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code, "model": model}
    body.update({k: error[k] for k in _KEPT_FIELDS if isinstance(error.get(k), int)})
    return status, {"error": body}


def _param_in(message: str, sent: Collection[str] | None) -> str | None:
    for pattern, params in _PARAM_IN_MESSAGE:
        found = pattern.search(message)
        if found is None:
            continue
        if not params:
            return found.group(1)
        return next((p for p in params if sent is None or p in sent), params[0])
    return None


def _text(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (text or "the model server answered an error without a message")[:500]


__all__ = [
    "STATUS_BY_TYPE",
    "ApiError",
    "BadRequest",
    "BodyTooLarge",
    "HostNotAllowed",
    "Status",
    "TooManyRuns",
    "Unauthorized",
    "context_overflow",
    "error_body",
    "status_of",
    "upstream_error",
]


# pydantic's tag for a branch of a union in an error's `loc` ("str", "list[str]", "function-after[...]",
# "StreamOptions"...): not a field the client sent, so never part of `param`
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "bytes", "list", "dict", "any", "tuple", "set"})
_TAG_SHAPE = re.compile(r"[\[(]|^[A-Z]|^(constrained|lax|json|function|tagged|literal|nullable|is)-")


def clean_loc(loc: tuple[Any, ...] | list[Any]) -> list[str]:
    """An error's `loc` as the fields the client sent: without FastAPI's "body" and pydantic's union-branch tags."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return [str(p) for p in parts if isinstance(p, int) or not (p in _UNION_TAGS or _TAG_SHAPE.search(str(p)))]


def invalid_body(errors: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """FastAPI's validation errors as one OpenAI error: 400 invalid_json for a body that is not JSON, else 422
    naming the field. Of a union's errors (one per branch), the one deepest into what was sent is shown."""
    if not errors:
        return 422, {"error": {"message": "invalid request body", "type": "invalid_request_error", "param": None,
                               "code": "invalid_value"}}
    if errors[0].get("type") == "json_invalid":
        why = (errors[0].get("ctx") or {}).get("error")
        message = f"the request body is not valid JSON: {why}" if why else "the request body is not valid JSON"
        return 400, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                               "code": "invalid_json"}}
    locs = [clean_loc(e.get("loc", ())) for e in errors]
    first = max(range(len(errors)), key=lambda i: (len(locs[i]) if locs[i][:len(locs[0])] == locs[0] else -1, -i))
    param = ".".join(locs[first]) or None
    message = f"{param or 'body'}: {errors[first].get('msg', 'invalid value')}"
    return 422, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                           "code": "invalid_value"}}
