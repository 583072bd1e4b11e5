"""The cores servers may share: the container's CPU quota caps them (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.cpus import cgroup_cpu_limit, usable_cores


def test_cgroup_v2_quota_is_read_in_cores(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "cpu.max").write_text("150000 100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/app\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 1.5


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    assert cgroup_cpu_limit(tmp_path, proc) is None


def test_cgroup_v1_quota_is_read_in_cores(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct" / "docker" / "x"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("200000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n")
    assert cgroup_cpu_limit(tmp_path, proc) == 2.0


def test_this_process_has_at_least_one_usable_core() -> None:
    assert usable_cores() >= 1


def test_usable_cores_follow_a_change_of_affinity_at_once() -> None:
    everything = os.sched_getaffinity(0)
    if len(everything) < 2:
        pytest.skip("one core: no smaller affinity to move to")
    assert usable_cores() >= 1
    try:
        os.sched_setaffinity(0, {min(everything)})
        assert usable_cores() == 1  # not the remembered count of the wider affinity
    finally:
        os.sched_setaffinity(0, everything)
