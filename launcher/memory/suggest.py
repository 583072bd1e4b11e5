"""Concrete ways to make a refused server fit, for InsufficientMemory's hint.

A smaller n_ctx, fewer GPU layers, stopping other servers; and when none of them helps, the true
reason: the model is larger than the device even with nothing else up, or the room is held by other
servers (of this process, or of other chorus processes sharing the budget) and it fits once they stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from launcher.memory.estimate import KV_PAD, MemoryEstimate
from launcher.memory.fit import Devices, Holding, fits, freed, plus, short_of
from launcher.memory.probes import BUDGET
from launcher.process.server import ServerSpec
from launcher.units import fmt_bytes

SMALLEST_SUGGESTED_N_CTX = KV_PAD  # a hint's smallest n_ctx (the KV padding); MIN_N_CTX is the floor

# The need of the refused spec with other load parameters (n_ctx=..., n_gpu_layers=...), None if unknown.
VariantNeed = Callable[..., Devices | None]


def suggestions(spec: ServerSpec, est: MemoryEstimate, need: Devices, have: Devices, holdings: Sequence[Holding],
                variant_need: VariantNeed, *, capacity: Devices, others: Devices | None = None) -> list[str]:
    """Hints, best first. `capacity`: what each device gives with nothing of ours running; `others`:
    what other chorus processes hold (of the budget)."""
    out: list[str] = []
    short = short_of(need, have)
    budget = BUDGET in need

    def total(n: Devices) -> int:
        return sum(n.get(d, 0) for d in short)

    # a smaller context: the largest n_ctx that fits (multiples of 256; of 1024 from 1024 up)
    candidates = range(SMALLEST_SUGGESTED_N_CTX, spec.n_ctx, KV_PAD)
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        n = variant_need(n_ctx=candidates[mid])
        if n is not None and fits(n, have):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    if best is not None:
        nice = best // 1024 * 1024 if best >= 1024 else best
        saved = total(need) - total(variant_need(n_ctx=nice) or need)
        out.append(f"use n_ctx {nice} or less (saves {fmt_bytes(saved)})")

    # fewer slots: each holds its own n_ctx of KV cache (`chorus serve --slots`, a stage's parallel calls)
    if spec.slots > 1:
        fewer = _largest(lambda k: variant_need(slots=k), 1, spec.slots - 1, have)
        if fewer is not None:
            out.append(f"use {fewer} slot{'s' if fewer != 1 else ''} or fewer")

    # fewer GPU layers, when a GPU is short
    if any(d.startswith("gpu") for d in short) and est.gpu_layers_used > 0:
        for ngl in range(est.gpu_layers_used - 1, -1, -1):
            n = variant_need(n_gpu_layers=ngl)
            if n is not None and fits(n, have):
                out.append(f"use n_gpu_layers {ngl} or fewer" if ngl else "use n_gpu_layers 0 (run on the CPU)")
                break

    # stop other servers: the fewest, largest first, that cover the shortfall
    ordered = sorted(holdings, key=lambda h: -h.total)
    gained: Devices = {}
    chosen: list[tuple[Holding, int]] = []
    remaining = list(ordered)
    for h in ordered:
        remaining.remove(h)
        gain = freed(h, remaining, budget=budget)
        if not any(gain.get(d, 0) > 0 for d in short):
            remaining.append(h)
            continue
        chosen.append((h, max(h.budget, sum(n for d, n in gain.items() if d != BUDGET))))
        gained = plus(gained, gain)
        if fits(need, plus(have, gained)):
            out.extend(f"stop '{h.server.model}' (frees {fmt_bytes(n)})" for h, n in chosen)
            break

    if not out:
        out.extend(_why(need, have, short, capacity, others or {}, slots=spec.slots))
    if BUDGET in short:
        out.append("raise server.memory_budget_mib in app.yaml")
    return out


def _largest(need_of: Callable[[int], Devices | None], lo: int, hi: int, have: Devices) -> int | None:
    """The largest k in lo..hi whose need fits (needs grow with k)."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        n = need_of(mid)
        if n is not None and fits(n, have):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _why(need: Devices, have: Devices, short: list[str], capacity: Devices, others: Devices, *,
         slots: int = 1) -> list[str]:
    """The true reason per short device: too large for it at all, or held by other servers for now."""
    too_big = [d for d in short if need[d] > capacity.get(d, 0)]
    held = [d for d in short if d not in too_big]
    out = []
    if too_big:
        parts = ", ".join(f"{d} {fmt_bytes(need[d])} of {fmt_bytes(capacity.get(d, 0))} usable" for d in too_big)
        remedy = ("fewer slots or a smaller n_ctx (each slot holds its own KV cache)" if slots > 1
                  else "use a smaller quantization of the model" if too_big == [BUDGET]
                  else "free memory on this machine or use a smaller quantization of the model")
        out.append(f"it needs {parts} even with nothing else running: {remedy}")
    for d in held:
        by_others = others.get(d, 0)
        whom = (f"other chorus processes hold {fmt_bytes(by_others)} of it" if by_others
                else "other servers hold the rest")
        out.append(f"it needs {d} {fmt_bytes(need[d])}, {fmt_bytes(have.get(d, 0))} free now of "
                   f"{fmt_bytes(capacity.get(d, 0))} usable; {whom}: it fits once they stop")
    return out
