"""The real backend: the runtime's pool of warm llama-servers (or a remote URL) and one httpx client.

Open it with `async with LocalBackend(runtime) as backend:` around a run, so the HTTP client lives on
that run's event loop and is closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from launcher.client import Endpoint, GenerationClient, GenerationRequest, GenerationResult
from orchestrator.engine.backend import TokenCallback, WavePlan
from orchestrator.plan.memory import plan_stage_memory
from orchestrator.plan.resolve import CallPlan, StagePlan, Target, remote_api_key
from orchestrator.runtime import Runtime


class LocalBackend:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.client = GenerationClient(timeout_s=runtime.config.app.server.request_timeout_s)

    async def __aenter__(self) -> LocalBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    @contextlib.asynccontextmanager
    async def endpoint(self, target: Target) -> AsyncIterator[Endpoint]:
        if target.kind == "remote":
            yield Endpoint(target.model, target.url or "", target.mode, remote_api_key(target),  # type: ignore[arg-type]
                           remote=True)
            return
        if target.server is None:
            raise ValueError(f"{target.model}: no server to run it on ({target.reason})")
        pool = self.runtime.pool
        server = await pool.aacquire(target.server)  # a start runs in a worker thread, not on the event loop
        try:
            yield Endpoint(target.model, server.base_url, target.mode, server.api_key)  # type: ignore[arg-type]
        finally:
            pool.release(server)

    async def generate(self, endpoint: Endpoint, request: GenerationRequest,
                       on_token: TokenCallback | None = None) -> GenerationResult:
        return await self.client.generate(endpoint, request, on_token)

    async def discard(self, endpoint: Endpoint) -> None:
        # stopping a hung server may take stop_grace_s: off the event loop
        await asyncio.to_thread(self.runtime.discard_server, endpoint)

    async def make_room(self, calls: Sequence[CallPlan]) -> None:
        specs = list(dict.fromkeys(c.target.server for c in calls if c.target.server is not None))
        await asyncio.to_thread(self.runtime.make_room, specs)

    async def plan_waves(self, stage: StagePlan) -> WavePlan:
        memory = await asyncio.to_thread(plan_stage_memory, self.runtime, stage)
        unfit = [label for m in memory.unfit_servers for label in m.labels]
        return WavePlan(memory.fits_together, [list(w) for w in memory.waves], memory.reason, unfit)
