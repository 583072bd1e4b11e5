"""Memory planning over the resolved run plan: does each stage's set of servers fit together, else in which waves.

It reads the `RunPlan`'s server specs as they are (slots included) and never re-resolves a parameter.
One stage = one group for the memory guard: every distinct resolved server spec of the stage is one
server (several calls to it share its slots). The synthesis call runs after the stage's calls, so it is
planned as its own wave. Remote models need no local memory; unavailable ones are reported, not planned.
Running servers of the pool that the stage does not use count as evictable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from launcher.errors import ChorusError
from launcher.memory.admission import Availability, Demand, MemoryGuard, MemoryState, Schedule
from launcher.memory.estimate import MemoryEstimate
from launcher.memory.probes import BUDGET
from launcher.memory.schedule import Placement, Unfit, Wave, with_slots
from launcher.process.server import ServerSpec
from launcher.units import fmt_bytes
from orchestrator.plan.resolve import CallPlan, RunPlan, StagePlan


class MemorySource(Protocol):
    """What the memory plan reads from the process's runtime (`orchestrator.runtime.Runtime` is one): the
    guard, the live state and the scheduler's what-if. A protocol, so the plan never imports the runtime
    (the runtime sits above the plan: it resolves plans)."""

    @property
    def memory_guard(self) -> MemoryGuard: ...

    def memory_state(self) -> MemoryState: ...

    def schedule(self, demands: list[Demand], state: MemoryState | None = None) -> Schedule: ...


@dataclass
class ServerNeed:
    """One server of a stage (or a remote/unavailable model): the labels it serves and what it needs."""

    name: str                      # the model name from models.yaml
    labels: list[str]
    ram_bytes: int = 0
    vram_bytes: int = 0
    need: dict[str, int] = field(default_factory=dict)  # per device: 'ram', 'gpu0', 'budget'...
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    slots: int = 0
    remote: bool = False
    source: str = "estimate"       # estimate | calibrated | remote | unavailable
    estimate_error_pct: dict[str, float] = field(default_factory=dict)  # of the formula, when calibrated
    reused: bool = False           # a running server already serves it
    fits_alone: bool = True
    reason: str | None = None      # why it is unavailable
    # per device, the need in parts (PARTS: weights, kv, compute, other) summing to `need`; a calibrated
    # (measured) total is split in the formula's proportions. The memory chart stacks these.
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    mapped_bytes: int = 0          # of the RAM weights, the file's mapped pages: shared by servers of one file


PARTS = ("weights", "kv", "compute", "other")
_PART_OF = {"weights": "weights", "weights_repacked": "weights", "kv": "kv", "checkpoints": "kv",
            "compute": "compute", "output": "compute"}  # anything else (process, CUDA context): other


def need_parts(kinds: dict[str, int], total: int | None = None, like: dict[str, int] | None = None, *,
               mapped: int = 0, like_mapped: int = 0) -> dict[str, int]:
    """One device's estimate kinds grouped into PARTS; with `total` (a measured figure without kinds), that
    total split in the proportions of `like` (the formula's kinds), the rounding left in 'other'. The
    measured `mapped` file pages are weights as they are; the rest is split as the formula's parts without
    its own mapped weights (`like_mapped`)."""
    parts = dict.fromkeys(PARTS, 0)
    for kind, n in kinds.items():
        parts[_PART_OF.get(kind, "other")] += n
    if total is None:
        return {k: n for k, n in parts.items() if n}
    mapped = min(max(0, mapped), total)
    shares = need_parts(like or {})
    shares["weights"] = max(0, shares.get("weights", 0) - like_mapped)
    whole, rest = sum(shares.values()), total - mapped
    split = {k: rest * n // whole for k, n in shares.items()} if whole else {}
    split["other"] = split.get("other", 0) + rest - sum(split.values())
    split["weights"] = split.get("weights", 0) + mapped
    return {k: split[k] for k in PARTS if split.get(k)}


def with_budget(need: dict[str, int], have: dict[str, int]) -> dict[str, int]:
    """A server's need with the budget device added when one is set: its whole RAM and VRAM count there."""
    if BUDGET not in have or BUDGET in need:
        return need
    return {**need, BUDGET: sum(n for d, n in need.items() if d == "ram" or d.startswith("gpu"))}


@dataclass
class WaveMemory:
    """One wave of a stage as the scheduler decided it: its calls, the servers they run on (started by
    the wave, or warm and reused), the warm servers stopped before it, and its need vs what is usable."""

    labels: list[str]
    servers: list[ServerNeed]
    stops: list[str] = field(default_factory=list)
    need: dict[str, int] = field(default_factory=dict)
    have: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """'reviewer-a, reviewer-b on smollm2-135m (2 slots, started)'."""
        parts = []
        for server in self.servers:
            state = "warm" if server.reused else "started"
            slots = f"{server.slots} slot{'s' if server.slots != 1 else ''}, " if server.slots else ""
            parts.append(f"{', '.join(server.labels)} on {server.name} ({slots}{state})")
        remote = [label for label in self.labels if not any(label in s.labels for s in self.servers)]
        if remote:
            parts.append(", ".join(remote))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "servers": [{"model": s.name, "labels": s.labels, "slots": s.slots,
                                                    "started": not s.reused} for s in self.servers],
                "stops": self.stops, "need": self.need, "have": self.have}


@dataclass
class StageMemory:
    stage: str
    models: list[ServerNeed]       # every server of the stage's waves (a family may run with other slots per wave)
    fits_together: bool
    waves: list[list[str]]         # labels of the stage's calls, one wave after the other
    available: Availability
    synthesis: ServerNeed | None = None  # runs after the waves, as its own wave
    evict: list[str] = field(default_factory=list)  # warm servers stopped to make room, over the stage
    unfit: list[str] = field(default_factory=list)  # labels that do not fit even alone
    unavailable: list[str] = field(default_factory=list)  # labels of models the registry could not register
    need: dict[str, int] = field(default_factory=dict)  # of every call at once (the plan's "together")
    have_at_most: dict[str, int] = field(default_factory=dict)  # usable for that, every idle server stopped
    detail: list[WaveMemory] = field(default_factory=list)  # per wave: servers, slots, stops, need vs have
    synthesis_wave: WaveMemory | None = None
    unfit_reasons: dict[str, str] = field(default_factory=dict)  # label -> need vs have of its one-slot server

    def __post_init__(self) -> None:
        """A stage memory made from waves of labels alone (by hand, in a test) gets its detail from the
        servers that serve those labels."""
        if not self.detail and self.waves:
            by_label = {label: m for m in self.models for label in m.labels}
            for wave in self.waves:
                servers: list[ServerNeed] = []
                for label in wave:
                    need = by_label.get(label)
                    if need is not None and need not in servers and not need.remote and need.source != "unavailable":
                        servers.append(need)
                self.detail.append(WaveMemory(list(wave), servers))
        if self.synthesis_wave is None and self.synthesis is not None:
            self.synthesis_wave = WaveMemory(list(self.synthesis.labels), [self.synthesis])

    @property
    def unfit_servers(self) -> list[ServerNeed]:
        out = [m for m in self.models if not m.fits_alone and m.source != "unavailable"]
        if self.synthesis is not None and not self.synthesis.fits_alone and self.synthesis.source != "unavailable":
            out.append(self.synthesis)
        return out

    @property
    def fits_alone(self) -> bool:
        """Whether each of its models fits at least on its own; False: no schedule runs this stage, one wave
        after another or not (a model the registry could not register is missing, not too big)."""
        return not (self.unfit or self.unfit_servers)

    @property
    def reason(self) -> str:
        if self.unfit_reasons:
            return "; ".join(f"{label} does not fit even alone ({why})" for label, why in self.unfit_reasons.items())
        if self.fits_together:
            return ""
        return f"{together_text(self.need, self.have_at_most)}; {waves_text(self.detail)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.stage, "models": [asdict(m) for m in self.models], "fits_together": self.fits_together,
                "waves": self.waves, "wave_servers": [w.to_dict() for w in self.detail],
                "synthesis": asdict(self.synthesis) if self.synthesis else None,
                "synthesis_wave": self.synthesis_wave.to_dict() if self.synthesis_wave else None,
                "evict": self.evict, "unfit": self.unfit, "unavailable": self.unavailable, "need": self.need,
                "reason": self.reason, "available": self.available.to_dict()}


def short_devices(need: dict[str, int], have: dict[str, int]) -> list[str]:
    return [d for d, n in need.items() if n > 0 and n > have.get(d, 0)]


def together_text(need: dict[str, int], have: dict[str, int]) -> str:
    """'all at once: budget: 271 MiB needed, 250 MiB usable'."""
    short = short_devices(need, have) or [d for d in need if need[d]][:1] or ["ram"]
    return "all at once: " + ", ".join(f"{d}: {fmt_bytes(need.get(d, 0))} needed, {fmt_bytes(have.get(d, 0))} usable"
                                       for d in short)


def waves_text(waves: list[WaveMemory]) -> str:
    """'wave 1: a, b on smollm2-135m (2 slots, started), budget 226 MiB of 250 MiB; wave 2: c on ... (warm)'."""
    out = []
    for i, wave in enumerate(waves, 1):
        # the budget when one is set (it is the cap), else RAM, and any GPU the wave uses
        devices = ["budget" if "budget" in wave.need else "ram", *(d for d in wave.need if d.startswith("gpu"))]
        figures = ", ".join(f"{d} {fmt_bytes(wave.need.get(d, 0))} of {fmt_bytes(wave.have.get(d, 0))}"
                            for d in devices if wave.need.get(d, 0))
        stops = f", stops {', '.join(wave.stops)} first" if wave.stops else ""
        out.append(f"wave {i}: {wave.describe()}{', ' + figures if figures else ''}{stops}")
    return "; ".join(out)


@dataclass
class MemoryPlan:
    pipeline: str
    stages: list[StageMemory]
    available: Availability
    gpu_note: str | None = None
    budget_bytes: int | None = None

    @property
    def fits(self) -> bool:
        """Every model fits at least alone (stages may still run in waves). A model the registry could not
        register is missing, not too big: it does not count here (the run plan's `blocked` says so)."""
        return not self.fits_nowhere

    @property
    def fits_nowhere(self) -> list[StageMemory]:
        """The stages with a model that does not fit even alone: running them sequentially cannot help."""
        return [s for s in self.stages if not s.fits_alone]

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "fits": self.fits, "available": self.available.to_dict(),
                "budget_bytes": self.budget_bytes, "gpu_note": self.gpu_note,
                "stages": [s.to_dict() for s in self.stages]}


# ---------------------------------------------------------------- the plan in words (CLI and UI)


def plan_header(plan: MemoryPlan, fraction: float, fixed_mib: int) -> str:
    """What the plan was made against: the budget when one is set (it is the cap), else free RAM/VRAM."""
    avail = plan.available
    vram = f", VRAM {fmt_bytes(avail.vram_bytes)}" if avail.vram_bytes else f"; {plan.gpu_note or 'no GPU'}"
    ram = f"RAM {fmt_bytes(avail.ram_bytes)} (free minus the margin of {fraction:.0%} + {fixed_mib} MiB){vram}"
    if plan.budget_bytes is not None:
        usable = avail.have().get("budget", 0)
        return (f"pipeline '{plan.pipeline}': budget {fmt_bytes(plan.budget_bytes)} (server.memory_budget_mib), "
                f"{fmt_bytes(usable)} of it usable now; {ram}")
    return f"pipeline '{plan.pipeline}': usable now {ram}"


def stage_headline(stage: StageMemory) -> str:
    """'fits together', 'runs in 2 waves (all at once: ...)', or what does not fit at all."""
    if stage.unfit_reasons:
        return "does NOT fit: " + stage.reason
    if stage.fits_together:
        return "fits together"
    n = len(stage.waves)
    return f"runs in {n} wave{'s' if n != 1 else ''} ({together_text(stage.need, stage.have_at_most)})"


def plan_rows(stage: StageMemory) -> list[dict[str, Any]]:
    """One row per server of each wave (then the synthesis), the slots that wave gives it, started or warm;
    then the calls that run nowhere (missing, remote, too big even alone)."""
    rows: list[dict[str, Any]] = []

    def add(wave: str, m: ServerNeed, server: str) -> None:
        rows.append({"wave": wave, "model": m.name, "labels": ", ".join(m.labels), "n_ctx": m.n_ctx,
                     "ngl": m.n_gpu_layers, "slots": m.slots or None, "server": server, "need": m})

    for i, wave in enumerate(stage.detail, 1):
        for m in wave.servers:
            add(str(i), m, "warm" if m.reused else "started")
    syn, syn_wave = stage.synthesis, stage.synthesis_wave
    placed = {id(m) for w in stage.detail for m in w.servers}
    for m in stage.models:
        if id(m) in placed:
            continue
        if m.remote:
            add("1", m, "remote")
        elif m.source == "unavailable":
            add("-", m, "missing")
        elif not m.fits_alone:
            add("-", m, "does not fit")
    if syn is not None:
        if syn_wave is not None and syn_wave.servers and syn.fits_alone and syn.source != "unavailable":
            for m in syn_wave.servers:
                add("then", m, "warm" if m.reused else "started")
        else:
            add("then", syn, "remote" if syn.remote else "missing" if syn.source == "unavailable"
                else "does not fit" if not syn.fits_alone else "")
    return rows


def stage_wave_lines(stage: StageMemory) -> list[str]:
    """What happens between waves: the warm servers each wave stops first."""
    lines = [f"before wave {i}: stops {', '.join(w.stops)}" for i, w in enumerate(stage.detail, 1) if w.stops]
    if stage.synthesis_wave is not None and stage.synthesis_wave.stops:
        lines.append(f"before the synthesis: stops {', '.join(stage.synthesis_wave.stops)}")
    return lines


# ---------------------------------------------------------------- calls -> demands -> waves


@dataclass
class CallGroup:
    """A group of calls as the scheduler sees it: one demand per server family, with its calls' labels."""

    demands: list[Demand]
    calls: list[list[CallPlan]]      # per demand
    remote: list[CallPlan]           # no local memory: they ride in the first wave
    unavailable: list[CallPlan]      # not registered: recorded as failed, never scheduled

    @classmethod
    def of(cls, calls: Sequence[CallPlan]) -> CallGroup:
        by_family: dict[tuple[object, ...], int] = {}
        group = cls([], [], [], [])
        for call in calls:
            t = call.target
            if t.kind == "unavailable":
                group.unavailable.append(call)
            elif t.server is None:
                group.remote.append(call)
            elif t.server.family in by_family:
                group.calls[by_family[t.server.family]].append(call)
            else:
                by_family[t.server.family] = len(group.demands)
                group.demands.append(Demand(t.server, 0))
                group.calls.append([call])
        group.demands = [Demand(d.spec, len(c)) for d, c in zip(group.demands, group.calls, strict=True)]
        return group

    def placed(self, wave: Wave, taken: list[int]) -> list[tuple[Placement, list[CallPlan]]]:
        """Per placement of `wave`, the calls it runs, each on the placement's server (the slots the wave
        decided); `taken` counts, per demand, the calls earlier waves ran (updated)."""
        out = []
        for p in wave.placements:
            calls = []
            for call in self.calls[p.demand][taken[p.demand]:taken[p.demand] + p.calls]:
                target = dataclasses.replace(call.target, server=p.spec)
                calls.append(call if call.target.server == p.spec else dataclasses.replace(call, target=target))
            taken[p.demand] += p.calls
            out.append((p, calls))
        return out


def _need_from(name: str, labels: list[str], spec: ServerSpec, est: MemoryEstimate | None, *, reused: bool,
               fits_alone: bool = True) -> ServerNeed:
    need = ServerNeed(name, labels, n_ctx=spec.n_ctx, n_gpu_layers=spec.n_gpu_layers, slots=spec.slots,
                      reused=reused, fits_alone=fits_alone)
    if est is not None:
        _fill(need, est)
    return need


def wave_memory(placed: list[tuple[Placement, list[CallPlan]]], wave: Wave,
                estimate: Callable[[ServerSpec], MemoryEstimate | None]) -> WaveMemory:
    """A scheduled wave as the plan shows it and the session records it."""
    servers = []
    for p, calls in placed:
        est = p.estimate if p.estimate is not None else estimate(p.spec)
        servers.append(_need_from(p.spec.model, [c.label for c in calls], p.spec, est, reused=not p.starts))
    labels = [c.label for _, calls in placed for c in calls]
    return WaveMemory(labels, servers, [w.model for w in wave.stop], dict(wave.need), dict(wave.have))


def _fill(need: ServerNeed, est: MemoryEstimate) -> None:
    per_device = est.need()
    need.need = per_device
    need.ram_bytes = per_device.get("ram", 0)
    need.vram_bytes = sum(n for d, n in per_device.items() if d.startswith("gpu"))
    need.source = est.source
    need.mapped_bytes = est.mapped_bytes
    formula = est.estimate if est.source == "calibrated" else None
    need.breakdown = {d: need_parts(kinds) if formula is None else need_parts(
        {}, per_device[d], formula.breakdown.get(d), mapped=est.mapped_bytes if d == "ram" else 0,
        like_mapped=formula.mapped_bytes if d == "ram" else 0) for d, kinds in est.breakdown.items()}
    if est.source == "calibrated" and est.estimate is not None:
        need.estimate_error_pct = {d: round((est.estimate.need().get(d, 0) - n) / n * 100, 1)
                                   for d, n in per_device.items() if n}


def unfit_text(u: Unfit, have_label: str = "usable with every idle server stopped") -> str:
    short = short_devices(u.need, u.have) or list(u.need)[:1]
    return ", ".join(f"{d}: needs {fmt_bytes(u.need.get(d, 0))}, {fmt_bytes(u.have.get(d, 0))} {have_label}"
                     for d in short)


def schedule_stage(runtime: MemorySource, calls: Sequence[CallPlan], state: MemoryState, *,
                   name: str = "") -> tuple[StageMemory, MemoryState]:
    """The scheduler's decision for a group of calls from `state`, as the plan shows it, and the state after."""
    group = CallGroup.of(calls)
    sched = runtime.schedule(group.demands, state)
    estimate = runtime.memory_guard.need_or_none
    taken = [0] * len(group.demands)
    detail = [wave_memory(group.placed(wave, taken), wave, estimate) for wave in sched.waves]
    remote = [c.label for c in group.remote] + [c.label for u in sched.unknown for c in group.calls[u.demand]]
    if remote:
        if detail:
            detail[0].labels.extend(remote)
        else:
            detail.append(WaveMemory(list(remote), []))
    unfit_reasons = {}
    models: list[ServerNeed] = []
    for u in sched.unfit:
        labels = [c.label for c in group.calls[u.demand]]
        spec = group.demands[u.demand].spec
        alone = dataclasses.replace(spec, slots=1)
        est = estimate(alone)
        ways = runtime.memory_guard.suggestions(alone, est, u.need, u.have) if est is not None else []
        ways = [w for w in ways if not w.startswith("raise server.memory_budget_mib")][:2]
        unfit_reasons[", ".join(labels)] = (unfit_text(u) + runtime.memory_guard.others_note()
                                            + "".join(f"; {w}" for w in ways))  # e.g. "use n_ctx 4096 or less"
        models.append(_need_from(spec.model, labels, alone, est, reused=False, fits_alone=False))  # its 1-slot figure
    for wave in detail:
        models.extend(wave.servers)
    models.extend(ServerNeed(c.model, [c.label], remote=True, source="remote") for c in group.remote)
    models.extend(ServerNeed(c.model, [c.label], source="unavailable", fits_alone=False, reason=c.target.reason)
                  for c in group.unavailable)
    stops = list(dict.fromkeys(m for w in detail for m in w.stops))
    memory = StageMemory(name, models, sched.fits_together, [list(w.labels) for w in detail], state.available,
                         evict=stops, unfit=[label for u in sched.unfit for label in
                                             (c.label for c in group.calls[u.demand])],
                         unavailable=[c.label for c in group.unavailable], need=sched.together_need,
                         have_at_most=sched.together_have, detail=detail, unfit_reasons=unfit_reasons)
    return memory, state.after(sched)


def plan_stage_memory(runtime: MemorySource, stage: StagePlan) -> StageMemory:
    """A stage's waves, then its synthesis as a wave of its own, from the live state now."""
    return stage_memory(runtime, stage, runtime.memory_state())[0]


def stage_memory(runtime: MemorySource, stage: StagePlan, state: MemoryState) -> tuple[StageMemory, MemoryState]:
    """A stage's waves, then its synthesis as a wave of its own, from `state`; and the state it leaves."""
    memory, state = schedule_stage(runtime, list(stage.calls), state, name=stage.name)
    if stage.synthesis is not None:
        syn, state = schedule_stage(runtime, [stage.synthesis], state, name=stage.name)
        memory.synthesis = next(iter(syn.models), None)
        memory.synthesis_wave = syn.detail[0] if syn.detail else None
        if syn.unfit_reasons:
            memory.unfit_reasons.update(syn.unfit_reasons)
        memory.evict = list(dict.fromkeys([*memory.evict, *syn.evict]))
    return memory, state


def plan_memory(runtime: MemorySource, plan: RunPlan, state: MemoryState | None = None) -> MemoryPlan:
    """The what-if of a whole run: each stage scheduled from the state the earlier ones leave (their
    servers warm), the same scheduler the run itself asks at each stage."""
    state = state if state is not None else runtime.memory_state()
    available = state.available
    stages = []
    for stage in plan.stages:
        memory, state = stage_memory(runtime, stage, state)
        stages.append(memory)
    guard = runtime.memory_guard
    return MemoryPlan(plan.pipeline.name, stages, available, guard.gpu_note, guard.budget_bytes)


# ---------------------------------------------------------------- RPC workers and remote machines


@dataclass
class WorkerNeed:
    """One RPC worker of a model's server: its share of the layers and what it reports free."""

    worker: str
    need_bytes: int
    free_bytes: int | None         # None: the worker did not answer
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.free_bytes is not None and self.need_bytes <= self.free_bytes


def rpc_needs(spec: ServerSpec, *, timeout_s: float = 2.0) -> tuple[int, list[WorkerNeed]]:
    """(bytes this machine needs, one WorkerNeed per worker) for a server that splits its layers over
    `spec.rpc`, the split as llama.cpp makes it: in proportion to each worker's reported free memory (a
    worker that does not answer is weighted like the best one, to show what it would get)."""
    from launcher.memory.estimate import estimate_rpc_split
    from launcher.memory.gguf import read_gguf
    from launcher.process.rpc import RpcError, query_memory

    free: list[int | None] = []
    errors: list[str | None] = []
    for worker in spec.rpc:
        try:
            free.append(query_memory(worker, timeout_s=timeout_s).free_bytes)
            errors.append(None)
        except RpcError as exc:
            free.append(None)
            errors.append(exc.detail)
    fallback = max((f for f in free if f is not None), default=1)
    split = estimate_rpc_split(read_gguf(spec.model_path), spec, [f if f is not None else fallback for f in free])
    workers = [WorkerNeed(w, sum(split[w].values()), f, e) for w, f, e in zip(spec.rpc, free, errors, strict=True)]
    return sum(split["local"].values()), workers


def check_rpc_workers(spec: ServerSpec) -> list[WorkerNeed]:
    """Before a server with RPC workers starts: every worker answers and has room for its share, else the
    typed error (RpcError naming the worker; RpcWorkerShort with need vs have per worker)."""
    from launcher.process.rpc import RpcError, RpcWorkerShort

    _, workers = rpc_needs(spec)
    for w in workers:
        if w.free_bytes is None:
            raise RpcError(w.worker, f"no answer before '{spec.model}' starts: {w.error}")
    short = [w for w in workers if not w.fits]
    if short:
        raise RpcWorkerShort(spec.model, {w.worker: w.need_bytes for w in workers},
                             {w.worker: w.free_bytes or 0 for w in workers})
    return workers


@dataclass
class MachineLoad:
    """One row of the per-machine plan view: this machine, an RPC worker, or a remote endpoint."""

    machine: str
    kind: str                      # local | rpc | remote
    models: list[str]
    need_bytes: int | None = None  # None: not known here (a remote server's own business)
    have_bytes: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_view(plan: RunPlan, memory: MemoryPlan | None = None, *,
                 rpc: dict[str, tuple[int, list[WorkerNeed]]] | None = None) -> list[MachineLoad]:
    """Per machine, what the run puts there and how much memory it needs.

    This machine: the most any one stage's servers need together (the memory plan's stage need, RAM and
    GPUs summed), with a server that has RPC workers counted by its local part only. Each RPC worker: the
    sum of its shares of every model placed on it. Each remote URL: the models it serves (its memory is its
    own). `rpc` is `rpc_needs` per model (computed when not given).
    """
    rpc = dict(rpc or {})
    rpc_specs = {s.model: s for s in plan.servers if s.rpc}
    for name, spec in rpc_specs.items():
        if name not in rpc:
            rpc[name] = rpc_needs(spec)
    local_models = [s.model for s in plan.servers]
    local = MachineLoad("this machine", "local", local_models)
    if memory is not None:
        peaks = []
        for st in memory.stages:
            parts = [*st.models, *([st.synthesis] if st.synthesis else [])]
            total = 0
            for m in parts:
                if m.remote or m.source == "unavailable":
                    continue
                whole = sum(m.need.values())
                total += rpc[m.name][0] if m.name in rpc else whole
            peaks.append(total)
        local.need_bytes = max(peaks, default=0)
        have = memory.available.have()
        local.have_bytes = sum(n for d, n in have.items() if d == "ram" or d.startswith("gpu"))
    rows = [local]
    workers: dict[str, MachineLoad] = {}
    for name, (_, needs) in rpc.items():
        for w in needs:
            row = workers.setdefault(w.worker, MachineLoad(f"rpc {w.worker}", "rpc", [], 0, w.free_bytes))
            row.models.append(name)
            row.need_bytes = (row.need_bytes or 0) + w.need_bytes
            if w.free_bytes is None:
                row.note = f"does not answer: {w.error}"
            elif (row.need_bytes or 0) > w.free_bytes:
                row.note = "too small: needs more than it reports free"
    rows.extend(workers.values())
    remotes: dict[str, MachineLoad] = {}
    for stage in plan.stages:
        for call in stage.all_calls():
            t = call.target
            if t.kind != "remote":
                continue
            for url in t.urls or ((t.url,) if t.url else ()):
                row = remotes.setdefault(url, MachineLoad(url, "remote", [], note="memory: the remote server's own"))
                if t.model not in row.models:
                    row.models.append(t.model)
    rows.extend(remotes.values())
    return rows


def runs_that_fit(runtime: MemorySource, plans: Sequence[RunPlan], max_slots: int, *, most: int) -> int:
    """How many runs of `plans` may go at once (at most `most`): the largest count for which every stage's
    servers, sized for that many runs' calls (up to `max_slots` slots each), fit together from the live
    state with every idle server stopped. 1 when even that does not fit: the scheduler then runs waves."""
    state = runtime.memory_state()
    groups = [CallGroup.of(calls) for plan in plans for stage in plan.stages  # the synthesis runs after the calls
              for calls in (stage.calls, [stage.synthesis] if stage.synthesis is not None else [])]
    for runs in range(max(1, most), 1, -1):
        ok = True
        for group in groups:
            slots = [max(d.spec.slots, min(max_slots, d.calls * runs)) for d in group.demands]
            demands = [Demand(with_slots(d.spec, n), n) for d, n in zip(group.demands, slots, strict=True)]
            if not demands:
                continue
            try:
                if not runtime.schedule(demands, state).fits_together:
                    ok = False
                    break
            except ChorusError:
                ok = False
                break
        if ok:
            return runs
    return 1
