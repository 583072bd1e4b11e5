"""The memory plan read from the resolved run plan: servers grouped by resolved spec, waves, synthesis after.

Simulated machines (FixedProbe), no llama-server; the real-server regression is in tests/test_pipeline.py.
"""

from __future__ import annotations

from pathlib import Path

from launcher.memory.calibration import CalibrationCache
from launcher.memory.probes import FixedProbe, GpuMemory
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.plan.memory import plan_memory, plan_stage_memory
from orchestrator.runtime import Runtime
from tests.conftest import ConfigDir

MiB = 1 << 20
GiB = 1 << 30


def machine(ram_gib: float = 16, free_gib: float | None = None, *gpus: tuple[float, float]) -> FixedProbe:
    return FixedProbe(int(ram_gib * GiB), int((ram_gib if free_gib is None else free_gib) * GiB),
                      tuple(GpuMemory(i, f"sim{i}", int(t * GiB), int(f * GiB)) for i, (t, f) in enumerate(gpus)))


def test_plan_stage_groups_repeated_models_into_one_server_and_plans_synthesis_after(
        config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["far"] = {"url": "http://192.0.2.1:8080/v1"}
    config_dir.write_models(models)
    rt = Runtime(load_config(config_dir.path), probe=machine(16), calibration=CalibrationCache(config_dir.path))
    pipeline = rt.config.load_pipeline()
    review = next(s for s in pipeline.stages if s.name == "review")
    review.models.append(type(review.models[0])(model="far", label="remote-one"))
    plan = plan_stage_memory(rt, rt.plan(pipeline).stage(3))
    local = [m for m in plan.models if not m.remote]
    assert len(local) == 1 and local[0].slots == 3 and len(local[0].labels) == 3
    assert local[0].n_ctx == 2048 and local[0].n_gpu_layers == 0 and local[0].ram_bytes > 200 * MiB
    remote = next(m for m in plan.models if m.remote)
    assert remote.ram_bytes == 0 and remote.vram_bytes == 0
    assert plan.fits_together and sorted(plan.waves[0]) == sorted([*local[0].labels, "remote-one"])
    assert plan.synthesis is not None and plan.synthesis.labels == ["smollm2-135m-synthesis"]
    whole = plan_memory(rt, rt.plan(pipeline))
    assert [s.stage for s in whole.stages] == ["analyse", "draft", "review"] and whole.fits


def test_plan_stage_that_does_not_fit_runs_its_models_in_waves(config_dir: ConfigDir, tmp_path: Path) -> None:
    models = config_dir.models()
    demo = models["models"]["gemma3-270m"]
    # two servers of one file (threads differ, so they cannot share one server)
    models["models"] = {name: {**demo, "default_n_ctx": 32768, "threads": n} for n, name in ((1, "first"),
                                                                                            (2, "second"))}
    config_dir.write_models(models)
    config_dir.write_pipeline({"name": "two", "stages": [{"name": "both", "models": ["first", "second"]}]})

    def runtime_with(free: int) -> Runtime:
        return Runtime(load_config(config_dir.path), probe=FixedProbe(16 * GiB, free),
                       calibration=CalibrationCache(tmp_path))

    roomy = runtime_with(16 * GiB)
    one = roomy.memory_guard.need(roomy.server_spec("first"))
    margin = int(16 * GiB * 0.10) + 512 * MiB
    # room for one server and a little: the second shares the mapped file, not its own KV cache
    rt = runtime_with(margin + one.ram_bytes + one.anon_ram_bytes // 2)
    pipeline = rt.config.load_pipeline()
    plan = plan_stage_memory(rt, rt.plan(pipeline).stage(1))
    assert not plan.fits_together and plan.waves == [["first"], ["second"]] and not plan.unfit
    assert plan.reason.startswith("all at once: ram: ") and "wave 2: second on second (1 slot" in plan.reason
    assert all(m.ram_bytes == one.ram_bytes for m in plan.models)




def test_unset_and_explicit_default_n_ctx_plan_one_server_across_stages(config_dir: ConfigDir) -> None:
    """Issue #12's regression: the stage without n_ctx and the one with n_ctx: 4096 share one server."""
    rt = Runtime(load_config(config_dir.path), probe=machine(16))
    pipeline = PipelineSpec.model_validate({"name": "two", "stages": [
        {"name": "a", "models": ["gemma3-270m"]},
        {"name": "b", "models": ["gemma3-270m"], "n_ctx": 4096}]})
    plan = rt.plan(pipeline)
    memory = plan_memory(rt, plan)
    assert len(plan.servers) == 1
    assert [m.n_ctx for s in memory.stages for m in s.models] == [4096, 4096]
    assert [m.slots for s in memory.stages for m in s.models] == [1, 1]


def test_a_model_used_twice_in_a_stage_needs_one_server_with_two_slots(config_dir: ConfigDir,
                                                                       tmp_path: Path) -> None:
    rt = Runtime(load_config(config_dir.path), probe=machine(16), calibration=CalibrationCache(tmp_path))
    pipeline = PipelineSpec.model_validate({"name": "p", "defaults": {"n_ctx": 1024}, "stages": [
        {"name": "a", "models": ["gemma3-270m", {"model": "gemma3-270m", "label": "again"}]}]})
    stage = plan_stage_memory(rt, rt.plan(pipeline).stage(1))
    assert len(stage.models) == 1 and stage.models[0].slots == 2
    assert stage.models[0].labels == ["gemma3-270m-1", "again"] and stage.fits_together  # labels made unique


def test_with_a_budget_the_plan_header_shows_the_budget_and_its_stops_and_slots(config_dir: ConfigDir,
                                                                                tmp_path: Path) -> None:
    """Issue #22 item 3: the plan says the budget it was made against (not the machine's free RAM), and per
    wave the slots and the warm servers stopped first."""
    from orchestrator.config.overrides import apply_overrides
    from orchestrator.plan.memory import plan_header, plan_rows, stage_headline, stage_wave_lines

    app = load_config(config_dir.path).app
    rt0 = Runtime(load_config(config_dir.path), probe=machine(16), calibration=CalibrationCache(tmp_path))
    two = rt0.memory_guard.need(rt0.server_spec("smollm2-135m", n_ctx=8192, slots=2))
    three = rt0.memory_guard.need(rt0.server_spec("smollm2-135m", n_ctx=8192, slots=3))
    budget = ((two.ram_bytes + three.ram_bytes) // 2) >> 20
    config_dir.write_app(server={**app.server.model_dump(mode="json"), "memory_budget_mib": budget})
    rt = Runtime(load_config(config_dir.path), probe=machine(16), calibration=CalibrationCache(tmp_path))
    pipeline = apply_overrides(rt.config.load_pipeline(), ["defaults.n_ctx=8192"])
    memory = plan_memory(rt, rt.plan(pipeline, "base"))
    header = plan_header(memory, 0.10, 512)
    assert header.startswith(f"pipeline 'base': budget {budget} MiB (server.memory_budget_mib)")
    review = memory.stages[2]
    assert stage_headline(review).startswith("runs in 2 waves (all at once: budget: ")
    rows = plan_rows(review)
    assert [(r["wave"], r["slots"], r["server"]) for r in rows] == [("1", 2, "started"), ("2", 2, "warm"),
                                                                   ("then", 2, "warm")]
    assert stage_wave_lines(review) == ["before wave 1: stops gemma3-270m"]
