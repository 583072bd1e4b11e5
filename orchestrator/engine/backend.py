"""The engine's one door to inference: get an endpoint for a target, stream a generation, plan a stage's waves.

The real backend (`orchestrator.engine.local.LocalBackend`) is the launcher's server pool and httpx client;
`orchestrator.engine.fake.FakeBackend` scripts replies, delays, failures and crashes so the orchestration
logic is tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from launcher.process.client import Endpoint, GenerationRequest, GenerationResult
from orchestrator.plan.resolve import CallPlan, StagePlan, Target
from orchestrator.records import ErrorInfo

TokenCallback = Callable[[str], None]


@dataclass(frozen=True)
class WavePlan:
    """The forecast of one stage: whether its calls run together, else the waves (labels) they run in,
    and why (need vs have, per wave)."""

    fits_together: bool
    waves: list[list[str]]
    reason: str = ""
    unfit: list[str] = field(default_factory=list)  # labels whose model does not fit even alone


@dataclass
class WaveStep:
    """One wave, decided now by the scheduler: its calls (each on the server, with the slot count, the wave
    chose), the calls that cannot run at all and why, how many waves the rest takes, and what to record."""

    calls: list[CallPlan]
    unfit: dict[str, ErrorInfo] = field(default_factory=dict)  # label -> typed error: need vs have
    waves_left: int = 1                                      # this wave and the ones after it, as planned now
    reason: str = ""                                         # why it takes several waves
    waves: list[list[str]] = field(default_factory=list)     # labels of this wave and the ones after it
    record: dict[str, Any] = field(default_factory=dict)     # servers, slots, stops, need vs have
    handle: Any = None                                       # the backend's own decision, for `running`
    since: float | None = None                               # when its server began starting, ahead of it


class Backend(Protocol):
    def endpoint(self, target: Target) -> AbstractAsyncContextManager[Endpoint]:
        """A ready endpoint for `target` for the duration of the block (a local server is leased)."""
        ...

    async def generate(self, endpoint: Endpoint, request: GenerationRequest,
                       on_token: TokenCallback | None = None) -> GenerationResult:
        """Stream one generation; raise a ChorusError subclass on failure."""
        ...

    async def discard(self, endpoint: Endpoint) -> None:
        """The server behind `endpoint` hung: stop it so the next use starts a fresh one."""
        ...

    async def mark_down(self, endpoint: Endpoint) -> None:
        """The replica behind `endpoint` failed at the connection level: choose others until it is probed again."""
        ...

    async def prepare(self, stages: Sequence[StagePlan]) -> None:
        """Called once before the run is recorded, with the stages it will run: a backend may take the
        preflight's forecast now and give the first stage's servers a head start."""
        ...

    async def forecast(self, stages: Sequence[StagePlan]) -> list[WavePlan]:
        """The what-if of these stages, one after the other from the state now (earlier stages' servers
        left warm): per stage, whether it runs in one wave, else in which, and what does not fit at all."""
        ...

    async def next_wave(self, calls: Sequence[CallPlan], *, together: bool = False) -> WaveStep:
        """The scheduler's decision now for the first wave of `calls` (with `together`, all of them at once,
        on the servers the plan resolved)."""
        ...

    def running(self, step: WaveStep) -> AbstractAsyncContextManager[None]:
        """Execute the wave's decision for the block: stop what it stops, hold what it reuses, admit what
        it starts (InsufficientMemory when memory changed since)."""
        ...
