"""The engine on the real llama-server and demo model: stages, parallel calls, failures, events."""

from __future__ import annotations

import threading

import pytest

from orchestrator.config.overrides import apply_overrides
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.events import Event
from orchestrator.engine.run import CancelToken
from orchestrator.runtime import Runtime
from tests.conftest import ConfigDir, engine_run, small_pipeline

pytestmark = pytest.mark.integration


def manual(stages: list[dict], **defaults: object) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "manual", "defaults": {"max_tokens": 8, "n_ctx": 1024, **defaults},
                                        "stages": stages})


def run(runtime: Runtime, spec: PipelineSpec, question: str = "Why is the sky blue?", **kw):
    return engine_run(runtime, spec, question, **kw.pop("engine", {}), **kw)


def test_base_pipeline_runs_all_stages_on_one_warm_server_per_model(runtime: Runtime) -> None:
    record, events = run(runtime, small_pipeline(), mode="base")
    assert record.status == "completed", record.error
    assert [s.name for s in record.stages] == ["analyse", "draft", "review"]
    review = record.stages[2]
    assert [r.label for r in review.responses] == ["reviewer-facts", "reviewer-clarity", "reviewer-skeptic"]
    assert all(r.ok and r.text for r in review.responses)
    assert review.execution == "parallel"
    assert review.aggregation and review.aggregation.kind == "synthesis"
    assert "Three answers to combine" in review.aggregation.details["synthesis_prompt"]
    assert record.final == review.output and record.final
    assert runtime.pool.starts == 2  # one server per model: each stage asks for its model's pipeline-wide slots
    types = [e.type for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert "token" in types and "aggregation_done" in types
    assert types.index("stage_started") < types.index("model_finished")


def test_second_run_starts_no_server(shared_runtime: Runtime) -> None:
    runtime = shared_runtime  # warm servers shared with the module's other read-only tests
    run(runtime, small_pipeline(), mode="base")
    starts = runtime.pool.starts
    record, _ = run(runtime, small_pipeline(), mode="base")
    assert record.status == "completed" and runtime.pool.starts == starts


def test_set_override_changes_generation(shared_runtime: Runtime) -> None:
    runtime = shared_runtime
    spec = apply_overrides(manual([{"name": "s", "models": ["gemma3-270m"]}]), ["s.max_tokens=3"])
    record, _ = run(runtime, spec)
    assert record.stages[0].responses[0].completion_tokens <= 3  # type: ignore[operator]


def test_sequential_execution_runs_one_model_per_wave(config_dir: ConfigDir, llama_server_bin) -> None:
    models = config_dir.models()
    models["models"]["gemma-b"] = {**models["models"]["gemma3-270m"]}
    config_dir.write_models(models)
    rt = Runtime(load_config(config_dir.path))
    try:
        spec = manual([{"name": "s", "execution": "sequential", "models": ["gemma3-270m", "gemma-b"]}])
        record, events = run(rt, spec)
    finally:
        rt.close()
    stage = record.stages[0]
    assert record.status == "completed" and stage.execution == "sequential"
    assert stage.waves == [["gemma3-270m"], ["gemma-b"]]
    finished = [e.label for e in events if e.type == "model_finished"]
    started = [e.label for e in events if e.type == "model_started"]
    assert started == finished == ["gemma3-270m", "gemma-b"]
    first_done = next(i for i, e in enumerate(events) if e.type == "model_finished")
    second_start = next(i for i, e in enumerate(events) if e.type == "model_started" and e.label == "gemma-b")
    assert first_done < second_start


def test_cancel_stops_the_run_in_flight(shared_runtime: Runtime) -> None:
    runtime = shared_runtime
    spec = manual([{"name": "long", "models": ["gemma3-270m"], "max_tokens": 2000, "prompt": "Count: 1, 2, 3,"},
                   {"name": "never", "models": ["gemma3-270m"]}])
    cancel = CancelToken()
    seen: list[Event] = []

    def observer(event: Event) -> None:
        seen.append(event)
        if event.type == "token" and sum(e.type == "token" for e in seen) == 3:
            threading.Timer(0.01, cancel.cancel).start()  # from another thread, like a UI button

    record, _ = engine_run(runtime, spec, "q", observers=[observer], cancel=cancel)
    assert record.status == "cancelled"
    assert record.stages[0].responses[0].status == "cancelled"
    assert sum(e.type == "token" for e in seen) < 500


def test_rerun_from_stage_keeps_earlier_stages_and_reuses_servers(shared_runtime: Runtime) -> None:
    runtime = shared_runtime
    spec = small_pipeline()
    first, _ = run(runtime, spec, mode="base")
    starts = runtime.pool.starts
    again, _ = engine_run(runtime, spec, first.question, prior_stages=first.stages[:2], mode="base")
    assert again.status == "completed" and again.rerun_from_stage == 3
    assert [s.status for s in again.stages[:2]] == ["copied", "copied"]
    assert [s.output for s in again.stages[:2]] == [s.output for s in first.stages[:2]]
    assert runtime.pool.starts == starts


@pytest.fixture
def small_machine_runtime(config_dir: ConfigDir, llama_server_bin, tmp_path):
    """Two models (two files) on a simulated machine where each fits alone but not both together."""
    import os
    import shutil

    from launcher.memory.calibration import CalibrationCache
    from launcher.memory.probes import FixedProbe

    second = config_dir.models_dir / "second.gguf"
    real = (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").resolve()  # a second file, not a second path
    try:
        os.link(real, second)
    except OSError:
        shutil.copy(real, second)
    models = config_dir.models()
    models["models"]["second"] = {**models["models"]["gemma3-270m"], "file": "second.gguf"}
    config_dir.write_models(models)
    total = 4 * 2**30
    probe = FixedProbe(ram_total_bytes=total, ram_available_bytes=total)
    rt = Runtime(load_config(config_dir.path), probe=probe, calibration=CalibrationCache(tmp_path / "calib"))
    guard = rt.memory_guard
    need = sum(guard.need(rt.server_spec(m, n_ctx=1024)).ram_bytes for m in ("gemma3-270m", "second"))
    margin = int(total * 0.10) + 512 * 2**20
    probe.ram_available_bytes = margin + need - 32 * 2**20  # one fits, both together do not
    yield rt
    rt.close()


def two_model_stage() -> PipelineSpec:
    return manual([{"name": "pair", "models": ["gemma3-270m", "second"], "n_ctx": 1024}])


def test_manual_stage_that_does_not_fit_is_refused_unless_sequential_is_allowed(small_machine_runtime) -> None:
    asked = []

    def decline(question) -> bool:
        asked.append(question)
        return False

    record, _ = run(small_machine_runtime, two_model_stage(), engine={"allow_sequential": decline})
    assert record.status == "cancelled" and record.error and record.error.type == "StageRefused"
    assert asked and asked[0].waves == [["gemma3-270m"], ["second"]]
    assert small_machine_runtime.pool.starts == 0  # refused before any model loaded


def test_manual_stage_falls_back_to_waves_when_allowed(small_machine_runtime) -> None:
    record, events = run(small_machine_runtime, two_model_stage(), engine={"allow_sequential": True})
    stage = record.stages[0]
    assert record.status == "completed" and stage.execution == "sequential"
    assert stage.waves == [["gemma3-270m"], ["second"]]
    assert any(e.type == "notice" and "waves" in e.message for e in events)
    assert all(r.ok for r in stage.responses)


def test_base_mode_falls_back_to_waves_without_asking(small_machine_runtime) -> None:
    record, _ = run(small_machine_runtime, two_model_stage(), mode="base", engine={"allow_sequential": False})
    assert record.status == "completed" and record.stages[0].execution == "sequential"


def test_chat_mode_model_with_a_named_template_answers_through_chat_completions(
        config_dir: ConfigDir, llama_server_bin) -> None:
    models = config_dir.models()
    models["models"]["gemma-chat"] = {**models["models"]["gemma3-270m"], "mode": "chat", "chat_template": "gemma"}
    config_dir.write_models(models)
    rt = Runtime(load_config(config_dir.path))
    try:
        assert rt.registry.get("gemma-chat").mode == "chat"
        spec = manual([{"name": "s", "models": ["gemma-chat", "gemma3-270m"], "temperature": 0, "seed": 1,
                        "system_prompt": "Answer in one word.", "aggregation": {"type": "concat"}}])
        record, _ = run(rt, spec, "What colour is the sky?")
        chat_server = next(s for s in rt.pool.servers() if s.model == "gemma-chat")
        assert "--chat-template" in chat_server.command(chat_server.port or 0)
    finally:
        rt.close()
    chat, plain = record.stages[0].response("gemma-chat"), record.stages[0].response("gemma3-270m")
    assert record.status == "completed", record.error
    assert chat and plain and chat.ok and chat.text.strip() and chat.completion_tokens
    # the gemma template wraps system and user text in turn markers: more prompt tokens than plain text
    assert chat.prompt_tokens and plain.prompt_tokens and chat.prompt_tokens > plain.prompt_tokens


def test_remote_url_model_runs_in_a_pipeline_without_a_local_server(config_dir: ConfigDir, warm_demo_server,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Another machine's OpenAI-compatible server, played by a llama-server reached only by URL."""
    remote = warm_demo_server
    monkeypatch.setenv("FAR_KEY", remote.api_key)
    models = config_dir.models()
    models["models"]["far"] = {"url": f"{remote.base_url}/v1", "api_key_env": "FAR_KEY", "mode": "completion"}
    config_dir.write_models(models)
    rt = Runtime(load_config(config_dir.path))
    try:
        record, _ = run(rt, manual([{"name": "s", "models": ["far"], "seed": 2}]), "The capital of France is")
        assert "pool" not in rt.__dict__  # nothing started locally
    finally:
        rt.close()
    response = record.stages[0].responses[0]
    assert record.status == "completed", record.error
    assert response.ok and response.text and response.completion_tokens

    monkeypatch.setenv("FAR_KEY", "wrong-key")
    rt = Runtime(load_config(config_dir.path))
    try:
        record, _ = run(rt, manual([{"name": "s", "models": ["far"]}]))
    finally:
        rt.close()
    error = record.stages[0].responses[0].error
    assert record.status == "failed" and error and error.type == "RequestFailed" and "401" in error.message


def test_unset_and_explicit_default_n_ctx_start_exactly_one_server(runtime: Runtime) -> None:
    """Issue #12's bug: a stage that leaves n_ctx to the model default and one that sets the same value
    started two servers. The plan resolves both to one spec, so one server serves both stages."""
    default_n_ctx = runtime.registry.get("gemma3-270m").entry.default_n_ctx
    spec = PipelineSpec.model_validate({"name": "n_ctx", "defaults": {"max_tokens": 4}, "stages": [
        {"name": "unset", "models": ["gemma3-270m"]},
        {"name": "explicit", "models": ["gemma3-270m"], "n_ctx": default_n_ctx}]})
    assert len(runtime.plan(spec).servers) == 1
    record, _ = run(runtime, spec)
    assert record.status == "completed", record.error
    assert runtime.pool.starts == 1 and len(runtime.running_servers()) == 1


@pytest.fixture
def three_reviewer_machine(config_dir: ConfigDir, llama_server_bin, tmp_path):
    """Three reviewer models (three files) on a simulated machine with room for two of them at once."""
    import os
    import shutil

    from launcher.memory.calibration import CalibrationCache
    from launcher.memory.probes import FixedProbe

    real = (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").resolve()
    models = config_dir.models()
    for name in ("rev-a", "rev-b", "rev-c"):
        try:
            os.link(real, config_dir.models_dir / f"{name}.gguf")
        except OSError:
            shutil.copy(real, config_dir.models_dir / f"{name}.gguf")
        models["models"][name] = {**models["models"]["gemma3-270m"], "file": f"{name}.gguf"}
    config_dir.write_models(models)
    total = 4 * 2**30
    probe = FixedProbe(ram_total_bytes=total, ram_available_bytes=total)
    rt = Runtime(load_config(config_dir.path), probe=probe, calibration=CalibrationCache(tmp_path / "calib"))
    one = rt.memory_guard.need(rt.server_spec("rev-a", n_ctx=1024)).ram_bytes
    margin = int(total * 0.10) + 512 * 2**20
    probe.ram_available_bytes = margin + 2 * one + one // 2  # two reviewers fit together, three do not
    yield rt
    rt.close()


def review_panel() -> PipelineSpec:
    return manual([
        {"name": "draft", "models": ["rev-a"], "prompt": "Q: {{ question }}\nA:"},
        {"name": "review", "models": ["rev-a", "rev-b", "rev-c"], "prompt": "Improve: {{ previous }}",
         "aggregation": {"type": "concat"}},  # a base model's short synthesis may be empty: not what this tests
    ], n_ctx=1024)


@pytest.mark.parametrize("mode", ["base", "manual"])
def test_every_reviewer_answers_through_waves_on_a_small_machine(three_reviewer_machine, mode: str) -> None:
    asked = []

    def allow(question) -> bool:
        asked.append(question)
        return True

    record, events = run(three_reviewer_machine, review_panel(), mode=mode, engine={"allow_sequential": allow})
    review = record.stages[1]
    assert record.status == "completed", (record.error, [(r.label, r.error) for r in review.responses])
    assert all(r.ok for r in review.responses)
    assert len(review.waves) == 2 and sorted(label for w in review.waves for label in w) == ["rev-a", "rev-b",
                                                                                              "rev-c"]
    notices = [e.message for e in events if e.type == "notice"]
    assert any("2 waves" in n for n in notices)
    assert len(asked) == (1 if mode == "manual" else 0)  # manual mode asks once, before anything runs
    first_model_start = next(i for i, e in enumerate(events) if e.type == "model_started")
    assert all(i < first_model_start for i, e in enumerate(events) if e.type == "notice")


def test_an_idle_warm_server_is_stopped_before_the_wave_that_needs_its_room(three_reviewer_machine) -> None:
    rt = three_reviewer_machine
    with rt.pool.lease(rt.server_spec("gemma3-270m", n_ctx=1024)):
        pass  # warm and idle, holding room
    record, _ = run(rt, review_panel(), mode="base")
    assert record.status == "completed", record.error
    assert "gemma3-270m" not in {s.model for s in rt.running_servers()}
    assert all(r.ok for r in record.stages[1].responses)
