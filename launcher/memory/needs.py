"""What one server needs: the estimator's figure for its spec, or what such a server measured last time.

The estimate comes from `launcher.memory.estimate.estimate_for` (cached by file identity and spec); a
calibration record of the same configuration replaces it (`launcher.memory.calibration`). A variant of a
calibrated spec (another n_ctx, fewer GPU layers) moves the measurement by the formula's difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypedDict, Unpack

from launcher.memory.calibration import CalibrationCache, CalibrationRecord
from launcher.memory.estimate import EstimatorSettings, MemoryEstimate, estimate_for
from launcher.memory.fit import minus, plus
from launcher.memory.probes import GpuMemory
from launcher.process.server import ServerSpec


class LoadChanges(TypedDict, total=False):
    """The load parameters a variant may change (what `launcher.memory.suggest` tries)."""

    n_ctx: int
    n_gpu_layers: int
    slots: int


class Needs:
    """Estimate and calibrated need of server specs on a machine with the GPUs `gpus()` returns."""

    def __init__(self, gpus: Callable[[], Sequence[GpuMemory]], calibration: CalibrationCache | None = None,
                 settings: EstimatorSettings | None = None) -> None:
        self.gpus = gpus
        self.calibration = calibration
        self.settings = settings or EstimatorSettings()

    def estimate(self, spec: ServerSpec) -> MemoryEstimate:
        """The formula's figure for `spec` (GGUFError when the file is not readable or not valid)."""
        return estimate_for(spec, tuple(self.gpus()), self.settings)

    def need(self, spec: ServerSpec) -> MemoryEstimate:
        """The calibrated figure when this configuration was measured before, else the estimate."""
        est = self.estimate(spec)
        rec = self.calibration.get(spec) if self.calibration is not None else None
        return calibrated(est, rec) if rec is not None else est

    def variant(self, spec: ServerSpec, base: MemoryEstimate, **changes: Unpack[LoadChanges]) -> MemoryEstimate:
        """The need of `spec` with other load parameters; a calibrated base moves by the formula's delta."""
        other = dataclasses.replace(spec, **changes)
        est = self.estimate(other)
        rec = self.calibration.get(other) if self.calibration is not None else None
        if rec is not None:
            return calibrated(est, rec)
        if base.source == "calibrated" and base.estimate is not None:
            delta = minus(est.need(), base.estimate.need())
            need = {d: max(0, n + delta.get(d, 0)) for d, n in plus(base.need(), {d: 0 for d in delta}).items()}
            return dataclasses.replace(est, breakdown={d: {"calibrated": n} for d, n in need.items()},
                                       source="calibrated", estimate=est)
        return est


def calibrated(est: MemoryEstimate, rec: CalibrationRecord) -> MemoryEstimate:
    """`est` with the measured figures of `rec` (VRAM: measured when NVML gave per-process figures).

    RAM is measured as RSS right after the start, which counts only the pages touched so far: the KV cache
    and compute buffers fill as prompts come (gemma3-270m, n_ctx 2048: 332 MiB after the start, 382 MiB
    after a 1000-token prompt, as estimated). So a measurement raises the RAM need, never lowers it below
    the estimate of the peak; VRAM is allocated whole at the start, and its measurement stands."""
    need = {"ram": max(rec.ram_bytes, est.ram_bytes)}
    for device, n in est.need().items():
        if device != "ram":
            need[device] = rec.vram_bytes.get(device, n)
    return dataclasses.replace(est, breakdown={d: {"calibrated": n} for d, n in need.items()},
                               mapped_bytes=min(rec.mapped_bytes or est.mapped_bytes, rec.ram_bytes),
                               source="calibrated", estimate=est)
