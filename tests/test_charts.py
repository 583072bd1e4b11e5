"""The memory-plan chart and the run timeline: what they draw, the PNG files, and the CLI flags that write them.

The charts are read back through the gids of their bars (orchestrator.charts.describe), so each test checks
what a user would see: which bar, where, how tall, with which label.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launcher.memory.fit import Availability
from orchestrator.config.schema import load_config
from orchestrator.history.store import SessionStore
from orchestrator.plan.memory import PARTS, MemoryPlan, ServerNeed, StageMemory, need_parts, plan_memory
from orchestrator.records import AggregationRecord, ResponseRecord, RunRecord, StageRecord, to_dict
from orchestrator.runtime import Runtime
from orchestrator.units import MiB
from tests.clirun import run_main
from tests.conftest import ConfigDir
from tests.test_history_manage import fake_run, said

if TYPE_CHECKING:
    from types import ModuleType

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def charts() -> ModuleType:
    """orchestrator.charts, imported by the test that uses it: matplotlib (half a second) is then loaded by
    the one xdist worker that runs this file, not by every worker that collects it."""
    from orchestrator import charts as module

    return module


def bars(fig) -> dict[str, dict]:
    return {b["gid"]: b for b in charts().describe(fig)}


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


# ---------------------------------------------------------------- memory plan


def server(name: str, labels: list[str], parts: dict[str, dict[str, int]], *, mapped: int = 0,
           reused: bool = False) -> ServerNeed:
    need = {d: sum(p.values()) for d, p in parts.items()}
    return ServerNeed(name, labels, ram_bytes=need.get("ram", 0), need=need, breakdown=parts, mapped_bytes=mapped,
                      reused=reused)


def small_machine(ram_mib: int, *, gpu_mib: int | None = None) -> Availability:
    free = {"ram": (ram_mib + 100) * MiB, **({"gpu0": (gpu_mib + 50) * MiB} if gpu_mib else {})}
    margin = {"ram": 100 * MiB, **({"gpu0": 50 * MiB} if gpu_mib else {})}
    return Availability(free=free, total={d: 2 * n for d, n in free.items()}, margin=margin)


def test_memory_chart_stacks_each_waves_weights_kv_and_compute_per_device_against_usable_memory() -> None:
    avail = small_machine(500, gpu_mib=300)
    a = server("big", ["a"], {"ram": {"weights": 200 * MiB, "compute": 20 * MiB, "other": 30 * MiB},
                               "gpu0": {"weights": 100 * MiB, "kv": 40 * MiB, "compute": 10 * MiB}})
    b = server("small", ["b"], {"ram": {"weights": 100 * MiB, "kv": 10 * MiB}})
    syn = server("small", ["merge"], {"ram": {"weights": 100 * MiB, "kv": 10 * MiB}})
    stage = StageMemory("review", [a, b], False, [["a"], ["b"]], avail, synthesis=syn)
    fig = charts().memory_chart(MemoryPlan("p", [stage], avail))

    axes = {ax.get_title(loc="left").split(" ")[0]: ax for ax in fig.axes}
    assert set(axes) == {"RAM", "GPU0"}
    got = bars(fig)
    mib = {gid: round(b["height"]) for gid, b in got.items()}  # the RAM and GPU axes are in MiB here
    assert mib["mem:ram:review:1:weights"] == 200 and mib["mem:ram:review:1:compute"] == 20
    assert mib["mem:ram:review:1:other"] == 30 and mib["mem:ram:review:2:kv"] == 10
    assert mib["mem:gpu0:review:1:kv"] == 40 and mib["mem:gpu0:review:2:kv"] == 0
    assert mib["mem:ram:review:synthesis:weights"] == 100
    # stacked: KV sits on the weights, compute on the KV
    assert got["mem:gpu0:review:1:kv"]["y"] == pytest.approx(100)
    assert got["mem:gpu0:review:1:compute"]["y"] == pytest.approx(140)
    ram = axes["RAM"]
    assert [t.get_text().split("\n")[0] for t in ram.get_xticklabels()] == ["review", "review · wave 2",
                                                                          "review · synthesis"]
    assert [line.get_ydata()[0] for line in ram.get_lines()] == [pytest.approx(500), pytest.approx(600)]
    legend = [t.get_text() for t in ram.get_legend().get_texts()]
    assert legend[:4] == ["weights", "KV cache", "compute", "process & buffers"]
    assert "usable now 500 MiB" in legend and "free 600 MiB" in legend
    assert {"250 MiB", "110 MiB"} <= set(texts(fig))


def test_a_wave_over_usable_memory_is_marked_and_one_files_weights_count_once() -> None:
    avail = small_machine(300)
    parts = {"ram": {"weights": 200 * MiB, "kv": 20 * MiB}}
    one, two = server("m", ["one"], parts, mapped=200 * MiB), server("m", ["two"], parts, mapped=200 * MiB)
    other = server("n", ["three"], {"ram": {"weights": 150 * MiB}}, mapped=150 * MiB)
    stage = StageMemory("s", [one, two, other], False, [["one", "two"], ["three"]], avail)
    fig = charts().memory_chart(MemoryPlan("p", [stage], avail))
    mib = {gid: round(b["height"]) for gid, b in bars(fig).items()}
    assert mib["mem:ram:s:1:weights"] == 200  # the same file is mapped once by both servers
    assert mib["mem:ram:s:1:kv"] == 40
    assert "240 MiB" in texts(fig)
    big = StageMemory("s", [server("huge", ["x"], {"ram": {"weights": 400 * MiB}})], True, [["x"]], avail)
    assert "400 MiB (over)" in texts(charts().memory_chart(MemoryPlan("p", [big], avail)))


def test_memory_far_above_the_bars_is_written_instead_of_flattening_them() -> None:
    avail = small_machine(64 * 1024)
    stage = StageMemory("s", [server("m", ["a"], {"ram": {"weights": 200 * MiB}})], True, [["a"]], avail)
    fig = charts().memory_chart(MemoryPlan("p", [stage], avail))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "MiB" and ax.get_ylim()[1] < 400
    assert any(t.startswith("off the scale: usable now 64.00 GiB") for t in texts(fig))


def test_a_budget_is_drawn_with_each_servers_whole_footprint() -> None:
    avail = Availability(free={"ram": 900 * MiB, "gpu0": 900 * MiB, "budget": 500 * MiB},
                         total={"ram": 1800 * MiB, "gpu0": 1800 * MiB, "budget": 500 * MiB},
                         margin={}, notes={"budget": "memory_budget_mib"})
    s = server("m", ["a"], {"ram": {"weights": 100 * MiB}, "gpu0": {"weights": 150 * MiB, "kv": 50 * MiB}})
    fig = charts().memory_chart(MemoryPlan("p", [StageMemory("s", [s], True, [["a"]], avail)], avail))
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0] == "RAM" and titles[1] == "GPU0" and titles[2].startswith("memory budget")
    mib = {gid: round(b["height"]) for gid, b in bars(fig).items()}
    assert mib["mem:budget:s:1:weights"] == 250 and mib["mem:budget:s:1:kv"] == 50


def test_running_and_remote_servers_need_nothing_new_in_the_chart() -> None:
    avail = small_machine(500)
    warm = server("m", ["a"], {"ram": {"weights": 100 * MiB}}, reused=True)
    far = ServerNeed("far", ["b"], remote=True, source="remote")
    stage = StageMemory("s", [warm, far], True, [["a", "b"]], avail)
    fig = charts().memory_chart(MemoryPlan("p", [stage], avail))
    assert all(b["height"] == 0 for b in charts().describe(fig))
    assert "(+1 running)" in fig.axes[0].get_xticklabels()[0].get_text()


def test_the_plan_fills_each_servers_breakdown_in_parts_that_sum_to_its_need(config_dir: ConfigDir) -> None:
    rt = Runtime(load_config(config_dir.path))
    try:
        plan = plan_memory(rt, rt.plan(config_dir_pipeline(config_dir), "manual"))
    finally:
        rt.close()
    needs = [m for s in plan.stages for m in [*s.models, *([s.synthesis] if s.synthesis else [])]]
    assert needs
    for m in needs:
        assert set(m.breakdown) == set(m.need)
        for device, parts in m.breakdown.items():
            assert set(parts) <= set(PARTS) and sum(parts.values()) == m.need[device]
        ram = m.breakdown["ram"]
        assert ram["weights"] > 0 and ram["kv"] > 0 and ram["compute"] > 0
        assert 0 < m.mapped_bytes <= ram["weights"]


def config_dir_pipeline(config_dir: ConfigDir):
    from orchestrator.config.schema import PipelineSpec

    return PipelineSpec.model_validate({"stages": [
        {"name": "a", "models": ["gemma3-270m"], "n_ctx": 1024},
        {"name": "b", "models": ["gemma3-270m", {"model": "gemma3-270m", "label": "two"}],
         "aggregation": {"type": "synthesis", "synthesis_model": "gemma3-270m"}}]})


def test_a_measured_total_is_split_in_the_formulas_proportions() -> None:
    parts = need_parts({}, 1000, {"weights": 600, "weights_repacked": 100, "kv": 200, "output": 50, "overhead": 50})
    assert parts == {"weights": 700, "kv": 200, "compute": 50, "other": 50}
    uneven = need_parts({}, 1001, {"weights": 1, "kv": 1, "compute": 1})
    assert sum(uneven.values()) == 1001 and uneven["other"] == 2
    assert need_parts({}, 10, {}) == {"other": 10}
    # RAM: the measured mapped file pages are weights as they are; the rest is split as the formula's parts
    ram = need_parts({}, 1000, {"weights": 600, "kv": 200, "output": 50, "overhead": 50}, mapped=500, like_mapped=550)
    assert ram == {"weights": 571, "kv": 285, "compute": 71, "other": 73}


# ---------------------------------------------------------------- run timeline


def call(label: str, start: float, end: float, *, status: str = "ok", speed: float | None = 10.0) -> ResponseRecord:
    return ResponseRecord(label, "m", text="x", status=status, completion_tokens=20 if status == "ok" else None,
                          total_s=end - start, tokens_per_s=speed, started_at=start, finished_at=end)


def timed_run() -> RunRecord:
    synth = call("m-synthesis", 106.0, 108.0, speed=25.0)
    first = StageRecord(1, "analyse", responses=[call("m", 100.5, 102.0, speed=12.5)], status="ok",
                        started_at=100.0, finished_at=102.0)
    second = StageRecord(2, "review", responses=[call("facts", 102.0, 106.0, speed=4.0),
                                                 call("skeptic", 102.0, 104.0, status="failed", speed=None)],
                         aggregation=AggregationRecord("synthesis", details={"synthesis_calls": [to_dict(synth)]}),
                         status="partial", started_at=102.0, finished_at=108.0)
    return RunRecord("q", "manual", {}, stages=[first, second], status="partial", started_at=100.0, finished_at=108.0)


def test_the_timeline_has_one_bar_per_call_from_its_start_to_its_end_with_its_speed() -> None:
    fig = charts().timeline_chart(timed_run())
    got = bars(fig)
    assert list(got) == ["call:1:m", "call:2:facts", "call:2:skeptic", "call:2:m-synthesis:synthesis"]
    assert got["call:1:m"]["x"] == pytest.approx(0.5) and got["call:1:m"]["width"] == pytest.approx(1.5)
    assert got["call:2:facts"]["x"] == pytest.approx(2.0) and got["call:2:facts"]["width"] == pytest.approx(4.0)
    assert got["call:2:m-synthesis:synthesis"]["x"] == pytest.approx(6.0)
    rows = [round(b["y"] + b["height"] / 2) for b in got.values()]
    assert rows == [0, 1, 2, 3]  # one row each, in call order
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1. m", "2. facts (m)", "2. skeptic (m)",
                                                            "2. synthesis: m-synthesis (m)"]
    notes = texts(fig)
    assert "12.5 tok/s, 20 tokens in 1.5s" in notes and "25.0 tok/s, 20 tokens in 2.0s" in notes
    assert "failed in 2.0s" in notes  # a failed call says so instead of a speed
    assert ax.get_title(loc="left") == "Run timeline — partial"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1. analyse", "2. review"]
    facts, skeptic = (p for p in ax.patches if p.get_gid() in ("call:2:facts", "call:2:skeptic"))
    assert facts.get_facecolor() == skeptic.get_facecolor() and skeptic.get_hatch() == "//"


def test_stages_copied_from_a_parent_session_are_not_drawn_as_calls_of_this_run() -> None:
    run = timed_run()
    run.stages[0].status = "copied"
    run.parent_session = "session_004"
    fig = charts().timeline_chart(run)
    assert [b["gid"] for b in charts().describe(fig)] == ["call:2:facts", "call:2:skeptic",
                                                        "call:2:m-synthesis:synthesis"]
    assert "(step 1 copied from session_004)" in fig.axes[0].get_title(loc="left")


def test_a_saved_session_gives_the_same_timeline_as_its_run(config_dir: ConfigDir) -> None:
    outcome = fake_run(config_dir)
    session = SessionStore(config_dir.sessions_dir).load(outcome.session_id)
    from_session, from_run = bars(charts().timeline_chart(session)), bars(charts().timeline_chart(outcome.run))
    assert list(from_session) == ["call:1:gemma3-270m", "call:2:facts", "call:2:skeptic",
                                  "call:2:gemma3-270m-synthesis:synthesis"]
    assert from_session.keys() == from_run.keys()
    for gid, b in from_session.items():
        assert b["x"] == pytest.approx(from_run[gid]["x"]) and b["width"] == pytest.approx(from_run[gid]["width"])


def test_charts_are_written_as_png_files(tmp_path: Path) -> None:
    path = charts().save_png(charts().timeline_chart(timed_run()), tmp_path / "t.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    with pytest.raises(charts().ChartError, match="cannot write the PNG"):
        charts().save_png(charts().timeline_chart(timed_run()), tmp_path / "no-such-folder" / "t.png")


# ---------------------------------------------------------------- the CLI


def chorus(config_dir: ConfigDir, *args: str) -> subprocess.CompletedProcess[str]:
    """`chorus --config-dir DIR ARGS`, its main() in this process (tests/clirun.py)."""
    return run_main("--config-dir", str(config_dir.path), *args)


def test_cli_plan_png_writes_the_memory_chart(config_dir: ConfigDir, tmp_path: Path) -> None:
    out = tmp_path / "plan.png"
    done = chorus(config_dir, "plan", "--png", str(out))
    assert done.returncode in (0, 1), done.stderr  # 1: the base pipeline does not fit or a model is missing
    assert f"memory chart written to {out}" in said(done.stderr)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "analyse" in done.stdout  # the text plan is still printed


def test_cli_history_show_png_writes_the_timeline(config_dir: ConfigDir, tmp_path: Path) -> None:
    outcome = fake_run(config_dir)
    out = tmp_path / "timeline.png"
    done = chorus(config_dir, "history", "show", outcome.session_id, "--png", str(out))
    assert done.returncode == 0, done.stderr
    assert f"timeline of {outcome.session_id} written to {out}" in said(done.stderr)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "== step 2: review" in done.stdout
    bad = chorus(config_dir, "history", "show", outcome.session_id, "--png", str(tmp_path / "nope" / "t.png"))
    assert bad.returncode == 2 and "cannot write the PNG" in said(bad.stderr)
