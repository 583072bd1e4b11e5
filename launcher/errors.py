"""The one error hierarchy of chorus. Errors carry data (file, line, need vs. have), not just text.

It lives in the launcher, the lowest layer, so every layer above can raise and catch the same types.
"""

from __future__ import annotations

from launcher.units import fmt_bytes


class ChorusError(Exception):
    """Base of every error chorus raises on purpose; the CLI prints these without a traceback."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe record, for storing the error on a step or printing it with --json."""
        data = {k: v for k, v in vars(self).items() if _json_safe(v)}
        data["type"] = type(self).__name__
        data["hint"] = self.hint  # often set on the class, so not in vars()
        return data


def _json_safe(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | tuple | dict)


class GGUFError(ChorusError):
    """A file is not a readable GGUF model (wrong magic, truncated, unsupported version...)."""

    def __init__(self, path: str, message: str, *, offset: int | None = None) -> None:
        super().__init__(f"{path}: {message}", hint="Check that the file is a complete .gguf model.")
        self.path = path
        self.offset = offset


BUILD_COMMAND = "scripts/build_llama_server.sh"


class BinaryNotFound(ChorusError):
    """No llama-server binary where we looked."""

    def __init__(self, searched: list[str], problem: str = "not found") -> None:
        super().__init__(f"llama-server {problem} (looked in: {', '.join(searched)})",
                         hint=f"Build it from a chorus checkout with `{BUILD_COMMAND}` (about 9 minutes on 2 "
                              "cores); it lands in the checkout's bin/ and in ~/.cache/chorus/bin/, where an "
                              "installed chorus finds it too. Or set `llama_server:` in app.yaml or $LLAMA_SERVER "
                              "to an existing binary, or put one at $CHORUS_HOME/bin/llama-server or on PATH.")
        self.searched = list(searched)


class ServerError(ChorusError):
    """A llama-server failed; carries what a user needs to see why."""

    kind = "server error"

    def __init__(self, model: str, message: str, *, command: list[str] | None = None,
                 log_tail: str = "", exit_code: int | None = None, log_path: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(f"model '{model}': {self.kind}: {message}", hint=hint)
        self.model = model
        self.detail = message
        self.command = list(command or [])
        self.log_tail = log_tail
        self.exit_code = exit_code
        self.log_path = log_path


class ServerStartError(ServerError):
    kind = "server failed to start"


class ServerOutOfMemory(ServerStartError):
    kind = "out of memory"
    hint = "Use a smaller n_ctx, fewer GPU layers (n_gpu_layers), or stop other models first."


class InvalidModelFile(ServerStartError):
    kind = "invalid model file"
    hint = "Check that the .gguf file is complete and was made for this llama.cpp version."


class PortInUse(ServerStartError):
    kind = "port in use"


class ServerStartTimeout(ServerStartError):
    kind = "server did not become ready in time"
    hint = "Raise server.startup_timeout_s in app.yaml, or check the server log."


class ServerCrashed(ServerError):
    kind = "server crashed"
    hint = "The server is restarted on the next request; its log may say why it died."


class ServerStopped(ServerCrashed):
    """Stopped on purpose (`chorus stop`, the UI's Models page) while a request used it: not a crash, and
    no signal or out-of-memory story to tell."""

    kind = "server stopped"
    hint = "It was stopped while this request used it; the next request starts it again."


class ServerUnreachable(ServerCrashed):
    """Nothing answered at the server's address (refused, unknown host). A ServerCrashed, so a local server
    is restarted and a replica marked down; its own kind so the message says "no answer" once."""

    kind = "no answer"


def connection_reason(exc: BaseException) -> str:
    """Why a connection failed, in words ("connection refused"), from the OSError that httpx, anyio or a
    socket wrapped, so messages never nest one library's text inside another's."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, OSError) and cause.errno is not None and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class RequestTimeout(ServerError):
    kind = "request timed out"
    hint = "Raise server.request_timeout_s in app.yaml, or lower max_tokens."


class RequestFailed(ServerError):
    kind = "request failed"


class InsufficientMemory(ChorusError):
    """A model does not fit in what is free. `need` and `have` map device ('ram', 'gpu0'...) to bytes."""

    def __init__(self, model: str, need: dict[str, int], have: dict[str, int],
                 suggestions: list[str] | None = None) -> None:
        short = [d for d in need if need[d] > have.get(d, 0)]
        parts = ", ".join(f"{d}: needs {fmt_bytes(need[d])}, {fmt_bytes(have.get(d, 0))} free" for d in short or need)
        self.suggestions = list(suggestions or [])
        super().__init__(f"model '{model}' does not fit in memory ({parts})",
                         hint="; ".join(self.suggestions) or None)
        self.model = model
        self.need = dict(need)
        self.have = dict(have)


class InvalidServerSpec(ChorusError):
    """A server setting out of range (n_ctx, slots, n_gpu_layers...), caught before llama-server sees it."""

    def __init__(self, model: str, field: str, value: object, minimum: int) -> None:
        super().__init__(f"model '{model}': {field} must be at least {minimum}, got {value}",
                         hint=f"Set {field} to {minimum} or more.")
        self.model = model
        self.field = field
        self.value = value
        self.minimum = minimum


class ServerFilesUnwritable(ServerStartError):
    """The server's log, state or key file cannot be written: a logs dir that is read-only, missing or not ours."""

    kind = "cannot write the server's files"

    def __init__(self, model: str, path: str, reason: str, *, command: list[str] | None = None) -> None:
        super().__init__(model, f"{path}: {reason}", command=command,
                         hint="Point logs_dir in app.yaml at a folder you can write (it holds the server logs, "
                              f"the running/ records and the runtime/ key files), or fix the permissions of {path}.")
        self.path = path

