"""The scheduler's arithmetic: which servers a group of calls runs on, with how many slots, in which waves,
and which warm servers stop first. Pure: needs, holdings and free memory come from the caller.

A *demand* is one server family (everything but the slot count) and the calls that want it at once. A
*wave* places demands on servers: a warm server that serves the family is reused as it is (it needs
nothing new), or a server is started with as many slots as fit (a 3-slot server that does not fit runs
as a 2-slot one, then 1); what does not fit waits for the next wave. Slots are a decision made here, per
wave, never a constant of the plan: the plan's slot count is only a preference (it lets later stages
reuse the server), taken when it fits without stopping anything more.

One eviction policy: idle servers that the wave does not use are stopped, least recently used first,
only as far as the wave's new servers need. A warm server of the family with fewer slots than the calls
is restarted bigger when that fits (fewer waves), else reused as it is.

Every wave is applied to a copy of the state (the servers it starts become warm, the ones it stops go),
so one call plans a whole stage from the state it will really meet, and the what-if of a whole run is
the same function stage after stage.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from launcher.errors import ChorusError
from launcher.memory.estimate import MemoryEstimate
from launcher.memory.fit import Devices, Holding, combined_need, fits, footprint, freed, freed_all, minus, plus
from launcher.process.server import ServerSpec

NeedOf = Callable[[ServerSpec], MemoryEstimate]

_order = itertools.count(1)


@dataclass(eq=False)
class PlannedServer:
    """A server that a planned wave starts: what it runs, before (or instead of) a real process."""

    spec: ServerSpec

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def pid(self) -> int | None:
        return None

    def is_alive(self) -> bool:
        return True


@dataclass(frozen=True)
class Demand:
    """One server family of a group of calls: `spec` as planned (its slots are the preferred count) and
    how many calls want it at once."""

    spec: ServerSpec
    calls: int


@dataclass
class Warm:
    """A server that is up (or will be, in a what-if): what it holds, whether it may be stopped, and when
    it was used last (least recently used stops first)."""

    holding: Holding
    idle: bool = True
    last_used: float = 0.0

    @property
    def spec(self) -> ServerSpec:
        return self.holding.server.spec

    @property
    def model(self) -> str:
        return self.holding.server.model


@dataclass
class Placement:
    """Some calls of one demand in one wave: the server they run on and whether it is already warm."""

    demand: int
    spec: ServerSpec
    calls: int
    reuse: Warm | None = None
    estimate: MemoryEstimate | None = None  # of a server this wave starts

    @property
    def starts(self) -> bool:
        return self.reuse is None


@dataclass
class Wave:
    placements: list[Placement]
    stop: list[Warm] = field(default_factory=list)  # stopped before the wave: idle, LRU first, and restarts
    need: Devices = field(default_factory=dict)      # of the servers it starts, together
    have: Devices = field(default_factory=dict)      # usable for them, after the stops

    @property
    def new(self) -> list[Placement]:
        return [p for p in self.placements if p.starts]


@dataclass
class Unfit:
    """A demand whose smallest server (one slot) does not fit even with every idle server stopped."""

    demand: int
    need: Devices
    have: Devices


@dataclass
class Unknown:
    """A demand with no memory estimate (a file damaged since registration): not scheduled; its calls run
    in the first wave, where the server's start reports the file's own error."""

    demand: int
    error: str


@dataclass
class Schedule:
    waves: list[Wave]
    unfit: list[Unfit]
    warm_after: list[Warm]  # the state the group leaves (what the next group meets)
    have_after: Devices
    unknown: list[Unknown] = field(default_factory=list)
    together_need: Devices = field(default_factory=dict)  # every demand at its full call count, at once
    together_have: Devices = field(default_factory=dict)  # usable for that, with every idle server stopped

    @property
    def fits_together(self) -> bool:
        return len(self.waves) <= 1 and not self.unfit


def with_slots(spec: ServerSpec, slots: int) -> ServerSpec:
    return spec if spec.slots == slots else dataclasses.replace(spec, slots=slots)


def schedule(demands: Sequence[Demand], warm: Sequence[Warm], have_now: Devices, need_of: NeedOf, *,
             budget: bool = False) -> Schedule:
    """Waves for `demands` from the state `warm`/`have_now` (have: usable now with `warm` up)."""
    state = list(warm)
    have = dict(have_now)
    remaining = [d.calls for d in demands]
    unfit, unknown = _unfit(demands, state, have, need_of, budget)
    for i in [u.demand for u in unfit] + [u.demand for u in unknown]:
        remaining[i] = 0
    together_need, together_have = _together(demands, state, have, need_of, budget)
    waves: list[Wave] = []
    while any(remaining):
        wave = _one_wave(demands, remaining, state, have, need_of, budget)
        if not wave.placements:  # busy servers hold the room: nothing can start now
            for i, r in enumerate(remaining):
                if r:
                    est = need_of(with_slots(demands[i].spec, 1))
                    need = combined_need([est], {w.holding.path for w in state}, budget=budget)
                    unfit.append(Unfit(i, need, have))
                    remaining[i] = 0
            break
        waves.append(wave)
        state, have = apply(wave, state, have, budget=budget)
        for p in wave.placements:
            remaining[p.demand] -= p.calls
    return Schedule(waves, unfit, state, have, unknown, together_need, together_have)


def apply(wave: Wave, state: Sequence[Warm], have: Devices, *, budget: bool = False) -> tuple[list[Warm], Devices]:
    """The state after `wave`: its stops gone, its new servers warm (holding what they are estimated to),
    the servers it used most recently used."""
    stopped = {id(w) for w in wave.stop}
    kept = [w for w in state if id(w) not in stopped]
    have = plus(have, freed_all([w.holding for w in wave.stop], [w.holding for w in kept], budget=budget))
    have = minus(have, wave.need)
    now = float(next(_order)) + 1e12  # later than any real monotonic clock reading: used just now
    for p in wave.placements:
        if p.reuse is not None:
            p.reuse.last_used = now
    for p in wave.new:
        assert p.estimate is not None
        est = p.estimate
        vram = {d: n for d, n in est.need().items() if d != "ram"}
        holding = Holding(PlannedServer(p.spec), est.model_path, est.anon_ram_bytes, est.mapped_bytes, vram,
                          footprint(est))
        kept.append(Warm(holding, idle=True, last_used=now))
    return kept, have


# ---------------------------------------------------------------- one wave


class _Room:
    """What a wave may use: the state, the warm servers it keeps, the servers it starts so far."""

    def __init__(self, state: list[Warm], have: Devices, need_of: NeedOf, budget: bool) -> None:
        self.state, self.have, self.need_of, self.budget = state, have, need_of, budget
        self.kept: list[Warm] = []
        self.new: list[tuple[ServerSpec, MemoryEstimate]] = []

    def victims(self, kept: Sequence[Warm]) -> list[Warm]:
        keep_ids = {id(w) for w in kept}
        return sorted((w for w in self.state if w.idle and id(w) not in keep_ids), key=lambda w: w.last_used)

    def need(self, new: Sequence[tuple[ServerSpec, MemoryEstimate]], kept: Sequence[Warm]) -> Devices:
        victims = {id(w) for w in self.victims(kept)}
        shared = {w.holding.path for w in self.state if id(w) not in victims}
        return combined_need([e for _, e in new], shared, budget=self.budget)

    def have_max(self, kept: Sequence[Warm]) -> Devices:
        victims = self.victims(kept)
        ids = {id(w) for w in victims}
        keep = [w.holding for w in self.state if id(w) not in ids]
        return plus(self.have, freed_all([w.holding for w in victims], keep, budget=self.budget))

    def fits_with(self, spec: ServerSpec | None, *, drop: Warm | None = None) -> MemoryEstimate | None:
        """The estimate of `spec` when it fits beside what the wave has (None: it does not, or no `spec`
        and the wave as it is fits); `drop` is a kept server that the new one replaces."""
        kept = [w for w in self.kept if w is not drop]
        est = self.need_of(spec) if spec is not None else None
        new = [*self.new, *([(spec, est)] if spec is not None and est is not None else [])]
        if fits(self.need(new, kept), self.have_max(kept)):
            return est
        return None


def _serving(state: Sequence[Warm], spec: ServerSpec) -> Warm | None:
    """The warm server of `spec`'s family with the most slots (a busy one too: its queue takes the calls)."""
    same = [w for w in state if w.spec.family == spec.family]
    return max(same, key=lambda w: (w.spec.slots, w.idle)) if same else None


def _one_wave(demands: Sequence[Demand], remaining: list[int], state: list[Warm], have: Devices,
              need_of: NeedOf, budget: bool) -> Wave:
    room = _Room(state, have, need_of, budget)
    placements: list[Placement] = []
    restarts: list[Warm] = []
    # warm servers first: they cost nothing, and the wave must not stop them to start something else
    for i, demand in enumerate(demands):
        if remaining[i] and (w := _serving(state, demand.spec)) is not None and w not in room.kept:
            room.kept.append(w)
    for i, demand in enumerate(demands):
        want = remaining[i]
        if not want:
            continue
        w = _serving(state, demand.spec)
        if w is not None and w in room.kept:
            if w.spec.slots < want and w.idle:  # a restart with more slots, when that fits, saves waves
                for k in range(want, w.spec.slots, -1):
                    spec = with_slots(demand.spec, k)
                    est = room.fits_with(spec, drop=w)
                    if est is not None:
                        room.kept.remove(w)
                        restarts.append(w)
                        room.new.append((spec, est))
                        placements.append(Placement(i, spec, k, None, est))
                        break
                else:
                    placements.append(Placement(i, w.spec, min(want, w.spec.slots), w))
            else:
                placements.append(Placement(i, w.spec, min(want, w.spec.slots), w))
            continue
        for k in range(want, 0, -1):
            spec = with_slots(demand.spec, k)
            est = room.fits_with(spec)
            if est is not None:
                room.new.append((spec, est))
                placements.append(Placement(i, spec, k, None, est))
                break
    _prefer_planned_slots(demands, placements, room)
    restart_ids = {id(w) for w in restarts}
    rest = [w for w in state if id(w) not in restart_ids]
    have_after_restarts = plus(have, freed_all([w.holding for w in restarts], [w.holding for w in rest],
                                               budget=budget))
    victims = [w for w in room.victims(room.kept) if id(w) not in restart_ids]
    victim_ids = {id(w) for w in victims}
    stops = list(restarts) + _evictions([e for _, e in room.new], have_after_restarts, victims,
                                        [w for w in rest if id(w) not in victim_ids], budget)
    stop_ids = {id(w) for w in stops}
    kept_after = [w.holding for w in state if id(w) not in stop_ids]
    shared = {h.path for h in kept_after}
    need = combined_need([e for _, e in room.new], shared, budget=budget)
    usable = plus(have, freed_all([w.holding for w in stops], kept_after, budget=budget))
    placements.sort(key=lambda p: p.demand)
    return Wave(placements, stops, need, usable)


def _prefer_planned_slots(demands: Sequence[Demand], placements: list[Placement], room: _Room) -> None:
    """Give a new server as many of the plan's slots (the most any stage asks of it, so later stages reuse
    it) as fit in what the wave may use anyway (it never costs a stop the wave would not make)."""
    victims = room.victims(room.kept)
    victim_ids = {id(w) for w in victims}
    base_victims = _evictions([e for _, e in room.new], room.have, victims,
                              [w for w in room.state if id(w) not in victim_ids], room.budget)
    ids = {id(w) for w in base_victims}
    keep = [w.holding for w in room.state if id(w) not in ids]
    usable = plus(room.have, freed_all([w.holding for w in base_victims], keep, budget=room.budget))
    shared = {h.path for h in keep}
    for p in placements:
        planned = demands[p.demand].spec.slots
        if not p.starts:
            continue
        for k in range(planned, p.spec.slots, -1):  # as many of the planned slots as fit
            spec = with_slots(p.spec, k)
            est = room.need_of(spec)
            trial = [(s, e) if s is not p.spec else (spec, est) for s, e in room.new]
            if fits(combined_need([e for _, e in trial], shared, budget=room.budget), usable):
                room.new = trial
                p.spec, p.estimate = spec, est
                break


def _evictions(new: Sequence[MemoryEstimate], have: Devices, victims: Sequence[Warm], keep: Sequence[Warm],
               budget: bool) -> list[Warm]:
    """Victims in order (least recently used first) until the `new` servers fit. Their need is counted
    against the servers still up at each step: a file that a server left running maps needs no RAM again."""
    out: list[Warm] = []
    remaining = list(victims)

    def need() -> Devices:
        return combined_need(new, {w.holding.path for w in [*remaining, *keep]}, budget=budget)

    while not fits(need(), have) and remaining:
        w = remaining.pop(0)
        have = plus(have, freed(w.holding, [r.holding for r in [*remaining, *keep]], budget=budget))
        out.append(w)
    return out


# ---------------------------------------------------------------- whole-group figures


def _unfit(demands: Sequence[Demand], state: list[Warm], have: Devices, need_of: NeedOf,
           budget: bool) -> tuple[list[Unfit], list[Unknown]]:
    """Demands whose one-slot server does not fit even alone, with every idle server stopped; and those
    with no estimate at all."""
    out: list[Unfit] = []
    unknown: list[Unknown] = []
    idle = [w for w in state if w.idle]
    busy = [w for w in state if not w.idle]
    have_max = plus(have, freed_all([w.holding for w in idle], [w.holding for w in busy], budget=budget))
    shared = {w.holding.path for w in busy}
    for i, demand in enumerate(demands):
        if _serving(state, demand.spec) is not None:
            continue
        try:
            est = need_of(with_slots(demand.spec, 1))
        except ChorusError as exc:
            unknown.append(Unknown(i, str(exc)))
            continue
        need = combined_need([est], shared, budget=budget)
        if not fits(need, have_max):
            out.append(Unfit(i, need, have_max))
    return out, unknown


def _together(demands: Sequence[Demand], state: list[Warm], have: Devices, need_of: NeedOf,
              budget: bool) -> tuple[Devices, Devices]:
    """What every demand needs at its full call count at once (warm servers that serve it need nothing
    new), and what is usable for that with every other idle server stopped."""
    kept: list[Warm] = []
    ests = []
    for demand in demands:
        w = _serving(state, demand.spec)
        if w is not None and w.spec.slots >= demand.calls:
            kept.append(w)
            continue
        try:
            ests.append(need_of(with_slots(demand.spec, max(1, demand.calls))))
        except ChorusError:
            continue
    keep_ids = {id(w) for w in kept}
    victims = [w for w in state if w.idle and id(w) not in keep_ids]
    vic_ids = {id(w) for w in victims}
    keep = [w.holding for w in state if id(w) not in vic_ids]
    need = combined_need(ests, {h.path for h in keep}, budget=budget)
    return need, plus(have, freed_all([w.holding for w in victims], keep, budget=budget))
