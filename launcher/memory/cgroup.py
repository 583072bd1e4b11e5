"""The memory limit of the container (cgroup) chorus runs in, which psutil does not see.

psutil reports the host's RAM; in a container with a 4 GiB limit the kernel kills the servers long
before the host runs short. The cgroup of this process is found in ``/proc/self/cgroup`` (v2: the
``0::/path`` line; v1: the line whose controllers include ``memory``), and its limit and usage are
read from the cgroup filesystem: v2 ``memory.max`` / ``memory.current``, v1 ``memory.limit_in_bytes`` /
``memory.usage_in_bytes``. Ancestors can set a tighter limit, so every level up to the mount is read
and the tightest room wins. Inactive file pages (``memory.stat``) are page cache the kernel reclaims
before it kills anything, so they do not count as used.

Both paths are parameters, so tests point them at a fake tree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
UNLIMITED = 1 << 60  # v1 says "no limit" with PAGE_COUNTER_MAX pages (~2**63); anything this large is none


@dataclass(frozen=True)
class CgroupMemory:
    """The binding limit of this process's cgroup (or of the ancestor whose room is smallest)."""

    version: int
    path: str                    # the cgroup directory the limit was read from
    limit_bytes: int
    usage_bytes: int
    reclaimable_bytes: int = 0   # inactive file pages: page cache reclaimed before an OOM kill

    @property
    def available_bytes(self) -> int:
        """What may still be used before the cgroup's limit: limit - (usage - reclaimable)."""
        return max(0, self.limit_bytes - max(0, self.usage_bytes - self.reclaimable_bytes))

    def to_dict(self) -> dict[str, object]:
        return {"version": self.version, "path": self.path, "limit_bytes": self.limit_bytes,
                "usage_bytes": self.usage_bytes, "reclaimable_bytes": self.reclaimable_bytes,
                "available_bytes": self.available_bytes}


def read_cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> CgroupMemory | None:
    """This process's cgroup memory limit, or None when there is none (or no cgroup filesystem)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if "memory" in controllers.split(","):
            v1_path = path
        elif hid == "0" and controllers == "":
            v2_path = path
    root = Path(root)
    if v1_path is not None:
        base = _v1_mount(root)
        return _tightest(base, _inside(base, v1_path), _read_v1) if base is not None else None
    if v2_path is not None and (root / "cgroup.controllers").exists():
        return _tightest(root, _inside(root, v2_path), _read_v2)
    return None


def _v1_mount(root: Path) -> Path | None:
    """The v1 memory hierarchy: /sys/fs/cgroup/memory, or a co-mounted 'cpu,memory' style folder."""
    if (root / "memory").is_dir():
        return root / "memory"
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            if "memory" in child.name.split(",") and child.is_dir():
                return child
    return None


def _inside(base: Path, cgroup_path: str) -> Path:
    """The cgroup's folder under the mount; a container that mounts only its own cgroup at the base
    shows the host's path in /proc/self/cgroup, which then does not exist: the base is the cgroup."""
    here = base / cgroup_path.lstrip("/")
    return here if here.is_dir() else base


def _tightest(base: Path, here: Path, read: Callable[[Path], CgroupMemory | None]) -> CgroupMemory | None:
    best: CgroupMemory | None = None
    level = here
    while True:
        found = read(level)
        if found is not None and (best is None or found.available_bytes < best.available_bytes):
            best = found
        if level == base or base not in level.parents:
            return best
        level = level.parent


def _int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, *keys: str) -> int:
    """The first of `keys` found in a memory.stat file (0 when none is)."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    values = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
    for key in keys:
        with contextlib.suppress(KeyError, ValueError):
            return int(values[key])
    return 0


def _make(version: int, level: Path, limit: int | None, usage: int | None, reclaimable: int) -> CgroupMemory | None:
    if limit is None or limit >= UNLIMITED or usage is None:
        return None
    return CgroupMemory(version, str(level), limit, usage, min(reclaimable, usage))


def _read_v2(level: Path) -> CgroupMemory | None:
    return _make(2, level, _int(level / "memory.max"), _int(level / "memory.current"),
                 _stat(level / "memory.stat", "inactive_file"))


def _read_v1(level: Path) -> CgroupMemory | None:
    return _make(1, level, _int(level / "memory.limit_in_bytes"), _int(level / "memory.usage_in_bytes"),
                 _stat(level / "memory.stat", "total_inactive_file", "inactive_file"))
