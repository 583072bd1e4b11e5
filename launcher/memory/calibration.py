"""Calibration: what a running llama-server really holds, remembered per configuration.

After a server is up, `measure_server` reads its RSS (anonymous and file-backed, from /proc), its PSS,
its VRAM per GPU (NVML), and, when the server logs at ``-lv 4``, llama.cpp's own buffer sizes.
`CalibrationCache` keeps one record per (file, size, mtime, n_ctx, n_gpu_layers, slots) in a small
JSON file (default ``~/.cache/chorus/calibration.json``, written atomically), so the next estimate for
that configuration is the measured figure, and it keeps the estimate's error next to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from launcher.fileio import atomic_writer
from launcher.memory.estimate import MemoryEstimate
from launcher.memory.probes import process_memory, process_vram
from launcher.paths import cache_dir
from launcher.process.server import ModelServer, ServerSpec
from launcher.units import MiB

log = logging.getLogger("chorus.calibration")

CACHE_FILE = "calibration.json"
FORMAT_VERSION = 1
MAX_RECORDS = 512

_BUFFER = re.compile(r"\b(\S+?)\s+(model|output|KV|compute) buffer size\s*=\s*([\d.]+) MiB")
_GPU_BUFFER = re.compile(r"^(?:CUDA|ROCm|MUSA|SYCL|Vulkan|CANN|OpenCL)(\d+)")
_KINDS = {"model": "weights", "output": "output", "KV": "kv", "compute": "compute"}


@dataclass(frozen=True)
class Measurement:
    """One running server's real footprint. ``vram_bytes`` maps GPU index to bytes."""

    pid: int
    rss_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    pss_bytes: int | None
    vram_bytes: dict[int, int] = field(default_factory=dict)
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)  # from the log: device -> kind -> bytes
    measured_at: float = field(default_factory=time.time)

    def need(self) -> dict[str, int]:
        return {"ram": self.rss_bytes, **{f"gpu{i}": n for i, n in sorted(self.vram_bytes.items())}}


def parse_buffer_sizes(text: str) -> dict[str, dict[str, int]]:
    """llama.cpp's buffer lines ("CPU_Mapped model buffer size = 235.16 MiB", "CUDA0 KV buffer size"...).

    Devices: host buffers (CPU, CPU_Mapped, CPU_REPACK, CUDA_Host...) are 'ram'; CUDA0/ROCm1/... 'gpuN'.
    Kinds: weights, kv, compute, output. When the log holds several loads, the last one wins.
    """
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if "load_tensors:" in line and "model buffer size" in line and _seen_all(out):
            out = {}  # a new load after a complete one (a restarted server appending to its log)
        m = _BUFFER.search(line)
        if not m:
            continue
        name, kind, mib = m.group(1), _KINDS[m.group(2)], float(m.group(3))
        gpu = _GPU_BUFFER.match(name)
        device = f"gpu{gpu.group(1)}" if gpu and not name.endswith("_Host") else (
            "gpu0" if name.startswith("Metal") else "ram")
        kinds = out.setdefault(device, {})
        kinds[kind] = kinds.get(kind, 0) + int(mib * MiB)
    return out


def _seen_all(buffers: dict[str, dict[str, int]]) -> bool:
    return any("compute" in kinds for kinds in buffers.values())


def measure_server(server: ModelServer) -> Measurement | None:
    """Measure a live server now; None when it is not running."""
    pid = server.pid
    if pid is None or not server.is_alive():
        return None
    mem = process_memory(pid, pss=True)
    if mem is None:
        return None
    buffers: dict[str, dict[str, int]] = {}
    if server.log_path is not None:
        with contextlib.suppress(OSError):
            buffers = parse_buffer_sizes(_log_head(server.log_path))
    return Measurement(pid, mem.rss_bytes, mem.rss_anon_bytes, mem.rss_file_bytes, mem.pss_bytes,
                       process_vram([pid]).get(pid, {}), buffers)


def _log_head(path: Path, limit: int = 4 * MiB) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- the cache


@dataclass
class CalibrationRecord:
    """Measured need of one configuration, next to what the estimator said for it."""

    key: str
    model: str
    model_path: str
    file_size: int
    mtime_ns: int
    n_ctx: int
    n_gpu_layers: int
    slots: int
    ram_bytes: int                  # the largest RSS measured for this configuration
    vram_bytes: dict[str, int]      # 'gpuN' -> the largest VRAM measured
    mapped_bytes: int               # file-backed part of the RSS (the model's mapped weights)
    estimate_ram_bytes: int | None = None
    estimate_vram_bytes: dict[str, int] = field(default_factory=dict)
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)
    samples: int = 1
    measured_at: float = 0.0

    def need(self) -> dict[str, int]:
        return {"ram": self.ram_bytes, **self.vram_bytes}

    @property
    def error_pct(self) -> dict[str, float]:
        """(estimate - measured) / measured per device, in %: positive means the estimate was high."""
        est = {"ram": self.estimate_ram_bytes, **self.estimate_vram_bytes}
        return {dev: round((e - n) / n * 100, 1) for dev, n in self.need().items()
                if n and (e := est.get(dev)) is not None}

    def to_dict(self) -> dict[str, object]:
        # not dataclasses.asdict: its deep copies of every record were most of a server start's calibration
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "error_pct": self.error_pct}


def calibration_key(spec: ServerSpec) -> str | None:
    """The cache key of a spec: file (resolved), size, mtime, n_ctx, n_gpu_layers, slots (+ extra args)."""
    try:
        path = Path(spec.model_path).resolve()
        st = path.stat()
    except OSError:
        return None
    parts = [str(path), str(st.st_size), str(st.st_mtime_ns), str(spec.n_ctx), str(spec.n_gpu_layers),
             str(spec.slots)]
    if spec.extra_args:
        parts.append(" ".join(spec.extra_args))
    return "|".join(parts)


class CalibrationCache:
    """A small JSON file of CalibrationRecords; safe across threads, written atomically."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else cache_dir()
        self._lock = threading.Lock()
        self._records: dict[str, CalibrationRecord] | None = None
        self._loaded_mtime: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / CACHE_FILE

    # -- reading
    def get(self, spec: ServerSpec) -> CalibrationRecord | None:
        key = calibration_key(spec)
        if key is None:
            return None
        with self._lock:
            return self._load().get(key)

    def records(self) -> list[CalibrationRecord]:
        with self._lock:
            return list(self._load().values())

    def _load(self) -> dict[str, CalibrationRecord]:
        """Records from disk, re-read when another process changed the file."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if self._records is not None and mtime == self._loaded_mtime:
            return self._records
        records: dict[str, CalibrationRecord] = {}
        if mtime is not None:
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == FORMAT_VERSION:
                    for key, raw in data.get("records", {}).items():
                        raw.pop("error_pct", None)
                        records[key] = CalibrationRecord(**raw)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring unreadable calibration cache %s: %s", self.path, exc)
                records = {}
        self._records, self._loaded_mtime = records, mtime
        return records

    # -- writing
    def record(self, spec: ServerSpec, measurement: Measurement,
               estimate: MemoryEstimate | None = None) -> CalibrationRecord | None:
        """Store a measurement of a server for `spec`; keeps the largest figures seen so far."""
        key = calibration_key(spec)
        if key is None:
            return None
        st = Path(spec.model_path).resolve().stat()
        vram = {f"gpu{i}": n for i, n in sorted(measurement.vram_bytes.items())}
        mapped = measurement.rss_file_bytes
        if estimate is not None:
            mapped = min(mapped, estimate.mapped_bytes)
        with self._lock:
            records = self._load()
            old = records.get(key)
            vram_max = dict(old.vram_bytes) if old else {}
            for device, n in vram.items():
                vram_max[device] = max(n, vram_max.get(device, 0))
            rec = CalibrationRecord(
                key=key, model=spec.model, model_path=str(Path(spec.model_path).resolve()),
                file_size=st.st_size, mtime_ns=st.st_mtime_ns, n_ctx=spec.n_ctx,
                n_gpu_layers=spec.n_gpu_layers, slots=spec.slots,
                ram_bytes=max(measurement.rss_bytes, old.ram_bytes if old else 0),
                vram_bytes=vram_max,
                mapped_bytes=max(mapped, old.mapped_bytes if old else 0),
                estimate_ram_bytes=estimate.ram_bytes if estimate else (old.estimate_ram_bytes if old else None),
                estimate_vram_bytes={d: n for d, n in estimate.need().items() if d != "ram"} if estimate else (
                    dict(old.estimate_vram_bytes) if old else {}),
                buffers=measurement.buffers or (old.buffers if old else {}),
                samples=(old.samples + 1) if old else 1, measured_at=measurement.measured_at)
            records[key] = rec
            while len(records) > MAX_RECORDS:
                oldest = min(records, key=lambda k: records[k].measured_at)
                del records[oldest]
            self._write(records)
        return rec

    def clear(self) -> None:
        with self._lock:
            self._write({})

    def _write(self, records: dict[str, CalibrationRecord]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"version": FORMAT_VERSION, "records": {k: r.to_dict() for k, r in records.items()}}
        with atomic_writer(self.path) as f:  # compact: json's C encoder (an indent means the Python one, 10x slower)
            f.write(json.dumps(data, sort_keys=True, separators=(",", ":")))
        self._records = records
        with contextlib.suppress(OSError):
            self._loaded_mtime = self.path.stat().st_mtime_ns
