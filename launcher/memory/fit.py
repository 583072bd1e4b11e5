"""Need-versus-have arithmetic over devices ('ram', 'gpu0'..., 'budget'): pure functions, no probing.

Servers of the same model file share its memory-mapped weights (page cache), so RAM counts a file's
mapped bytes once, and not at all when a server that stays up already maps it. The budget is a cap
on what the servers hold in all, so on 'budget' each server counts its whole footprint (RAM + VRAM).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from launcher.memory.estimate import MemoryEstimate
from launcher.memory.probes import BUDGET
from launcher.process.server import ServerSpec

Devices = dict[str, int]


def footprint(est: MemoryEstimate) -> int:
    """What one server counts against the budget: all its RAM and VRAM."""
    return est.ram_bytes + est.vram_bytes


class Served(Protocol):
    """A server that holds memory: a running `ModelServer`, or one a what-if plans to start."""

    @property
    def spec(self) -> ServerSpec: ...

    @property
    def model(self) -> str: ...


@dataclass(frozen=True)
class Holding:
    """What a running server holds: its own RAM, the file pages it maps (shared per file), its VRAM,
    and its footprint on the budget (the larger of measured and needed: the budget is a cap)."""

    server: Served
    path: str
    anon_ram: int
    mapped_ram: int
    vram: dict[str, int]
    budget: int = 0

    @property
    def total(self) -> int:
        return self.anon_ram + self.mapped_ram + sum(self.vram.values())


@dataclass(frozen=True)
class Availability:
    """Free memory per device, the total, and the margin kept free; `have` is what may be used.
    `notes` says where a device's figure comes from (the cgroup's limit, the budget's scope)."""

    free: dict[str, int]
    total: dict[str, int]
    margin: dict[str, int]
    gpu_note: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def have(self) -> dict[str, int]:
        return {d: max(0, n - self.margin.get(d, 0)) for d, n in self.free.items()}

    def capacity(self) -> dict[str, int]:
        """What each device could give with nothing of ours running: total less the margin."""
        return {d: max(0, n - self.margin.get(d, 0)) for d, n in self.total.items()}

    @property
    def ram_bytes(self) -> int:
        return self.have().get("ram", 0)

    @property
    def vram_bytes(self) -> int:
        return sum(n for d, n in self.have().items() if d.startswith("gpu"))

    def to_dict(self) -> dict[str, object]:
        return {"ram_bytes": self.ram_bytes, "vram_bytes": self.vram_bytes,
                "devices": {d: {"free_bytes": self.free[d], "total_bytes": self.total.get(d),
                                "margin_bytes": self.margin.get(d, 0), "usable_bytes": n,
                                "note": self.notes.get(d)}
                            for d, n in self.have().items()},
                "gpu_note": self.gpu_note}


def combined_need(estimates: Iterable[MemoryEstimate], shared_paths: Iterable[str] = (), *,
                  budget: bool = False) -> Devices:
    """What several servers need together: mapped weights count once per file, and not at all for a file
    that a server already running (``shared_paths``) maps; with `budget`, their footprints on 'budget'."""
    shared = set(shared_paths)
    total: Devices = {"ram": 0}
    mapped: dict[str, int] = {}
    spent = 0
    for est in estimates:
        for device, n in est.need().items():
            total[device] = total.get(device, 0) + (n - est.mapped_bytes if device == "ram" else n)
        if est.model_path not in shared:
            mapped[est.model_path] = max(mapped.get(est.model_path, 0), est.mapped_bytes)
        spent += footprint(est)
    total["ram"] += sum(mapped.values())
    if budget:
        total[BUDGET] = spent
    return total


def held(holdings: Iterable[Holding], *, budget: bool = False) -> Devices:
    """What running servers hold together (mapped files once)."""
    total: Devices = {"ram": 0}
    mapped: dict[str, int] = {}
    for h in holdings:
        total["ram"] += h.anon_ram
        mapped[h.path] = max(mapped.get(h.path, 0), h.mapped_ram)
        for device, n in h.vram.items():
            total[device] = total.get(device, 0) + n
        if budget:
            total[BUDGET] = total.get(BUDGET, 0) + h.budget
    total["ram"] += sum(mapped.values())
    return total


def freed(h: Holding, remaining: Iterable[Holding], *, budget: bool = False) -> Devices:
    """What stopping `h` frees while `remaining` keep running (its mapped file only if it was the last user)."""
    shared = any(r.path == h.path for r in remaining)
    out = {"ram": h.anon_ram + (0 if shared else h.mapped_ram), **h.vram}
    if budget:
        out[BUDGET] = h.budget
    return out


def freed_all(stop: Iterable[Holding], keep: Iterable[Holding], *, budget: bool = False) -> Devices:
    """What stopping every server of `stop` frees while `keep` run."""
    out: Devices = {"ram": 0}
    stopped, kept = list(stop), list(keep)
    while stopped:
        h = stopped.pop()
        out = plus(out, freed(h, [*stopped, *kept], budget=budget))
    return out


def fits(need: Devices, have: Devices) -> bool:
    return all(n <= have.get(device, 0) for device, n in need.items() if n > 0)


def short_of(need: Devices, have: Devices) -> list[str]:
    """The devices where `need` is more than `have`."""
    return [d for d, n in need.items() if n > 0 and n > have.get(d, 0)]


def plus(a: Devices, b: Devices) -> Devices:
    return {d: a.get(d, 0) + b.get(d, 0) for d in {*a, *b}}


def minus(a: Devices, b: Devices) -> Devices:
    return {d: a.get(d, 0) - b.get(d, 0) for d in {*a, *b}}
