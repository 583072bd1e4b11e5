"""How many cores the servers of this process may use: affinity, physical cores and the cgroup's CPU quota."""

from __future__ import annotations

import math
import os
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


def usable_cores() -> int:
    """Physical cores this process may run on, capped by the container's CPU quota; at least 1."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or allowed
    cores = min(allowed, physical)
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)
