"""The real backend: the runtime's pool of warm llama-servers (or a remote URL) and one httpx client.

Open it with `async with LocalBackend(runtime) as backend:` around a run, so the HTTP client lives on
that run's event loop and is closed with it.

A remote model with several URLs (`replicas:`) shares one `ReplicaSet` per process (`replicas.shared`; the
API runs each request apart, and each must know what the others learnt): least outstanding requests, a
replica marked down (a failed connection, or a call that timed out on it) is skipped for its backoff, then
probed (GET <url>/models) by one caller before real calls go there again. A local server with RPC workers
(`rpc:`) is checked before it starts (every worker answers, each has room for its share:
`plan.memory.check_rpc_workers`); when such a server fails mid-answer, the workers are probed and a dead one
is named in the error (`RpcWorkerLost`), and the server is stopped: llama-server waits for ever on a worker
whose link went down, so it would hang the next call too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from launcher.errors import ChorusError, InsufficientMemory, RequestTimeout, ServerError
from launcher.memory.admission import Demand
from launcher.memory.schedule import Wave, with_slots
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest, GenerationResult
from launcher.process.rpc import RpcLoadFailed, RpcWorkerLost, probe
from launcher.process.server import ModelServer, ServerSpec
from orchestrator.engine.backend import TokenCallback, WavePlan, WaveStep
from orchestrator.engine.replicas import ReplicaSet, shared
from orchestrator.plan.memory import (
    CallGroup,
    check_rpc_workers,
    stage_memory,
    together_text,
    wave_memory,
    waves_text,
)
from orchestrator.plan.resolve import CallPlan, StagePlan, Target, remote_api_key
from orchestrator.records import ErrorInfo
from orchestrator.runtime import Runtime

log = logging.getLogger("chorus.replicas")
OTHERS_POLL_S = 0.2  # how often a run that waits for other runs' servers asks the scheduler again
_D = TypeVar("_D")
start_log = logging.getLogger("chorus.engine")


class LocalBackend:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.client = GenerationClient(timeout_s=runtime.config.app.server.request_timeout_s)
        self.replicas: dict[tuple[str, ...], ReplicaSet] = {}
        self._rpc_specs: dict[str, ServerSpec] = {}  # base URL of a running server -> its spec (with workers)
        self._began: dict[int, float] = {}  # id of a replica call's endpoint -> when it was chosen
        self._on_cpu: dict[int, int] = {}  # id of an endpoint on a server computing on the CPU -> its threads
        self._forecast: tuple[list[int], list[WavePlan]] | None = None  # prepare's, for the engine's preflight
        self._head_start: asyncio.Future[None] | None = None  # the first stage's server, starting
        self._head_started: tuple[str, float] | None = None  # (model, when) of a head start that succeeded
        self._head_record: dict[str, Any] = {}  # the head start's wave as decided before its start: need vs have
        # spec key -> the head start's failure, and for how many of the first wave's calls it still stands
        self._failed_starts: dict[tuple[object, ...], tuple[ServerError, int]] = {}

        self._going = contextlib.ExitStack()

    async def __aenter__(self) -> LocalBackend:
        self._going.enter_context(self.runtime.run_going())  # concurrent runs size new servers for each other
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._settled()  # a head start left in flight (a run refused before stage 1): its server stays warm
        self._going.close()
        await self.client.aclose()

    @contextlib.asynccontextmanager
    async def endpoint(self, target: Target) -> AsyncIterator[Endpoint]:
        if target.kind == "remote" and len(target.urls) > 1:
            replicas = self.replicas.setdefault(target.urls, shared(target.urls))
            url = await self._choose(replicas, target)
            chosen = Endpoint(target.model, url, target.mode, remote_api_key(target), remote=True)
            self._began[id(chosen)] = replicas.clock()
            try:
                yield chosen
            finally:
                self._began.pop(id(chosen), None)
                replicas.release(url)
            return
        if target.kind == "remote":
            yield Endpoint(target.model, target.url or "", target.mode, remote_api_key(target),
                           remote=True)
            return
        if target.server is None:  # not in models.yaml, its file gone: the caller's stage fails with this
            from orchestrator.errors import ModelUnavailable

            raise ModelUnavailable(target.model, target.reason or "no server to run it on")
        await self._settled()
        pool = self.runtime.pool
        spec = target.server
        if (failed := self._failed_starts.pop(spec.key, None)) is not None:
            error, calls = failed
            if calls > 1:
                self._failed_starts[spec.key] = (error, calls - 1)
            raise error  # the head start's failure, for the calls it was for: not a start per call
        if spec.rpc and not any(s.spec.serves(spec) and s.is_alive() for s in self.runtime.running_servers()):
            await asyncio.to_thread(check_rpc_workers, spec)  # before a start: workers up, each with room
        try:
            server = await pool.aacquire(spec)  # a start runs in a worker thread, not on the event loop
        except ServerError as exc:
            if not spec.rpc:
                raise
            raise await self._rpc_failure(spec, exc, RpcLoadFailed) or exc from exc
        if spec.rpc:
            self._rpc_specs[server.base_url] = spec
        endpoint = Endpoint(target.model, server.base_url, target.mode, server.api_key)
        threads = self.runtime.cpu_threads(server.spec)
        if threads is not None:  # computes on the CPU: its calls take turns at the cores
            self._on_cpu[id(endpoint)] = threads
        try:
            yield endpoint
        finally:
            self._on_cpu.pop(id(endpoint), None)
            pool.release(server)

    async def _rpc_failure(self, spec: ServerSpec, exc: ServerError,
                           otherwise: type[ServerError] | None) -> ServerError | None:
        """The failure of a server with RPC workers, naming them: RpcWorkerLost with the workers that no
        longer answer when any, else `otherwise` naming every worker (None: nothing to add)."""
        dead = [w for w in spec.rpc if not await asyncio.to_thread(probe, w)]
        if dead:
            kind: type[ServerError] = RpcWorkerLost
            what = f"RPC worker {', '.join(dead)} does not answer"
        elif otherwise is not None:
            kind, what = otherwise, f"RPC workers {', '.join(spec.rpc)} answer, but the server failed"
        else:
            return None
        return kind(spec.model, f"{what} ({exc.detail})", command=exc.command, log_tail=exc.log_tail,
                    exit_code=exc.exit_code, log_path=exc.log_path)

    async def _choose(self, replicas: ReplicaSet, target: Target) -> str:
        """The least busy healthy replica; one back from its backoff is probed first (down again if it fails)."""
        tried: list[str] = []
        while True:
            url = replicas.choose(exclude=tried)
            if url in tried or not replicas.due_for_probe(url):
                return url
            if await self._probe(url, target):
                log.warning("replica %s answers again: back in use", url)  # the pair of "down": for operators
                return url
            replicas.release(url)
            log.warning("replica %s still does not answer its probe: down for %.0fs", url, replicas.mark_down(url))
            tried.append(url)

    async def _probe(self, url: str, target: Target) -> bool:
        import httpx  # on first use (see launcher.process.client)

        key = remote_api_key(target)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                response = await client.get(f"{url.rstrip('/')}/models", headers=headers)
            return response.status_code < 500
        except httpx.HTTPError:
            return False

    async def mark_down(self, endpoint: Endpoint, why: str = "its connection failed") -> None:
        for replicas in self.replicas.values():
            if endpoint.base_url in (r.url for r in replicas.replicas):
                wait = replicas.mark_down(endpoint.base_url, since=self._began.get(id(endpoint)))
                log.warning("replica %s %s: down for %.0fs", endpoint.base_url, why, wait)

    async def generate(self, endpoint: Endpoint, request: GenerationRequest,
                       on_token: TokenCallback | None = None) -> GenerationResult:
        threads = self._on_cpu.get(id(endpoint))
        try:
            if threads is None:
                result = await self.client.generate(endpoint, request, on_token)
            else:  # one run is one owner: a parallel stage's servers share the cores as the plan split them
                async with self.runtime.cpu_gate.turn(self, endpoint.base_url, threads):
                    result = await self.client.generate(endpoint, request, on_token)
        except ServerError as exc:
            if isinstance(exc, RequestTimeout) and endpoint.remote:  # a replica gone quiet: others first
                await self.mark_down(endpoint, "did not answer in time")
            spec = self._rpc_specs.get(endpoint.base_url)
            if spec is None:
                raise
            failure = await self._rpc_failure(spec, exc, None)
            if failure is None:
                raise  # every worker answers: the server's own failure, as it is
            if isinstance(failure, RpcWorkerLost):
                await self.discard(endpoint)  # blocked on the lost worker: a fresh server on the next use
            raise failure from exc
        for replicas in self.replicas.values():
            replicas.mark_up(endpoint.base_url)  # it answered: healthy again
        return result

    async def discard(self, endpoint: Endpoint) -> None:
        # stopping a hung server may take stop_grace_s: off the event loop
        await asyncio.to_thread(self.runtime.discard_server, endpoint)

    # ---------------------------------------------------------------- a head start

    async def prepare(self, stages: Sequence[StagePlan]) -> None:
        """Before the run is recorded: the preflight's forecast, from the state before anything starts (kept
        for the engine's `forecast`), then, when the first stage runs in one wave on one local server, that
        server's start in a worker thread, decided as the engine's own first wave would be. The model loads
        (one core busy) while the session is written and the first prompt rendered; the engine's first
        wave waits for the start and finds the server warm. A start that fails is the error of the calls it
        was for (a later stage tries again), not one more start per call."""
        local = [s for s in stages if any(c.target.kind == "local" for c in s.all_calls())]
        if not local:
            return
        try:
            forecasts = await asyncio.to_thread(forecast, self.runtime, local)
        except ChorusError:  # no estimate: the engine's preflight says why
            return
        self._forecast = ([id(s) for s in local], forecasts)
        first = stages[0]
        if first is not local[0] or first.retrieval is not None or forecasts[0].unfit \
                or not forecasts[0].fits_together:
            return  # waves are announced (and in manual mode asked about) before anything starts
        calls = list(first.calls)
        if first.spec.execution == "sequential":  # one model at a time: the first model's calls
            calls = [c for c in calls if c.model == calls[0].model]
        specs = {c.target.server.key: c.target.server for c in calls if c.target.server is not None}
        if len(specs) != 1 or any(c.target.kind != "local" for c in calls):
            return
        [spec] = specs.values()
        if spec.rpc or any(s.spec.serves(spec) and s.is_alive() for s in self.runtime.running_servers()):
            return  # workers are checked on the event loop's path; a warm server needs no head start
        loop = asyncio.get_running_loop()
        spawned = loop.create_future()

        def spawn_seen() -> None:
            if not spawned.done():
                spawned.set_result(None)

        def on_spawn() -> None:
            loop.call_soon_threadsafe(spawn_seen)

        self._head_start = asyncio.ensure_future(
            asyncio.to_thread(self._start_early, spec, calls, first.spec.execution == "parallel", on_spawn))
        # until the process runs, the thread's admission would share the interpreter with the session's writing
        await asyncio.wait({self._head_start, spawned}, return_when=asyncio.FIRST_COMPLETED)
        self.client.preload()  # while the model loads (one core busy), not on the first request

    def _start_early(self, spec: ServerSpec, calls: list[CallPlan], together: bool,
                     on_spawn: Callable[[], None]) -> None:
        """In a worker thread: the first wave as `next_wave` decides it, executed as `running` does, and
        its one server started (then left warm in the pool)."""
        wave: Wave | None = None
        pinned: list[ModelServer] = []
        try:
            if not together:  # the wave's own server: its slots sized for the runs going at once
                step = next_wave(self.runtime, calls)
                placed = {c.target.server for c in step.calls if c.target.server is not None}
                if len(placed) != 1:
                    return
                [spec] = placed
                if isinstance(step.handle, Wave):
                    wave, pinned = step.handle, self.runtime.begin_wave(step.handle)
                self._head_record = step.record
            began = time.time()
            self.runtime.pool.release(self.runtime.pool.acquire(spec, on_spawn=on_spawn))
            self._head_started = (spec.model, began)  # the first wave finds it warm, but this run started it
        except ServerError as exc:  # it did not start (a bad file, killed while loading): what its calls get
            self._failed_starts[spec.key] = (exc, len(calls))
        except Exception as exc:  # memory changed since the forecast, say: the engine decides again, and reports
            start_log.debug("no head start for '%s': %s", spec.model, exc)
        finally:
            if wave is not None:
                self.runtime.end_wave(wave, pinned)

    async def _settled(self) -> None:
        """Wait for the head start, if one is in flight: the scheduler then sees its server."""
        if self._head_start is not None and not self._head_start.done():
            await asyncio.wait({self._head_start})

    # ---------------------------------------------------------------- the scheduler's decisions

    async def forecast(self, stages: Sequence[StagePlan]) -> list[WavePlan]:
        kept, self._forecast = self._forecast, None
        if kept is not None and kept[0] == [id(s) for s in stages] and not any(w.unfit for w in kept[1]):
            return kept[1]
        return await self._when_others_allow(lambda: forecast(self.runtime, stages),
                                             lambda waves: any(w.unfit for w in waves))

    async def next_wave(self, calls: Sequence[CallPlan], *, together: bool = False) -> WaveStep:
        await self._settled()
        if together:
            step = WaveStep(list(calls), waves=[[c.label for c in calls]])
        else:
            step = await self._when_others_allow(lambda: next_wave(self.runtime, calls), lambda s: bool(s.unfit))
        return self._with_head_start(step)

    async def _when_others_allow(self, decide: Callable[[], _D], unfit: Callable[[_D], bool]) -> _D:
        """`decide()` (in a worker thread), asked again while what it finds too big may only be held by
        servers other runs are using now (this run holds none between its waves): concurrent runs under a
        budget take turns instead of the later one failing with "does not fit even alone" — it fits once
        the other run gives its server back (then idle, stopped to make room). Bounded by the request
        timeout; a model too big with everything stopped is refused once nothing else is busy."""
        deadline = time.monotonic() + self.runtime.config.app.server.request_timeout_s
        settled = 0  # decisions in a row made with nothing else holding memory around them
        while True:
            held = self._others_hold_memory()
            decided = await asyncio.to_thread(decide)
            held = held or self._others_hold_memory()
            settled = 0 if held else settled + 1
            # a refusal stands once made twice with nothing else busy (a server is idle for a moment between
            # another run's waves: a single look then may see it busy, and the next not)
            if not unfit(decided) or settled >= 2 or time.monotonic() >= deadline:
                return decided
            await asyncio.sleep(OTHERS_POLL_S)

    def _others_hold_memory(self) -> bool:
        """Servers in use or starting now (this run holds none between its waves): memory that comes free."""
        return self.runtime.pool.busy() or self.runtime.memory_guard.starting()

    def _with_head_start(self, step: WaveStep) -> WaveStep:
        """The first wave after a head start: its server is warm now, but this run started it (so recorded,
        as `chorus plan` says), and its calls have waited for it since the start began."""
        head, self._head_started = self._head_started, None
        if head is None:
            return step
        model, began = head
        if not any(c.model == model for c in step.calls):
            return step
        decided, self._head_record = self._head_record, {}
        if decided.get("need"):  # what the start needed and had when it was decided, not 0 now it is warm
            step.record.update(need=decided["need"], have=decided.get("have", {}), stops=decided.get("stops", []))
        for server in step.record.get("servers", []):
            if server.get("model") == model:
                server["started"] = True
        return dataclasses.replace(step, since=began)

    @contextlib.asynccontextmanager
    async def running(self, step: WaveStep) -> AsyncIterator[None]:
        wave = step.handle
        if not isinstance(wave, Wave):  # all at once as planned: each start is admitted on its own
            yield
            return
        pinned = await asyncio.to_thread(self.runtime.begin_wave, wave)
        try:
            yield
        finally:
            self.runtime.end_wave(wave, pinned)


# ---------------------------------------------------------------- the scheduler, asked by the engine


def forecast(runtime: Runtime, stages: Sequence[StagePlan]) -> list[WavePlan]:
    """The preflight's what-if: each stage from the state the earlier ones leave, as `chorus plan` shows it."""
    state = runtime.memory_state()
    out = []
    for stage in stages:
        memory, state = stage_memory(runtime, stage, state)
        out.append(WavePlan(memory.fits_together, [list(w) for w in memory.waves], memory.reason,
                            [label for key in memory.unfit_reasons for label in key.split(", ")]))
    return out


def next_wave(runtime: Runtime, calls: Sequence[CallPlan]) -> WaveStep:
    """The first wave of `calls`, decided from the live state now; the rest as the scheduler sees it now."""
    group = CallGroup.of(calls)
    # runs going at once share servers: a new one is sized for their calls too (as many slots as fit)
    group.demands = [Demand(with_slots(d.spec, runtime.preferred_slots(d.spec.slots, d.calls)), d.calls)
                     for d in group.demands]
    sched = runtime.schedule(group.demands)
    estimate = runtime.memory_guard.need_or_none
    unfit: dict[str, ErrorInfo] = {}
    for u in sched.unfit:
        spec = group.demands[u.demand].spec
        exc = InsufficientMemory(spec.model, u.need, u.have,
                                 ["it does not fit even alone, with every idle server stopped: use a smaller "
                                  "n_ctx or model, or a larger budget" + runtime.memory_guard.others_note()])
        for call in group.calls[u.demand]:
            unfit[call.label] = ErrorInfo.of(exc)
    # no local memory, or no estimate (the start says why): they ride in the first wave
    extra = [*group.remote, *(c for u in sched.unknown for c in group.calls[u.demand]), *group.unavailable]
    if not sched.waves:
        return WaveStep(extra, unfit, 1 if extra else 0, waves=[[c.label for c in extra]] if extra else [])
    taken = [0] * len(group.demands)
    placed = [group.placed(wave, taken) for wave in sched.waves]
    detail = [wave_memory(p, wave, estimate) for p, wave in zip(placed, sched.waves, strict=True)]
    first = [c for _, cs in placed[0] for c in cs] + extra
    waves = [list(w.labels) for w in detail]
    waves[0].extend(c.label for c in extra)
    reason = f"{together_text(sched.together_need, sched.together_have)}; {waves_text(detail)}" \
        if len(detail) > 1 else ""
    return WaveStep(first, unfit, len(detail), reason, waves, detail[0].to_dict(), handle=sched.waves[0])
