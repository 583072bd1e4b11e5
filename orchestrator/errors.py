"""Orchestrator-side errors; all are ChorusError so callers catch one family."""

from __future__ import annotations

from launcher.errors import (  # re-exported: front ends catch the one family from here, never from launcher
    BinaryNotFound,
    ChorusError,
    GGUFError,
    InsufficientMemory,
    RequestFailed,
    RequestTimeout,
    ServerCrashed,
    ServerError,
)


class ConfigError(ChorusError):
    """A config file cannot be read or does not fit its schema.

    Carries the file, the 1-based line when YAML gives one, and the dotted field path.
    """

    def __init__(
        self,
        file: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = file + (f", line {line}" if line else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}", hint=hint)
        self.file = file
        self.line = line
        self.field = field
        self.detail = message


class ModelUnavailable(ChorusError):
    """A pipeline asked for a model the registry could not register."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model '{model}' is unavailable: {reason}",
                         hint="Run `chorus models` to see which models are registered and why others are not.")
        self.model = model
        self.reason = reason


class PipelineBlocked(ChorusError):
    """Base mode cannot run because models of the base pipeline are unavailable."""

    def __init__(self, missing: dict[str, str]) -> None:
        names = ", ".join(f"{m} ({r})" for m, r in missing.items())
        super().__init__(f"the base pipeline is blocked: {names}",
                         hint="Fix or add those models, or use manual mode with the models that are available.")
        self.missing = dict(missing)


__all__ = ["BinaryNotFound", "ChorusError", "ConfigError", "GGUFError", "InsufficientMemory", "ModelUnavailable",
           "PipelineBlocked", "RequestFailed", "RequestTimeout", "ServerCrashed", "ServerError"]
