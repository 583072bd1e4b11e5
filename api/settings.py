"""The API's settings, read from the environment `chorus api` gives its uvicorn child."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cli.api import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_KIB,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_RUNS,
    ENV_ALLOWED_HOSTS,
    ENV_HOST,
    ENV_KEY,
    ENV_MAX_BODY,
    ENV_MAX_QUEUE,
    ENV_MAX_RUNS,
    check_bind,
)
from orchestrator.config.hosts import allowed_host_entry
from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class ApiSettings:
    host: str = DEFAULT_HOST
    api_key: str | None = None
    max_runs: int = DEFAULT_MAX_RUNS
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a place; one more answers 429 with Retry-After
    max_body_bytes: int = DEFAULT_MAX_BODY_KIB * 1024
    heartbeat_s: float = 2.0   # an SSE comment when a stream is idle: a gone client is noticed within this
    allowed_hosts: tuple[str, ...] | None = None  # Host: names besides loopback; None: app.yaml's api.allowed_hosts

    def __post_init__(self) -> None:
        check_bind(self.host, self.api_key)  # also when uvicorn is started by hand on 0.0.0.0
        if self.max_runs < 1 or self.max_body_bytes < 1:
            raise ConfigError("chorus api", "max_runs and max_body_bytes must be at least 1")
        if self.max_queue < 0:
            raise ConfigError("chorus api", "max_queue must be 0 or more", field="max_queue")
        if self.allowed_hosts is not None:
            try:
                object.__setattr__(self, "allowed_hosts", tuple(allowed_host_entry(h) for h in self.allowed_hosts))
            except ValueError as exc:
                raise ConfigError("chorus api", str(exc), field="allowed_hosts") from None

    @classmethod
    def from_env(cls) -> ApiSettings:
        return cls(host=os.environ.get(ENV_HOST, DEFAULT_HOST), api_key=os.environ.get(ENV_KEY) or None,
                   max_runs=_int_env(ENV_MAX_RUNS, DEFAULT_MAX_RUNS),
                   max_queue=_int_env(ENV_MAX_QUEUE, DEFAULT_MAX_QUEUE),
                   max_body_bytes=_int_env(ENV_MAX_BODY, DEFAULT_MAX_BODY_KIB * 1024),
                   allowed_hosts=_list_env(ENV_ALLOWED_HOSTS))


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name}", f"not an integer: {raw!r}") from None


def _list_env(name: str) -> tuple[str, ...] | None:
    """A comma-separated list; None when the variable is unset (app.yaml decides)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return tuple(allowed_host_entry(item) for item in raw.split(",") if item.strip())
    except ValueError as exc:
        raise ConfigError(f"${name}", str(exc)) from None
