"""Admission: does a server fit next to what runs, and how do several pack into waves that fit.

`MemoryGuard` is the one object the rest of chorus talks to; each of its jobs lives in its own module:

- what is free: the probe (`launcher.memory.probes`: RAM from psutil and the cgroup, VRAM from NVML, and the
  budget as the device 'budget' when app.yaml's ``server.memory_budget_mib`` is set);
- what a server needs: `launcher.memory.needs` (the estimator, cached by file identity, or calibration);
- what running servers hold and what stopping one frees: `launcher.memory.fit`;
- who is admitted, pending or running, across every chorus process: `launcher.memory.ledger`;
- waves, slots and which warm servers stop: `launcher.memory.schedule` (from one `MemoryState`, see `state`);
  hints for a refusal: `launcher.memory.suggest`.

`check_fit` admits one start in a ledger transaction (`InsufficientMemory`, need and have per device,
when it does not fit); `reserve` admits a wave's starts together. The guard never stops a server: the
scheduler decides which ones stop and the runtime executes that. A margin is kept free on RAM and each
GPU (by default 10% of the device plus 512 MiB); the budget is itself the cap and keeps none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from launcher.errors import ChorusError, InsufficientMemory
from launcher.memory.calibration import CalibrationCache, CalibrationRecord, measure_server
from launcher.memory.estimate import EstimatorSettings, MemoryEstimate
from launcher.memory.fit import Availability, Devices, Holding, combined_need, footprint, held
from launcher.memory.ledger import AdmissionLedger, LedgerEntry, default_ledger_path, this_process
from launcher.memory.needs import LoadChanges, Needs
from launcher.memory.probes import (
    BUDGET,
    BudgetProbe,
    GpuMemory,
    MemoryProbe,
    SystemMemory,
    SystemProbe,
    process_memory,
    process_vram,
)
from launcher.memory.schedule import Demand, Schedule, Warm, schedule
from launcher.memory.suggest import suggestions
from launcher.process.server import ModelServer, ServerSpec
from launcher.units import MiB, fmt_bytes

__all__ = ["DEFAULT_MARGIN_FIXED_BYTES", "DEFAULT_MARGIN_FRACTION", "PENDING_TTL_S", "Availability",
           "Demand", "Holding", "MemoryGuard", "MemoryState", "Schedule", "Warm", "combined_need", "fmt_bytes"]

log = logging.getLogger("chorus.admission")

DEFAULT_MARGIN_FRACTION = 0.10
DEFAULT_MARGIN_FIXED_BYTES = 512 * MiB
PENDING_TTL_S = 180.0  # a start admitted but not seen running yet is counted for at most this long


def _path(spec: ServerSpec) -> str:
    try:
        return str(Path(spec.model_path).resolve())
    except OSError:
        return str(spec.model_path)


class MemoryGuard:
    """The memory fit check before every server start, and the planner of waves."""

    def __init__(self, probe: MemoryProbe | None = None, margin_fraction: float = DEFAULT_MARGIN_FRACTION,
                 margin_fixed_bytes: int = DEFAULT_MARGIN_FIXED_BYTES,
                 calibration: CalibrationCache | None = None, *, settings: EstimatorSettings | None = None,
                 budget_bytes: int | None = None, ledger: AdmissionLedger | None = None) -> None:
        """`budget_bytes` adds the 'budget' device; `ledger` is where admissions are shared (by default
        the per-user file of `launcher.memory.ledger.default_ledger_path` when there is a budget, else memory)."""
        base: MemoryProbe = probe if probe is not None else SystemProbe()
        self.budget_bytes = budget_bytes
        self.ledger = ledger if ledger is not None else AdmissionLedger(
            default_ledger_path() if budget_bytes is not None else None)
        self.probe: MemoryProbe = BudgetProbe(base, budget_bytes, self.ledger) if budget_bytes is not None else base
        self.margin_fraction = margin_fraction
        self.margin_fixed_bytes = margin_fixed_bytes
        self.needs = Needs(self.gpus, calibration, settings)
        self._gpus: tuple[GpuMemory, ...] | None = None
        self._gpu_note: str | None = None
        self._calibrated: set[int] = set()
        self._lock = threading.Lock()
        # starts admitted but not yet among `running` (concurrent starts must not all see the same free memory)
        self._pending: dict[tuple[object, ...], tuple[MemoryEstimate, float, float]] = {}
        self._settling: dict[tuple[object, ...], tuple[MemoryEstimate, float]] = {}  # over, server not reported yet
        self._known: dict[int, ModelServer] = {}  # every server seen running, for the shared ledger
        self._check_lock = threading.RLock()
        self.pending_ttl_s = PENDING_TTL_S

    @property
    def calibration(self) -> CalibrationCache | None:
        return self.needs.calibration

    @property
    def settings(self) -> EstimatorSettings:
        return self.needs.settings

    @property
    def budgeted(self) -> bool:
        return self.budget_bytes is not None

    # ---------------------------------------------------------------- the machine

    @property
    def live(self) -> bool:
        """Whether the probe's RAM and GPU figures already exclude what running servers hold (a real machine)."""
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
        """Kept free per device; none on the budget, which is a cap already."""
        return {d: 0 if d == BUDGET else int(n * self.margin_fraction) + self.margin_fixed_bytes
                for d, n in total.items()}

    def available(self, running: Sequence[ModelServer] = ()) -> Availability:
        """Free memory with `running` up, per device (the budget included)."""
        return self._available([s for s in running if s.is_alive()])[0]

    def _available(self, alive: list[ModelServer]) -> tuple[Availability, list[Holding]]:
        """A static figure is for a machine without our servers (a simulated one, and the budget), so
        what the running servers hold is taken off here; a live probe's RAM and VRAM already exclude it."""
        snap = self.snapshot(alive)
        free, total = snap.free(), snap.total()
        holdings = self.holdings(alive)
        static = set(free) if not self.live else set(snap.static_devices)
        if alive and static:
            taken = held(holdings, budget=self.budgeted)
            free = {d: n - taken.get(d, 0) if d in static else n for d, n in free.items()}
        notes = {d.name: d.note for d in snap.extra if d.note}
        if snap.cgroup is not None and snap.ram_limited_by == "cgroup":
            cg = snap.cgroup
            notes["ram"] = (f"container limit {fmt_bytes(cg.limit_bytes)}, {fmt_bytes(cg.usage_bytes)} used "
                            f"(cgroup v{cg.version} {cg.path})")
        return Availability(free, total, self.margin(total), snap.gpu_note, notes), holdings

    # ---------------------------------------------------------------- needs

    def estimate(self, spec: ServerSpec) -> MemoryEstimate:
        """The formula's figure for `spec` on this machine (GGUFError when the file is not readable)."""
        return self.needs.estimate(spec)

    def need(self, spec: ServerSpec) -> MemoryEstimate:
        """The calibrated figure when this configuration was measured before, else the estimate."""
        return self.needs.need(spec)

    def need_or_none(self, spec: ServerSpec) -> MemoryEstimate | None:
        """`need`, or None when the file cannot be read (its server's start reports why)."""
        try:
            return self.need(spec)
        except ChorusError:
            return None

    def holdings(self, running: Sequence[ModelServer]) -> list[Holding]:
        """What each running server holds: measured on a live machine, else its (calibrated) need."""
        alive = [s for s in running if s.is_alive()]
        vram = process_vram([s.pid for s in alive if s.pid is not None]) if self.live else {}
        out = []
        for s in alive:
            need = self.need_or_none(s.spec)
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
            spent = max(anon + mapped + sum(gpu.values()), footprint(need) if need else 0)
            out.append(Holding(s, _path(s.spec), anon, mapped, gpu, spent))
        return out

    def others_note(self) -> str:
        """"; other chorus processes hold N of the budget (`chorus ps`)" when they do, else "": a model that
        "does not fit even alone" may fit once they stop their servers."""
        if not (self.budgeted and self.ledger.shared):
            return ""
        held = self.ledger.held(BUDGET)
        return f"; other chorus processes hold {fmt_bytes(held)} of the budget (`chorus ps`)" if held else ""

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
        """Calibrate the running servers not measured yet (cheap: /proc, NVML, the log head), and record
        them in the shared ledger so other chorus processes count them against the budget."""
        self._observe(running)
        if self.ledger.shared:
            with self._check_lock, self.ledger.transaction() as entries:
                self._share(entries)

    def _observe(self, running: Sequence[ModelServer]) -> None:
        for server in running:
            with self._lock:
                seen = server.pid is None or server.pid in self._calibrated
                if server.is_alive():
                    self._known[id(server)] = server
            if not seen and server.is_alive():
                try:
                    self.calibrate(server)
                except Exception:  # calibration must never stop a start
                    log.warning("could not calibrate '%s'", server.model, exc_info=True)

    # ---------------------------------------------------------------- admission

    def check_fit(self, spec: ServerSpec, running: list[ModelServer]) -> None:
        """Raise InsufficientMemory when `spec` cannot start next to `running` (the pool's FitCheck).

        Decided and recorded in one ledger transaction, so chorus processes sharing a budget take turns.
        """
        self._observe(running)
        try:
            est = self.need(spec)
        except ChorusError as exc:  # an unreadable file: let the server report it as a typed error
            log.debug("no memory estimate for '%s': %s", spec.model, exc)
            return
        alive = [s for s in running if s.is_alive()]
        with self._check_lock, self.ledger.transaction() as entries:
            pending = self._live_pending(alive, exclude=spec.key)
            avail, holdings = self._available(alive)
            shared = {_path(s.spec) for s in alive}
            need = combined_need([est], shared | {e.model_path for e in pending}, budget=self.budgeted)
            have = avail.have()
            if pending:  # admitted starts still loading: not in `running`, maybe not yet in the probe
                loading = combined_need(pending, shared, budget=self.budgeted)
                have = {d: max(0, n - loading.get(d, 0)) for d, n in have.items()}
            need = {d: n for d, n in need.items() if n > 0 or d == "ram"}
            admitted = all(n <= have.get(d, 0) for d, n in need.items() if n > 0)
            if admitted:
                self._pending[spec.key] = (est, time.monotonic(), time.time())
            self._share(entries)
            others = {BUDGET: self.ledger.held(BUDGET)} if self.budgeted and self.ledger.shared else {}
        if admitted:
            return
        raise InsufficientMemory(spec.model, need, {d: have.get(d, 0) for d in need},
                                 self._suggest(spec, est, need, have, holdings, avail, others))

    def _live_pending(self, alive: Sequence[ModelServer], exclude: tuple[object, ...]) -> list[MemoryEstimate]:
        """Admitted starts not yet running; dropped once their server runs, or after `pending_ttl_s`."""
        keys = {s.spec.key for s in alive}
        now = time.monotonic()
        self._pending = {k: v for k, v in self._pending.items()
                         if k not in keys and k != exclude and now - v[1] < self.pending_ttl_s}
        return [v[0] for v in self._pending.values()]

    def starting(self) -> bool:
        """Whether a start this process admitted is under way (its memory is held, its server not up yet)."""
        with self._check_lock:
            now = time.monotonic()
            return any(now - v[1] < self.pending_ttl_s for v in self._pending.values())

    def forget(self, spec: ServerSpec) -> None:
        """An admitted start is over (it runs now, or it failed): stop counting it as pending. Other
        processes keep counting it for a few seconds, until `observe` reports its server (or not)."""
        with self._check_lock:
            item = self._pending.pop(spec.key, None)
            if item is not None and self.ledger.shared:
                self._settling[spec.key] = (item[0], time.time())
                with self.ledger.transaction() as entries:
                    self._share(entries)

    def _share(self, entries: list[LedgerEntry]) -> None:
        """Inside a ledger transaction: this process's entries become its running, pending and settling
        starts (cheap: needs, no measuring). Nothing to share for a ledger in memory."""
        if not self.ledger.shared:
            return
        pid, started = this_process()
        with self._lock:
            self._known = {k: s for k, s in self._known.items() if s.is_alive()}
            servers = list(self._known.values())
        own: list[LedgerEntry] = []
        running_keys = set()
        for s in servers:
            need = self.need_or_none(s.spec)
            if need is None:
                continue
            running_keys.add(s.spec.key)
            own.append(LedgerEntry(pid, started, repr(s.spec.key), s.model, self._devices(need), "running",
                                   server_pid=s.pid))
        now = time.time()
        self._settling = {k: v for k, v in self._settling.items()
                          if k not in running_keys and now - v[1] < self.ledger.settle_s}
        for key, (est, _, since) in self._pending.items():
            own.append(LedgerEntry(pid, started, repr(key), est.model, self._devices(est), "pending", since))
        for key, (est, since) in self._settling.items():
            own.append(LedgerEntry(pid, started, repr(key), est.model, self._devices(est), "settling", since))
        self.ledger.replace_own(entries, own)

    def _devices(self, est: MemoryEstimate) -> dict[str, int]:
        return {**est.need(), **({BUDGET: footprint(est)} if self.budgeted else {})}

    def suggestions(self, spec: ServerSpec, est: MemoryEstimate, need: dict[str, int], have: dict[str, int],
                    running: Sequence[ModelServer] = ()) -> list[str]:
        """Concrete ways to make `spec` fit: a smaller n_ctx, fewer GPU layers, stopping other servers."""
        alive = [s for s in running if s.is_alive()]
        avail, holdings = self._available(alive)
        others = {BUDGET: self.ledger.held(BUDGET)} if self.budgeted and self.ledger.shared else {}
        return self._suggest(spec, est, need, have, holdings, avail, others)

    def _suggest(self, spec: ServerSpec, est: MemoryEstimate, need: Devices, have: Devices,
                 holdings: list[Holding], avail: Availability, others: Devices) -> list[str]:
        shared = {h.path for h in holdings}

        def variant_need(**changes: Unpack[LoadChanges]) -> Devices | None:
            try:
                other = self.needs.variant(spec, est, **changes)
            except ChorusError:
                return None
            return combined_need([other], shared, budget=self.budgeted)

        return suggestions(spec, est, need, have, holdings, variant_need, capacity=avail.capacity(), others=others)

    # ---------------------------------------------------------------- scheduling

    def state(self, running: Sequence[ModelServer] = (), *, idle: Callable[[ModelServer], bool] | None = None,
              last_used: Callable[[ModelServer], float] | None = None) -> MemoryState:
        """One view of memory for the scheduler: each live server once (what it really holds, whether it
        is idle, when it was used last), and what is usable beside them now, less the starts admitted
        but still loading (not in the probe yet)."""
        alive = [s for s in running if s.is_alive()]
        with self._check_lock:
            pending = self._live_pending(alive, exclude=())
            avail, holdings = self._available(alive)
        have = avail.have()
        if pending:
            loading = combined_need(pending, {h.path for h in holdings}, budget=self.budgeted)
            have = {d: max(0, n - loading.get(d, 0)) for d, n in have.items()}
        warm = []
        for h in holdings:
            server = h.server
            assert isinstance(server, ModelServer)
            warm.append(Warm(h, idle=idle(server) if idle is not None else True,
                             last_used=last_used(server) if last_used is not None else 0.0))
        return MemoryState(warm, have, avail)

    def schedule(self, demands: Sequence[Demand], state: MemoryState) -> Schedule:
        """The waves, slots and stops for `demands` from `state` (live, or a what-if's)."""
        return schedule(demands, state.warm, state.have, self.need, budget=self.budgeted)

    def reserve(self, specs: Sequence[ServerSpec], running: list[ModelServer]) -> None:
        """Admit a wave's new servers together (each counted as pending until it runs), or none of them:
        InsufficientMemory for the first that does not fit, with need vs have."""
        done: list[ServerSpec] = []
        try:
            for spec in specs:
                self.check_fit(spec, running)
                done.append(spec)
        except BaseException:
            for spec in done:
                self.forget(spec)
            raise

    def reserved(self, spec: ServerSpec) -> bool:
        """Whether a start of `spec` was admitted (by `reserve`) and has not run yet."""
        with self._check_lock:
            item = self._pending.get(spec.key)
            return item is not None and time.monotonic() - item[1] < self.pending_ttl_s


@dataclass
class MemoryState:
    """The scheduler's one view of memory: warm servers, usable memory beside them, and the probe's figures."""

    warm: list[Warm]
    have: Devices
    available: Availability

    def after(self, schedule: Schedule) -> MemoryState:
        """The state a schedule leaves (its started servers warm, its stopped ones gone)."""
        return MemoryState(list(schedule.warm_after), dict(schedule.have_after), self.available)
