"""The API's settings, read from the environment `chorus api` gives its uvicorn child."""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.cli.api import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_KIB,
    DEFAULT_MAX_RUNS,
    ENV_HOST,
    ENV_KEY,
    ENV_MAX_BODY,
    ENV_MAX_RUNS,
    check_bind,
)
from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class ApiSettings:
    host: str = DEFAULT_HOST
    api_key: str | None = None
    max_runs: int = DEFAULT_MAX_RUNS
    max_body_bytes: int = DEFAULT_MAX_BODY_KIB * 1024
    heartbeat_s: float = 2.0   # an SSE comment when a stream is idle: a gone client is noticed within this

    def __post_init__(self) -> None:
        check_bind(self.host, self.api_key)  # also when uvicorn is started by hand on 0.0.0.0
        if self.max_runs < 1 or self.max_body_bytes < 1:
            raise ConfigError("chorus api", "max_runs and max_body_bytes must be at least 1")

    @classmethod
    def from_env(cls) -> ApiSettings:
        return cls(host=os.environ.get(ENV_HOST, DEFAULT_HOST), api_key=os.environ.get(ENV_KEY) or None,
                   max_runs=_int_env(ENV_MAX_RUNS, DEFAULT_MAX_RUNS),
                   max_body_bytes=_int_env(ENV_MAX_BODY, DEFAULT_MAX_BODY_KIB * 1024))


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name}", f"not an integer: {raw!r}") from None
