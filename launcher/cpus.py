"""How many cores the servers of this process may use: affinity, physical cores and the cgroup's CPU quota."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import psutil


def cgroup_cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
                     ) -> float | None:
    """The CPU quota in cores (cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`), or None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            candidates = [cgroup_root / rel / "cpu.max", cgroup_root / "cpu.max"]
            for path in candidates:
                try:
                    max_text, period_text = path.read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                return None if max_text == "max" else int(max_text) / int(period_text)
        elif "cpu" in controllers.split(","):
            base = cgroup_root / controllers
            for folder in (base / rel, base):
                try:
                    quota_us = int((folder / "cpu.cfs_quota_us").read_text())
                    period_us = int((folder / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                return None if quota_us <= 0 else quota_us / period_us
    return None


RECHECK_S = 30.0  # the physical cores and the quota are re-read this often; the affinity on every call
_known: tuple[frozenset[int], float, int] | None = None  # (affinity, when, cores)


def usable_cores() -> int:
    """Physical cores this process may run on, capped by the container's CPU quota; at least 1.

    Remembered for RECHECK_S per affinity: reading the topology and the cgroup cost 0.25 ms, on every proxied
    request, on cores the model servers are busy with."""
    global _known
    try:
        affinity = frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = frozenset(range(os.cpu_count() or 1))
    now = time.monotonic()
    if _known is not None and _known[0] == affinity and now - _known[1] < RECHECK_S:
        return _known[2]
    cores = _count_cores(len(affinity))
    _known = (affinity, now, cores)
    return cores


def _count_cores(allowed: int) -> int:
    physical = psutil.cpu_count(logical=False) or allowed
    cores = min(allowed, physical)
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)
