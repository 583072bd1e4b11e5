"""What memory the machine has free: RAM from psutil, VRAM per GPU from pynvml.

Probes are objects so tests can simulate a machine of any size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import psutil

log = logging.getLogger("chorus.memory")


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class SystemMemory:
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuMemory, ...] = field(default_factory=tuple)
    gpu_note: str | None = None  # why there is no GPU, when there is none

    @property
    def vram_total_bytes(self) -> int:
        return sum(g.total_bytes for g in self.gpus)

    @property
    def vram_free_bytes(self) -> int:
        return sum(g.free_bytes for g in self.gpus)


class MemoryProbe(Protocol):
    def snapshot(self) -> SystemMemory: ...


class SystemProbe:
    """The real machine. pynvml is optional at run time: no driver or no GPU means CPU-only."""

    def snapshot(self) -> SystemMemory:
        vm = psutil.virtual_memory()
        gpus, note = _nvml_gpus()
        return SystemMemory(vm.total, vm.available, gpus, note)


def _nvml_gpus() -> tuple[tuple[GpuMemory, ...], str | None]:
    try:
        import pynvml
    except ImportError:
        return (), "no GPU (pynvml not installed)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError has many subclasses; any of them means no usable GPU
        return (), f"no GPU ({_nvml_reason(exc)})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            out.append(GpuMemory(i, name, int(info.total), int(info.free)))
        return tuple(out), None if out else "no GPU (driver found, no devices)"
    except Exception as exc:
        return (), f"no GPU ({_nvml_reason(exc)})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)


def _nvml_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return "NVIDIA driver not found" if "Driver Not Loaded" in text or "not found" in text.lower() else text


@dataclass
class FixedProbe:
    """A simulated machine, for tests and `what if` planning."""

    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuMemory, ...] = ()

    def snapshot(self) -> SystemMemory:
        note = None if self.gpus else "no GPU (simulated)"
        return SystemMemory(self.ram_total_bytes, self.ram_available_bytes, tuple(self.gpus), note)
