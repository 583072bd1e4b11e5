"""Admission: does a server fit next to what runs, and how do several pack into waves that fit.

`MemoryGuard` joins the probe (what is free), the estimator (what a server needs, from the GGUF
header), calibration (what such a server really needed last time) and a margin kept free (by default
10% of each device plus 512 MiB). `check_fit` has the pool's `FitCheck` signature, so
``ServerPool(fit_check=guard.check_fit)`` refuses a start with `InsufficientMemory`, and the pool
stops idle servers, least recently used first, and asks again.

Servers of the same model file share its memory-mapped weights (page cache), so a second server of a
file needs only its own (anonymous) memory, and stopping one frees the weights only when it was the
last to map them.

Devices are named 'ram', 'gpu0', 'gpu1'...; an optional fixed budget (app.yaml's memory_budget_mib)
is the extra device 'budget'.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launcher.calibration import CalibrationCache, CalibrationRecord, measure_server
from launcher.errors import ChorusError, InsufficientMemory
from launcher.estimate import KV_PAD, EstimatorSettings, MemoryEstimate, estimate_memory
from launcher.gguf import read_gguf
from launcher.memory import GpuMemory, MemoryProbe, SystemMemory, SystemProbe, process_memory, process_vram
from launcher.server import ModelServer, ServerSpec
from launcher.units import MiB, fmt_bytes

log = logging.getLogger("chorus.admission")

DEFAULT_MARGIN_FRACTION = 0.10
DEFAULT_MARGIN_FIXED_BYTES = 512 * MiB
MIN_N_CTX = KV_PAD
PENDING_TTL_S = 180.0  # a start admitted but not seen running yet is counted for at most this long


def _path(spec: ServerSpec) -> str:
    try:
        return str(Path(spec.model_path).resolve())
    except OSError:
        return str(spec.model_path)


@dataclass(frozen=True)
class Holding:
    """What a running server holds: its own RAM, the file pages it maps (shared per file), its VRAM."""

    server: ModelServer
    path: str
    anon_ram: int
    mapped_ram: int
    vram: dict[str, int]


def combined_need(estimates: Iterable[MemoryEstimate], shared_paths: Iterable[str] = ()) -> dict[str, int]:
    """What several servers need together: mapped weights count once per file, and not at all for a file
    that a server already running (``shared_paths``) maps."""
    shared = set(shared_paths)
    total: dict[str, int] = {"ram": 0}
    mapped: dict[str, int] = {}
    for est in estimates:
        for device, n in est.need().items():
            total[device] = total.get(device, 0) + (n - est.mapped_bytes if device == "ram" else n)
        if est.model_path not in shared:
            mapped[est.model_path] = max(mapped.get(est.model_path, 0), est.mapped_bytes)
    total["ram"] += sum(mapped.values())
    return total


def _held(holdings: Iterable[Holding]) -> dict[str, int]:
    total: dict[str, int] = {"ram": 0}
    mapped: dict[str, int] = {}
    for h in holdings:
        total["ram"] += h.anon_ram
        mapped[h.path] = max(mapped.get(h.path, 0), h.mapped_ram)
        for device, n in h.vram.items():
            total[device] = total.get(device, 0) + n
    total["ram"] += sum(mapped.values())
    return total


def _fits(need: dict[str, int], have: dict[str, int]) -> bool:
    return all(n <= have.get(device, 0) for device, n in need.items() if n > 0)


def _plus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {d: a.get(d, 0) + b.get(d, 0) for d in {*a, *b}}


def _minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {d: a.get(d, 0) - b.get(d, 0) for d in {*a, *b}}


@dataclass(frozen=True)
class Availability:
    """Free memory per device, the total, and the margin kept free; `have` is what may be used."""

    free: dict[str, int]
    total: dict[str, int]
    margin: dict[str, int]
    gpu_note: str | None = None

    def have(self) -> dict[str, int]:
        return {d: max(0, n - self.margin.get(d, 0)) for d, n in self.free.items()}

    @property
    def ram_bytes(self) -> int:
        return self.have().get("ram", 0)

    @property
    def vram_bytes(self) -> int:
        return sum(n for d, n in self.have().items() if d.startswith("gpu"))

    def to_dict(self) -> dict[str, object]:
        return {"ram_bytes": self.ram_bytes, "vram_bytes": self.vram_bytes,
                "devices": {d: {"free_bytes": self.free[d], "total_bytes": self.total.get(d),
                                "margin_bytes": self.margin.get(d, 0), "usable_bytes": n}
                            for d, n in self.have().items()},
                "gpu_note": self.gpu_note}


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


class MemoryGuard:
    """The memory fit check before every server start, and the planner of waves."""

    def __init__(self, probe: MemoryProbe | None = None, margin_fraction: float = DEFAULT_MARGIN_FRACTION,
                 margin_fixed_bytes: int = DEFAULT_MARGIN_FIXED_BYTES,
                 calibration: CalibrationCache | None = None, *, settings: EstimatorSettings | None = None,
                 budget_bytes: int | None = None) -> None:
        self.probe: MemoryProbe = probe if probe is not None else SystemProbe()
        self.margin_fraction = margin_fraction
        self.margin_fixed_bytes = margin_fixed_bytes
        self.calibration = calibration
        self.settings = settings or EstimatorSettings()
        self.budget_bytes = budget_bytes
        self._gpus: tuple[GpuMemory, ...] | None = None
        self._gpu_note: str | None = None
        self._calibrated: set[int] = set()
        self._lock = threading.Lock()
        # starts admitted but not yet among `running` (concurrent starts must not all see the same free memory)
        self._pending: dict[tuple, tuple[MemoryEstimate, float]] = {}
        self._check_lock = threading.Lock()
        self.pending_ttl_s = PENDING_TTL_S

    # ---------------------------------------------------------------- the machine

    @property
    def live(self) -> bool:
        """Whether the probe's free figures already exclude what running servers hold (a real machine)."""
        return bool(getattr(self.probe, "live", True))

    def snapshot(self, running: Sequence[ModelServer] = ()) -> SystemMemory:
        pids = [s.pid for s in running if s.pid is not None and s.is_alive()]
        snap = self.probe.snapshot(pids)
        self._gpus, self._gpu_note = snap.gpus, snap.gpu_note
        return snap

    def gpus(self) -> tuple[GpuMemory, ...]:
        if self._gpus is None:
            self.snapshot()
        return self._gpus or ()

    def has_gpu(self) -> bool:
        return bool(self.gpus())

    @property
    def gpu_note(self) -> str | None:
        self.gpus()
        return self._gpu_note

    def margin(self, total: dict[str, int]) -> dict[str, int]:
        return {d: int(n * self.margin_fraction) + self.margin_fixed_bytes for d, n in total.items()}

    def available(self, running: Sequence[ModelServer] = ()) -> Availability:
        """Free memory with `running` up. A static probe's figures are for an empty machine, so what the
        running servers hold is taken off here; a live probe's figures already exclude it."""
        snap = self.snapshot(running)
        free, total = snap.free(), snap.total()
        if not self.live and running:
            free = _minus(free, _held(self.holdings(running)))
        return Availability(free, total, self.margin(total), snap.gpu_note)

    # ---------------------------------------------------------------- needs

    def estimate(self, spec: ServerSpec) -> MemoryEstimate:
        """The formula's figure for `spec` on this machine (GGUFError when the file is not readable)."""
        return estimate_memory(read_gguf(spec.model_path), spec, self.gpus(), self.settings)

    def need(self, spec: ServerSpec) -> MemoryEstimate:
        """The calibrated figure when this configuration was measured before, else the estimate."""
        est = self.estimate(spec)
        rec = self.calibration.get(spec) if self.calibration is not None else None
        return _calibrated(est, rec) if rec is not None else est

    def holdings(self, running: Sequence[ModelServer]) -> list[Holding]:
        """What each running server holds: measured on a live machine, else its (calibrated) need."""
        alive = [s for s in running if s.is_alive()]
        vram = process_vram([s.pid for s in alive if s.pid is not None]) if self.live else {}
        out = []
        for s in alive:
            try:
                need = self.need(s.spec)
            except ChorusError:
                need = None
            mem = process_memory(s.pid) if self.live and s.pid is not None else None
            if mem is not None:
                mapped = min(mem.rss_file_bytes, need.mapped_bytes) if need else mem.rss_file_bytes
                anon = mem.rss_bytes - mapped
            elif need is not None:
                anon, mapped = need.anon_ram_bytes, need.mapped_bytes
            else:
                anon, mapped = 0, 0
            gpu = {f"gpu{i}": n for i, n in vram.get(s.pid or -1, {}).items()}
            if not gpu and need is not None:  # no per-process figure from NVML: the need instead
                gpu = {d: n for d, n in need.need().items() if d != "ram"}
            out.append(Holding(s, _path(s.spec), anon, mapped, gpu))
        return out

    # ---------------------------------------------------------------- calibration

    def calibrate(self, server: ModelServer) -> CalibrationRecord | None:
        """Measure a running server and store it for its configuration; logs the estimate's error."""
        if server.pid is None:
            return None
        with self._lock:
            self._calibrated.add(server.pid)
        if self.calibration is None:
            return None
        measurement = measure_server(server)
        if measurement is None:
            return None
        try:
            est = self.estimate(server.spec)
        except ChorusError:
            est = None
        rec = self.calibration.record(server.spec, measurement, est)
        if rec is not None:
            log.info("calibrated '%s' (n_ctx=%d, n_gpu_layers=%d, slots=%d): RAM %s measured, %s estimated "
                     "(error %s)", server.model, server.spec.n_ctx, server.spec.n_gpu_layers, server.spec.slots,
                     fmt_bytes(measurement.rss_bytes), fmt_bytes(est.ram_bytes) if est else "-",
                     ", ".join(f"{d} {e:+.1f}%" for d, e in rec.error_pct.items()) or "-")
        return rec

    def observe(self, running: Sequence[ModelServer]) -> None:
        """Calibrate the running servers not measured yet (cheap: /proc, NVML, the log head)."""
        for server in running:
            with self._lock:
                seen = server.pid is None or server.pid in self._calibrated
            if not seen and server.is_alive():
                try:
                    self.calibrate(server)
                except Exception:  # calibration must never stop a start
                    log.warning("could not calibrate '%s'", server.model, exc_info=True)

    # ---------------------------------------------------------------- admission

    def check_fit(self, spec: ServerSpec, running: list[ModelServer]) -> None:
        """Raise InsufficientMemory when `spec` cannot start next to `running` (the pool's FitCheck)."""
        self.observe(running)
        try:
            est = self.need(spec)
        except ChorusError as exc:  # an unreadable file: let the server report it as a typed error
            log.debug("no memory estimate for '%s': %s", spec.model, exc)
            return
        alive = [s for s in running if s.is_alive()]
        with self._check_lock:
            pending = self._live_pending(alive, exclude=spec.key)
            avail = self.available(alive)
            shared = {_path(s.spec) for s in alive}
            need = combined_need([est], shared | {e.model_path for e in pending})
            have = avail.have()
            if pending:  # admitted starts still loading: not in `running`, maybe not yet in the probe
                have = {d: max(0, n - combined_need(pending, shared).get(d, 0)) for d, n in have.items()}
            if self.budget_bytes is not None:
                need["budget"] = est.ram_bytes + est.vram_bytes
                used = sum(sum(self.need(s.spec).need().values()) for s in alive)
                used += sum(e.ram_bytes + e.vram_bytes for e in pending)
                have["budget"] = max(0, self.budget_bytes - used)
            need = {d: n for d, n in need.items() if n > 0 or d == "ram"}
            if _fits(need, have):
                self._pending[spec.key] = (est, time.monotonic())
                return
        raise InsufficientMemory(spec.model, need, {d: have.get(d, 0) for d in need},
                                 self.suggestions(spec, est, need, have, alive))

    def _live_pending(self, alive: Sequence[ModelServer], exclude: tuple) -> list[MemoryEstimate]:
        """Admitted starts not yet running; dropped once their server runs, or after `pending_ttl_s`."""
        keys = {s.spec.key for s in alive}
        now = time.monotonic()
        self._pending = {k: v for k, v in self._pending.items()
                         if k not in keys and k != exclude and now - v[1] < self.pending_ttl_s}
        return [est for est, _ in self._pending.values()]

    def forget(self, spec: ServerSpec) -> None:
        """An admitted start is over (it runs now, or it failed): stop counting it as pending."""
        with self._check_lock:
            self._pending.pop(spec.key, None)

    def suggestions(self, spec: ServerSpec, est: MemoryEstimate, need: dict[str, int], have: dict[str, int],
                    running: Sequence[ModelServer] = ()) -> list[str]:
        """Concrete ways to make `spec` fit: a smaller n_ctx, fewer GPU layers, stopping other servers."""
        out: list[str] = []
        shared = {_path(s.spec) for s in running if s.is_alive()}
        short = [d for d, n in need.items() if n > have.get(d, 0)]

        def need_for(**changes: int) -> dict[str, int] | None:
            try:
                other = self._variant(spec, est, **changes)
            except ChorusError:
                return None
            n = combined_need([other], shared)
            if "budget" in have:
                n["budget"] = other.ram_bytes + other.vram_bytes
            return n

        def total(n: dict[str, int]) -> int:
            return sum(n.get(d, 0) for d in short)

        # a smaller context: the largest n_ctx that fits (multiples of 256; of 1024 from 1024 up)
        candidates = list(range(MIN_N_CTX, spec.n_ctx, KV_PAD))
        lo, hi, best = 0, len(candidates) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            n = need_for(n_ctx=candidates[mid])
            if n is not None and _fits(n, have):
                best, lo = candidates[mid], mid + 1
            else:
                hi = mid - 1
        if best is not None:
            nice = best // 1024 * 1024 if best >= 1024 else best
            saved = total(need) - total(need_for(n_ctx=nice) or need)
            out.append(f"use n_ctx {nice} or less (saves {fmt_bytes(saved)})")

        # fewer GPU layers, when a GPU is short
        if any(d.startswith("gpu") for d in short) and est.gpu_layers_used > 0:
            for ngl in range(est.gpu_layers_used - 1, -1, -1):
                n = need_for(n_gpu_layers=ngl)
                if n is not None and _fits(n, have):
                    out.append(f"use n_gpu_layers {ngl} or fewer" if ngl else
                               "use n_gpu_layers 0 (run on the CPU)")
                    break

        # stop other servers: the fewest, largest first, that cover the shortfall
        holdings = sorted(self.holdings(list(running)),
                          key=lambda h: -(h.anon_ram + h.mapped_ram + sum(h.vram.values())))
        freed: dict[str, int] = {}
        chosen: list[tuple[Holding, int]] = []
        remaining = list(holdings)
        for h in holdings:
            remaining.remove(h)
            gain = self._freed(h, remaining)
            if not any(gain.get(d, 0) > 0 for d in short):
                remaining.append(h)
                continue
            chosen.append((h, sum(n for d, n in gain.items() if d != "budget")))
            freed = _plus(freed, gain)
            if _fits(need, _plus(have, freed)):
                out.extend(f"stop '{h.server.model}' (frees {fmt_bytes(n)})" for h, n in chosen)
                break

        if not out:
            alone = ", ".join(f"{d} {fmt_bytes(need[d])}" for d in short)
            out.append(f"it needs {alone} even with nothing else running: free memory on this machine or use "
                       "a smaller quantization of the model")
        return out

    def _variant(self, spec: ServerSpec, base: MemoryEstimate, **changes: int) -> MemoryEstimate:
        """The need of `spec` with other load parameters; a calibrated base moves by the formula's delta."""
        other = dataclasses.replace(spec, **changes)
        est = self.estimate(other)
        rec = self.calibration.get(other) if self.calibration is not None else None
        if rec is not None:
            return _calibrated(est, rec)
        if base.source == "calibrated" and base.estimate is not None:
            delta = _minus(est.need(), base.estimate.need())
            need = {d: max(0, n + delta.get(d, 0)) for d, n in _plus(base.need(), {d: 0 for d in delta}).items()}
            return dataclasses.replace(est, breakdown={d: {"calibrated": n} for d, n in need.items()},
                                       source="calibrated", estimate=est)
        return est

    def _freed(self, h: Holding, remaining: Sequence[Holding]) -> dict[str, int]:
        """What stopping `h` frees while `remaining` keep running (its mapped file only if last user)."""
        shared = any(r.path == h.path for r in remaining)
        freed = {"ram": h.anon_ram + (0 if shared else h.mapped_ram), **h.vram}
        if self.budget_bytes is not None:
            freed["budget"] = h.anon_ram + h.mapped_ram + sum(h.vram.values())
        return freed

    # ---------------------------------------------------------------- planning

    def plan(self, groups: Sequence[Sequence[ServerSpec]], running: Sequence[ModelServer] = (),
             evictable: Callable[[ModelServer], bool] | None = None) -> FitPlan:
        """Pack each group's specs into waves that fit, counting running servers the group does not use
        as evictable (`evictable` may veto some, e.g. busy ones). Groups are planned one by one, as
        stages run one after the other."""
        running = [s for s in running if s.is_alive()]
        avail = self.available(running)
        have_now = avail.have()
        holdings = self.holdings(running)
        can_evict = [h for h in holdings if evictable is None or evictable(h.server)]
        all_free = self._freed_all(can_evict, [h for h in holdings if h not in can_evict])
        return FitPlan([self._plan_group(list(g), holdings, can_evict, have_now) for g in groups], avail, all_free)

    def _freed_all(self, stop: Sequence[Holding], keep: Sequence[Holding]) -> dict[str, int]:
        freed: dict[str, int] = {"ram": 0}
        stopped = list(stop)
        while stopped:
            h = stopped.pop()
            freed = _plus(freed, self._freed(h, [*stopped, *keep]))
        return freed

    def _plan_group(self, specs: list[ServerSpec], holdings: list[Holding], can_evict: list[Holding],
                    have_now: dict[str, int]) -> GroupPlan:
        planned: list[PlannedSpec] = []
        kept: list[Holding] = []
        for spec in specs:
            match = next((h for h in holdings if _serves(h.server.spec, spec)), None)
            planned.append(PlannedSpec(spec, self.need(spec), reused=match is not None))
            if match is not None and match not in kept:
                kept.append(match)
        victims = [h for h in can_evict if h not in kept]
        keep = [h for h in holdings if h not in victims]
        shared = {h.path for h in keep}
        have_max = _plus(have_now, self._freed_all(victims, keep))

        def need_of(indices: Iterable[int]) -> dict[str, int]:
            return combined_need([planned[i].estimate for i in indices if not planned[i].reused], shared)

        new = [i for i, p in enumerate(planned) if not p.reused]
        group_need = need_of(new)
        fits_together = _fits(group_need, have_max)
        unfit = [i for i in new if not _fits(need_of([i]), have_max)]
        if fits_together:
            waves = [list(range(len(planned)))] if planned else []
        else:  # first fit, largest first
            bins: list[list[int]] = []
            for i in sorted((i for i in new if i not in unfit), key=lambda i: -planned[i].estimate.ram_bytes):
                for wave in bins:
                    if _fits(need_of([*wave, i]), have_max):
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
        evict = self._evictions(need_of(i for i in first if i not in unfit), have_now, victims, keep)
        return GroupPlan(planned, fits_together, waves, evict, unfit, group_need)

    def _evictions(self, need: dict[str, int], have: dict[str, int], victims: list[Holding],
                   keep: list[Holding]) -> list[ModelServer]:
        """Victims in the given order (least recently used first) until `need` fits."""
        out: list[ModelServer] = []
        remaining = list(victims)
        while not _fits(need, have) and remaining:
            h = remaining.pop(0)
            have = _plus(have, self._freed(h, [*remaining, *keep]))
            out.append(h.server)
        return out


def _serves(running: ServerSpec, wanted: ServerSpec) -> bool:
    """Whether the pool would reuse a server of `running` for `wanted` (same key, at least as many slots)."""
    return running.serves(wanted)


def _calibrated(est: MemoryEstimate, rec: CalibrationRecord) -> MemoryEstimate:
    need = {"ram": rec.ram_bytes}
    for device, n in est.need().items():  # VRAM: measured when NVML gave per-process figures
        if device != "ram":
            need[device] = rec.vram_bytes.get(device, n)
    return dataclasses.replace(est, breakdown={d: {"calibrated": n} for d, n in need.items()},
                               mapped_bytes=min(rec.mapped_bytes or est.mapped_bytes, rec.ram_bytes),
                               source="calibrated", estimate=est)
