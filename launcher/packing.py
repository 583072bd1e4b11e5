"""Planning: pack each group of server specs (a pipeline stage) into waves that fit, and say which
running servers to stop first. Pure: the needs, holdings and free memory come from the caller.

Every device the availability reports takes part, the budget included, so a stage whose models
fit in RAM but not in the budget together runs in waves instead of failing at load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from launcher.estimate import MemoryEstimate
from launcher.fit import Availability, Devices, Holding, combined_need, fits, freed, freed_all, plus
from launcher.server import ModelServer, ServerSpec


@dataclass
class PlannedSpec:
    spec: ServerSpec
    estimate: MemoryEstimate
    reused: bool = False  # a running server already serves it: it needs nothing new

    @property
    def need(self) -> dict[str, int]:
        return {"ram": 0} if self.reused else self.estimate.need()


@dataclass
class GroupPlan:
    """One group of specs that would like to run at once (a pipeline stage)."""

    specs: list[PlannedSpec]
    fits_together: bool
    waves: list[list[int]]                 # indices into specs, run one wave after the other
    evict: list[ModelServer] = field(default_factory=list)  # stopped first, so that the first wave fits
    unfit: list[int] = field(default_factory=list)          # do not fit even alone, with all evictions
    need: dict[str, int] = field(default_factory=dict)      # of the whole group together


@dataclass
class FitPlan:
    groups: list[GroupPlan]
    available: Availability                 # now, nothing evicted
    evictable: dict[str, int]               # what stopping every evictable running server would free

    @property
    def fits(self) -> bool:
        """Every spec fits at least alone (the groups may still need several waves)."""
        return not any(g.unfit for g in self.groups)


def plan_group(specs: Sequence[ServerSpec], need: Callable[[ServerSpec], MemoryEstimate],
               holdings: list[Holding], can_evict: list[Holding], have_now: Devices, *,
               budget: bool = False) -> GroupPlan:
    """Waves for one group: all at once when they fit (after evicting what the group does not use),
    else first fit, largest first; a spec that does not fit even alone gets a wave of its own."""
    planned: list[PlannedSpec] = []
    kept: list[Holding] = []
    for spec in specs:
        match = next((h for h in holdings if h.server.spec.serves(spec)), None)
        planned.append(PlannedSpec(spec, need(spec), reused=match is not None))
        if match is not None and match not in kept:
            kept.append(match)
    victims = [h for h in can_evict if h not in kept]
    keep = [h for h in holdings if h not in victims]
    shared = {h.path for h in keep}
    have_max = plus(have_now, freed_all(victims, keep, budget=budget))

    def need_of(indices: Iterable[int]) -> Devices:
        return combined_need([planned[i].estimate for i in indices if not planned[i].reused], shared,
                             budget=budget)

    new = [i for i, p in enumerate(planned) if not p.reused]
    group_need = need_of(new)
    together = fits(group_need, have_max)
    unfit = [i for i in new if not fits(need_of([i]), have_max)]
    if together:
        waves = [list(range(len(planned)))] if planned else []
    else:
        bins: list[list[int]] = []
        for i in sorted((i for i in new if i not in unfit), key=lambda i: -planned[i].estimate.ram_bytes):
            for wave in bins:
                if fits(need_of([*wave, i]), have_max):
                    wave.append(i)
                    break
            else:
                bins.append([i])
        bins += [[i] for i in unfit]
        reused = [i for i, p in enumerate(planned) if p.reused]
        if reused:
            if not bins:
                bins.append([])
            bins[0].extend(reused)
        waves = sorted((sorted(w) for w in bins), key=lambda w: w[0])
    first = waves[0] if waves else []
    evict = evictions(need_of(i for i in first if i not in unfit), have_now, victims, keep, budget=budget)
    return GroupPlan(planned, together, waves, evict, unfit, group_need)


def evictions(need: Devices, have: Devices, victims: list[Holding], keep: list[Holding], *,
              budget: bool = False) -> list[ModelServer]:
    """Victims in the given order (least recently used first) until `need` fits."""
    out: list[ModelServer] = []
    remaining = list(victims)
    while not fits(need, have) and remaining:
        h = remaining.pop(0)
        have = plus(have, freed(h, [*remaining, *keep], budget=budget))
        out.append(h.server)
    return out
