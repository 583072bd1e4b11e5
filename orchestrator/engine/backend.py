"""The engine's one door to inference: get an endpoint for a target, stream a generation, plan a stage's waves.

The real backend (`orchestrator.engine.local.LocalBackend`) is the launcher's server pool and httpx client;
`orchestrator.engine.fake.FakeBackend` scripts replies, delays, failures and crashes so the orchestration
logic is tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from launcher.client import Endpoint, GenerationRequest, GenerationResult
from orchestrator.plan.resolve import CallPlan, StagePlan, Target

TokenCallback = Callable[[str], None]


@dataclass(frozen=True)
class WavePlan:
    """Whether a stage's calls run together, else the waves (labels) they run in, and why."""

    fits_together: bool
    waves: list[list[str]]
    reason: str = ""
    unfit: list[str] = field(default_factory=list)  # labels whose model does not fit even alone


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

    async def plan_waves(self, stage: StagePlan) -> WavePlan:
        """Whether the stage's local servers fit in memory together now, else in which waves."""
        ...

    async def make_room(self, calls: Sequence[CallPlan]) -> None:
        """Before a wave: stop idle warm servers whose room the wave's servers need."""
        ...
