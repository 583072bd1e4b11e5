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
    ServerUnreachable,
    connection_reason,
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
    """A pipeline cannot run because models it names are unavailable: the base pipeline (base mode), or the
    catalogued `pipeline` (`chorus/<name>` of the API)."""

    pipeline: str | None = None  # on the class: a record of the base pipeline's stays as it was

    def __init__(self, missing: dict[str, str], *, pipeline: str | None = None) -> None:
        names = ", ".join(f"{m} ({r})" for m, r in missing.items())
        which = "the base pipeline" if pipeline is None else f"the pipeline '{pipeline}'"
        super().__init__(f"{which} is blocked: {names}",
                         hint="Fix or add those models, or use manual mode with the models that are available.")
        self.missing = dict(missing)
        if pipeline is not None:
            self.pipeline = pipeline


__all__ = ["BinaryNotFound", "ChorusError", "ConfigError", "GGUFError", "InsufficientMemory", "ModelUnavailable",
           "PipelineBlocked", "RequestFailed", "RequestTimeout", "ServerCrashed", "ServerError", "ServerUnreachable",
           "connection_reason"]
