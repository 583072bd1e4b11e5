"""A scripted backend: replies, delays, failures and crashes per model, for millisecond orchestration tests.

It is a real `Backend` (the same protocol as the pool + httpx one), so the engine cannot tell; it also
records what it was asked (requests, endpoints, concurrency) so a test can check the orchestration.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from launcher.errors import ChorusError, RequestTimeout, ServerCrashed
from launcher.process.client import Endpoint, GenerationRequest, GenerationResult
from orchestrator.engine.backend import TokenCallback, WavePlan, WaveStep
from orchestrator.engine.replicas import ReplicaSet
from orchestrator.plan.resolve import CallPlan, StagePlan, Target
from orchestrator.records import ErrorInfo

Reply = str | Callable[[GenerationRequest], str] | BaseException


@dataclass
class Script:
    """What one model does: its reply (text, a function of the request, or an error to raise) and a delay."""

    reply: Reply = "ok"
    delay_s: float = 0.0
    tokens: int | None = None   # completion tokens reported; default: words in the reply


@dataclass
class FakeBackend:
    scripts: dict[str, Script] = field(default_factory=dict)
    default: Script = field(default_factory=Script)
    waves: Callable[[list[CallPlan]], WavePlan] | None = None  # per group of calls; default: all together
    # what happened
    requests: list[tuple[str, GenerationRequest]] = field(default_factory=list)
    endpoints_opened: list[Target] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    waves_started: list[list[str]] = field(default_factory=list)
    prepared: list[list[str]] = field(default_factory=list)  # the stages each run announced before it started
    active: int = 0
    peak_active: int = 0
    # replicas (targets with several urls): a URL here fails at the connection level, as a dead server does
    failing_urls: set[str] = field(default_factory=set)
    marked_down: list[str] = field(default_factory=list)
    replica_sets: dict[tuple[str, ...], ReplicaSet] = field(default_factory=dict)

    def script(self, model: str, reply: Reply = "ok", *, delay_s: float = 0.0) -> FakeBackend:
        self.scripts[model] = Script(reply, delay_s)
        return self

    @contextlib.asynccontextmanager
    async def endpoint(self, target: Target) -> AsyncIterator[Endpoint]:
        self.endpoints_opened.append(target)
        if len(target.urls) > 1:
            replicas = self.replica_sets.setdefault(target.urls, ReplicaSet(target.urls))
            url = replicas.choose()
            try:
                yield Endpoint(target.model, url, "chat", None, remote=True)
            finally:
                replicas.release(url)
            return
        yield Endpoint(target.model, f"fake://{target.model}", "chat", None, remote=target.kind == "remote")

    async def generate(self, endpoint: Endpoint, request: GenerationRequest,
                       on_token: TokenCallback | None = None) -> GenerationResult:
        script = self.scripts.get(endpoint.model, self.default)
        self.requests.append((endpoint.model, request))
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            if endpoint.base_url in self.failing_urls:
                raise ServerCrashed(endpoint.model, f"connection to {endpoint.base_url} lost: refused")
            reply = script.reply
            if isinstance(reply, BaseException):
                raise reply
            text = reply(request) if callable(reply) else reply
            for word in text.split(" "):
                if on_token is not None:
                    on_token(word + " ")
            words = len(text.split())
            return GenerationResult(text=text, prompt_tokens=len(request.prompt.split()),
                                    completion_tokens=script.tokens if script.tokens is not None else words,
                                    first_token_s=0.0, total_s=max(script.delay_s, 1e-3),
                                    finish_reason="stop", server_timings={"fake": True})
        finally:
            self.active -= 1

    async def discard(self, endpoint: Endpoint) -> None:
        self.discarded.append(endpoint.model)

    async def mark_down(self, endpoint: Endpoint) -> None:
        self.marked_down.append(endpoint.base_url)
        for replicas in self.replica_sets.values():
            replicas.mark_down(endpoint.base_url)

    def _plan(self, calls: Sequence[CallPlan]) -> WavePlan:
        return self.waves(list(calls)) if self.waves is not None else WavePlan(True, [[c.label for c in calls]])

    async def prepare(self, stages: Sequence[StagePlan]) -> None:
        self.prepared.append([stage.name for stage in stages])

    async def forecast(self, stages: Sequence[StagePlan]) -> list[WavePlan]:
        return [self._plan(list(stage.all_calls())) for stage in stages]

    async def next_wave(self, calls: Sequence[CallPlan], *, together: bool = False) -> WaveStep:
        labels = [c.label for c in calls]
        plan = WavePlan(True, [labels]) if together else self._plan(calls)
        unfit = {label: ErrorInfo("InsufficientMemory", plan.reason) for label in plan.unfit
                 if label in labels}
        waves = [[label for label in w if label in labels] for w in plan.waves]
        waves = [w for w in waves if w]
        first = set(waves[0]) if waves else set()
        return WaveStep([c for c in calls if c.label in first], unfit, len(waves), plan.reason, waves,
                        {"labels": sorted(first)})

    @contextlib.asynccontextmanager
    async def running(self, step: WaveStep) -> AsyncIterator[None]:
        self.waves_started.append([c.label for c in step.calls])
        yield


def crash(model: str = "fake") -> ChorusError:
    """The error a server killed mid-answer gives."""
    return ServerCrashed(model, "connection lost", exit_code=-9)


def hang(model: str = "fake") -> ChorusError:
    return RequestTimeout(model, "no answer within the request timeout")
