"""Fault: chorus in a container (issue 13, item 12).

psutil reports the host's RAM, not the container's cgroup limit, so in a 4 GiB container chorus
planned with the host's memory. The probe now reads the cgroup (v2 ``memory.max``/``memory.current``,
v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``, found through /proc/self/cgroup) and plans
with the smaller of the two. Every case runs on a fake cgroup tree in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from launcher.errors import InsufficientMemory
from launcher.memory.admission import MemoryGuard
from launcher.memory.cgroup import read_cgroup_memory
from launcher.memory.estimate import EstimatorSettings
from launcher.memory.probes import SystemProbe
from launcher.process.server import ServerSpec

MiB = 1 << 20
GiB = 1 << 30
V1_UNLIMITED = 9223372036854771712


def v2_tree(tmp_path: Path, levels: dict[str, tuple[str, int, int]]) -> tuple[Path, Path]:
    """A cgroup v2 mount: {relative dir: (memory.max, memory.current, inactive_file)}; the process is in
    the deepest one."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for rel, (limit, current, inactive) in levels.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(f"{limit}\n")
        (d / "memory.current").write_text(f"{current}\n")
        (d / "memory.stat").write_text(f"anon 1000\nfile 2000\ninactive_file {inactive}\nactive_file 5\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"0::/{max(levels, key=len)}\n")
    return root, proc


def v1_tree(tmp_path: Path, rel: str, limit: int, usage: int, inactive: int = 0,
            proc_path: str | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    d = root / "memory" / rel
    d.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{V1_UNLIMITED}\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{8 * GiB}\n")
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 10\ninactive_file {inactive}\ntotal_inactive_file {inactive}\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"12:pids:/x\n4:memory:/{proc_path if proc_path is not None else rel}\n0::/\n")
    return root, proc


def test_v2_limit_bounds_free_ram_below_the_host(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"user.slice/chorus": (str(4 * GiB), 1 * GiB, 256 * MiB)})
    cg = read_cgroup_memory(root, proc)
    assert cg is not None and cg.version == 2 and cg.limit_bytes == 4 * GiB
    assert cg.available_bytes == 4 * GiB - (1 * GiB - 256 * MiB)  # inactive page cache is reclaimable
    snap = SystemProbe(cgroup_root=root, proc_cgroup=proc).snapshot()
    host = psutil.virtual_memory()
    assert snap.ram_total_bytes == min(host.total, 4 * GiB)
    assert snap.ram_available_bytes == min(snap.host_ram_available_bytes or 0, cg.available_bytes)
    assert snap.cgroup == cg
    if host.available > cg.available_bytes:
        assert snap.ram_limited_by == "cgroup" and snap.to_dict()["ram_limited_by"] == "cgroup"


def test_v2_ancestor_with_the_tighter_room_wins(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"kubepods": (str(2 * GiB), 1536 * MiB, 0),
                                    "kubepods/pod1/chorus": ("max", 100 * MiB, 0)})
    cg = read_cgroup_memory(root, proc)
    assert cg is not None and cg.limit_bytes == 2 * GiB and cg.available_bytes == 512 * MiB
    assert cg.path.endswith("kubepods")


def test_v2_without_a_limit_is_the_host(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"user.slice": ("max", GiB, 0)})
    assert read_cgroup_memory(root, proc) is None
    snap = SystemProbe(cgroup_root=root, proc_cgroup=proc).snapshot()
    assert snap.cgroup is None and snap.ram_available_bytes == snap.host_ram_available_bytes


def test_v1_limit_and_usage_are_read_from_the_memory_hierarchy(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, "docker/abc", 3 * GiB, 1 * GiB, inactive=128 * MiB)
    cg = read_cgroup_memory(root, proc)
    assert cg is not None and cg.version == 1
    assert cg.limit_bytes == 3 * GiB and cg.usage_bytes == GiB and cg.available_bytes == 2 * GiB + 128 * MiB
    snap = SystemProbe(cgroup_root=root, proc_cgroup=proc).snapshot()
    assert snap.ram_available_bytes <= cg.available_bytes and snap.ram_total_bytes <= 3 * GiB


def test_v1_unlimited_is_no_limit(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, "docker/abc", V1_UNLIMITED, GiB)
    assert read_cgroup_memory(root, proc) is None


def test_v1_container_that_mounts_only_its_own_cgroup(tmp_path: Path) -> None:
    """/proc/self/cgroup shows the host's path, the mount holds the container's cgroup at its top."""
    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{256 * MiB}\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("4:memory:/docker/0123456789abcdef\n")
    cg = read_cgroup_memory(root, proc)
    assert cg is not None and cg.limit_bytes == GiB and cg.available_bytes == 768 * MiB


def test_no_cgroup_file_or_garbage_is_no_limit(tmp_path: Path) -> None:
    assert read_cgroup_memory(tmp_path, tmp_path / "missing") is None
    root, proc = v2_tree(tmp_path, {"a": ("not a number", GiB, 0)})
    assert read_cgroup_memory(root, proc) is None


def test_fit_check_in_a_small_container_refuses_what_the_host_could_hold(tmp_path: Path, demo_model: Path) -> None:
    """1 GiB container with 800 MiB used: the demo model does not fit, though the host has room."""
    root, proc = v2_tree(tmp_path, {"chorus": (str(GiB), 800 * MiB, 0)})
    guard = MemoryGuard(SystemProbe(cgroup_root=root, proc_cgroup=proc), margin_fraction=0, margin_fixed_bytes=0,
                        settings=EstimatorSettings(repack_types=frozenset()))
    spec = ServerSpec("gemma3-270m", demo_model, n_ctx=2048)
    need = guard.need(spec).ram_bytes
    if psutil.virtual_memory().available < need + 224 * MiB:
        pytest.skip("the host itself is too full for this comparison")
    avail = guard.available()
    assert avail.have()["ram"] == 224 * MiB and "container limit 1.00 GiB" in avail.notes["ram"]
    with pytest.raises(InsufficientMemory) as err:
        guard.check_fit(spec, [])
    assert err.value.need["ram"] == need > err.value.have["ram"] == 224 * MiB
    host = MemoryGuard(SystemProbe(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none"),
                       margin_fraction=0, margin_fixed_bytes=0, settings=EstimatorSettings(repack_types=frozenset()))
    host.check_fit(spec, [])  # the host alone would have admitted it
