"""What memory the machine has free: RAM from psutil and the cgroup, VRAM per GPU from pynvml, and
the memory budget, each a device ('ram', 'gpu0'..., 'budget') with a free and a total figure.

Probes are objects so tests can simulate a machine of any size. A real machine (`SystemProbe`) is
*live*: what running servers hold is already out of its free figures. A simulated one (`FixedProbe`)
is static: the admission check subtracts what our running servers hold itself.

RAM "available" from the kernel counts page cache as reclaimable, and the weights our servers map
from their .gguf files are page cache. They are in use, so `SystemProbe.snapshot(own_pids)` takes
the file-backed resident memory of our own servers (RssFile) out of the available figure. In a
container the cgroup's limit may be far below the host's RAM (`launcher.memory.cgroup`): RAM is then the
smaller of the two.

The budget (app.yaml's ``server.memory_budget_mib``) is one more device, reported by `BudgetProbe`
around another probe: its total is the budget, its free figure the budget less what the servers of
the *other* chorus processes hold (from the shared `launcher.memory.ledger.AdmissionLedger`). What this
process's own servers hold is taken off by the admission check, like on a simulated machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import psutil

from launcher.memory.cgroup import CGROUP_ROOT, PROC_SELF_CGROUP, CgroupMemory, read_cgroup_memory
from launcher.memory.ledger import AdmissionLedger

log = logging.getLogger("chorus.memory")


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class DeviceMemory:
    """A device beyond RAM and the GPUs (the budget). Its free figure never has this process's own
    servers taken out: the admission check does that."""

    name: str
    total_bytes: int
    free_bytes: int
    note: str | None = None


BUDGET = "budget"


@dataclass(frozen=True)
class SystemMemory:
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuMemory, ...] = field(default_factory=tuple)
    gpu_note: str | None = None  # why there is no GPU, when there is none
    own_page_cache_bytes: int = 0  # our servers' mapped weights, already taken out of ram_available_bytes
    cgroup: CgroupMemory | None = None  # the container's limit, when there is one
    host_ram_available_bytes: int | None = None  # before the cgroup's limit was applied
    extra: tuple[DeviceMemory, ...] = ()  # the budget

    @property
    def ram_limited_by(self) -> str:
        """'cgroup' when the container's limit is what bounds free RAM, else 'host'."""
        if self.cgroup is not None and self.cgroup.available_bytes <= (self.host_ram_available_bytes or 0):
            return "cgroup"
        return "host"

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def free(self) -> dict[str, int]:
        """Free bytes per device: 'ram', 'gpu0', 'gpu1'..."""
        return {"ram": self.ram_available_bytes, **{f"gpu{g.index}": g.free_bytes for g in self.gpus},
                **{d.name: d.free_bytes for d in self.extra}}

    def total(self) -> dict[str, int]:
        return {"ram": self.ram_total_bytes, **{f"gpu{g.index}": g.total_bytes for g in self.gpus},
                **{d.name: d.total_bytes for d in self.extra}}

    @property
    def static_devices(self) -> frozenset[str]:
        """Devices whose free figure still includes what this process's servers hold."""
        return frozenset(d.name for d in self.extra)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe figures, for `chorus check --json` and the UI."""
        return {"ram_total_bytes": self.ram_total_bytes, "ram_available_bytes": self.ram_available_bytes,
                "host_ram_available_bytes": self.host_ram_available_bytes, "ram_limited_by": self.ram_limited_by,
                "cgroup": self.cgroup.to_dict() if self.cgroup else None,
                "gpus": [vars(g) for g in self.gpus], "gpu_note": self.gpu_note,
                "devices": {d.name: {"total_bytes": d.total_bytes, "free_bytes": d.free_bytes, "note": d.note}
                            for d in self.extra}}


class MemoryProbe(Protocol):
    """Where free memory comes from. `live`: whether running processes' memory is already out of it."""

    @property
    def live(self) -> bool: ...  # read-only, so a class attribute or a property satisfies it

    def snapshot(self, own_pids: Collection[int] = ()) -> SystemMemory: ...


class SystemProbe:
    """The real machine. pynvml is optional at run time: no driver or no GPU means CPU-only.

    RAM is the smaller of the host's (psutil) and the cgroup's room; `cgroup_root` and `proc_cgroup`
    say where the cgroup filesystem and this process's cgroup file are (tests give a fake tree).
    """

    live = True

    def __init__(self, cgroup_root: Path | str = CGROUP_ROOT, proc_cgroup: Path | str = PROC_SELF_CGROUP) -> None:
        self.cgroup_root = Path(cgroup_root)
        self.proc_cgroup = Path(proc_cgroup)

    def snapshot(self, own_pids: Collection[int] = ()) -> SystemMemory:
        vm = psutil.virtual_memory()
        gpus, note = _nvml_gpus()
        cached = own_page_cache_bytes(own_pids)
        host = max(0, vm.available - cached)
        cgroup = read_cgroup_memory(self.cgroup_root, self.proc_cgroup)
        total, available = vm.total, host
        if cgroup is not None:  # the cgroup's usage already counts our servers' mapped pages
            total, available = min(total, cgroup.limit_bytes), min(host, cgroup.available_bytes)
        return SystemMemory(total, available, gpus, note, cached, cgroup, host)


@dataclass
class FixedProbe:
    """A simulated machine, for tests and `what if` planning: these figures with none of our servers up."""

    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuMemory, ...] = ()
    live = False

    def snapshot(self, own_pids: Collection[int] = ()) -> SystemMemory:
        note = None if self.gpus else "no GPU (simulated)"
        return SystemMemory(self.ram_total_bytes, self.ram_available_bytes, tuple(self.gpus), note,
                            host_ram_available_bytes=self.ram_available_bytes)


@dataclass
class BudgetProbe:
    """Another probe's devices plus the 'budget' device: a cap on what every chorus server of this
    user holds together, whatever process started it. Free = budget - what the other processes'
    servers hold (the ledger); this process's own servers are taken off by the admission check."""

    inner: MemoryProbe
    budget_bytes: int
    ledger: AdmissionLedger

    @property
    def live(self) -> bool:
        return bool(getattr(self.inner, "live", True))

    def snapshot(self, own_pids: Collection[int] = ()) -> SystemMemory:
        snap = self.inner.snapshot(own_pids)
        others = self.ledger.held(BUDGET)
        scope = "every chorus process of this user" if self.ledger.shared else "this process"
        note = f"server.memory_budget_mib: {self.budget_bytes >> 20} MiB for {scope}"
        budget = DeviceMemory(BUDGET, self.budget_bytes, max(0, self.budget_bytes - others), note)
        return replace(snap, extra=(*[d for d in snap.extra if d.name != BUDGET], budget))


# ---------------------------------------------------------------- per-process figures

@dataclass(frozen=True)
class ProcessMemory:
    """One process's resident memory: anonymous (its own) and file-backed (mapped weights, libraries)."""

    pid: int
    rss_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    pss_bytes: int | None = None


def process_memory(pid: int, *, pss: bool = False) -> ProcessMemory | None:
    """RSS split from /proc/PID/status (RssAnon/RssFile); None when the process is gone."""
    try:
        proc = psutil.Process(pid)
        rss = int(proc.memory_info().rss)
    except psutil.Error:
        return None
    pss_bytes = None
    if pss:
        with contextlib.suppress(psutil.Error, AttributeError):
            pss_bytes = int(proc.memory_full_info().pss)
    anon = file = None
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    if anon is None or file is None:  # not Linux: psutil's `shared` is the closest to file-backed
        with contextlib.suppress(psutil.Error, AttributeError):
            file = int(getattr(psutil.Process(pid).memory_info(), "shared", 0))
        file = file or 0
        anon = max(0, rss - file)
    return ProcessMemory(pid, rss, anon, file, pss_bytes)


def own_page_cache_bytes(pids: Collection[int]) -> int:
    """File-backed resident memory of our servers: page cache the kernel calls free, but that we use.

    Servers of one model file share its pages, so each file counts once (the largest RssFile of the
    processes that map it, grouped by their `-m` argument).
    """
    by_file: dict[str, int] = {}
    for pid in set(pids):
        mem = process_memory(pid)
        if mem is None:
            continue
        key = _model_arg(pid) or f"pid:{pid}"
        by_file[key] = max(by_file.get(key, 0), mem.rss_file_bytes)
    return sum(by_file.values())


def _model_arg(pid: int) -> str | None:
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    for flag in ("-m", "--model"):
        if flag in cmd[:-1]:
            return cmd[cmd.index(flag) + 1]
    return None


# ---------------------------------------------------------------- NVML

_nvml_lock = threading.Lock()


class _NoNvmlLibrary(Exception):
    """libnvidia-ml cannot be loaded: pynvml's nvmlInit would raise its 'NVML Shared Library Not Found'."""


def _check_nvml_library() -> None:
    """On Linux without the NVIDIA driver, fail as nvmlInit would, without importing pynvml (~10 ms of a cold
    start): it loads the same library, by the same name, first thing. Once pynvml is imported (or replaced by
    a test's stand-in), or where it is not installed (ImportError says so), pynvml answers itself."""
    if not sys.platform.startswith("linux") or "pynvml" in sys.modules or importlib.util.find_spec("pynvml") is None:
        return
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        raise _NoNvmlLibrary("NVML Shared Library Not Found") from None


@contextlib.contextmanager
def _nvml() -> Iterator[types.ModuleType]:
    """pynvml, initialised for the block; raises ImportError or an NVMLError when there is none."""
    _check_nvml_library()
    import pynvml

    with _nvml_lock:
        pynvml.nvmlInit()
        try:
            yield pynvml
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", _nvml_reason(exc))


def _nvml_gpus() -> tuple[tuple[GpuMemory, ...], str | None]:
    try:
        with _nvml() as nvml:
            out = []
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                out.append(GpuMemory(i, name, int(info.total), int(info.free)))
    except ImportError:
        return (), "no GPU (pynvml not installed)"
    except Exception as exc:  # NVMLError has many subclasses; any of them means no usable GPU
        return (), f"no GPU ({_nvml_reason(exc)})"
    return tuple(out), None if out else "no GPU (driver found, no devices)"


def process_vram(pids: Collection[int]) -> dict[int, dict[int, int]]:
    """VRAM per process per GPU index from NVML ({} without a GPU, or when the driver hides the pids)."""
    wanted = set(pids)
    out: dict[int, dict[int, int]] = {}
    if not wanted:
        return out
    try:
        with _nvml() as nvml:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = getattr(proc, "usedGpuMemory", None)
                    if proc.pid in wanted and isinstance(used, int):
                        out.setdefault(proc.pid, {})[i] = out.get(proc.pid, {}).get(i, 0) + used
    except Exception as exc:  # ImportError or any NVMLError: no per-process figures; no driver is one quiet line
        log.debug("no per-process VRAM from NVML: %s", _nvml_reason(exc))
    return out


def _nvml_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return "NVIDIA driver not found" if "Driver Not Loaded" in text or "not found" in text.lower() else text
