"""The front door (orchestrator.app.Chorus): every check once, in one place, for every front end.

Runs go through the FakeBackend (milliseconds); one test runs the demo model on the real llama-server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import orchestrator.app as app_module
from orchestrator.app import Chorus, Pipeline
from orchestrator.config import aggregators
from orchestrator.config.inputs import QuestionError
from orchestrator.config.schema import PipelineSpec
from orchestrator.engine.fake import FakeBackend
from orchestrator.errors import ConfigError, ModelUnavailable, PipelineBlocked
from orchestrator.runtime import Runtime
from tests import yamlfile
from tests.conftest import ConfigDir

ONE_STAGE = {"name": "one", "stages": [{"name": "answer", "models": ["gemma3-270m"], "max_tokens": 8,
                                        "n_ctx": 512, "seed": 7}]}


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[tuple[Any, ...]]:
    """Replace `owner.name` by a wrapper that records each call's arguments and calls the original."""
    calls: list[tuple[Any, ...]] = []
    original: Callable[..., Any] = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def fake_run(chorus: Chorus, pipeline: Pipeline, question: str = "Why is the sky blue?") -> Any:
    return asyncio.run(chorus.arun(pipeline, question, backend=FakeBackend()))


@pytest.fixture
def chorus(config_dir: ConfigDir) -> Any:
    door = Chorus.from_dir(config_dir.path)
    yield door
    door.close()


def test_the_question_is_cleaned_once_per_run(chorus: Chorus, monkeypatch: pytest.MonkeyPatch) -> None:
    cleaned = counting(monkeypatch, app_module, "clean_question")
    outcome = fake_run(chorus, chorus.pipeline(), "Why is the sky blue\udcff?")  # a lone surrogate
    assert outcome.run.status == "completed"
    assert len(cleaned) == 1
    assert outcome.run.question == "Why is the sky blue\ufffd?"  # what was run and saved is the cleaned text


def test_the_aggregator_allow_list_is_checked_once_from_load_to_run(chorus: Chorus,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    checked = counting(monkeypatch, app_module, "check_pipeline")
    by_overrides = counting(monkeypatch, aggregators, "check_pipeline")  # what apply_overrides may call
    fake_run(chorus, chorus.pipeline(overrides=["defaults.max_tokens=8"]))
    assert len(checked) + len(by_overrides) == 1


def test_an_empty_question_is_refused_before_a_session_is_created(chorus: Chorus, config_dir: ConfigDir) -> None:
    with pytest.raises(QuestionError, match="empty"):
        fake_run(chorus, chorus.pipeline(), "   ")
    assert not config_dir.sessions_dir.exists() or not any(config_dir.sessions_dir.iterdir())


def test_a_blocked_base_pipeline_is_refused_with_the_missing_model_and_why(chorus: Chorus,
                                                                           config_dir: ConfigDir) -> None:
    (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    door = Chorus.from_dir(config_dir.path)  # the registry is read when the door is built
    with pytest.raises(PipelineBlocked) as err:
        door.pipeline()
    assert "gemma3-270m" in err.value.missing and "base pipeline is blocked" in err.value.message
    assert err.value.missing["gemma3-270m"]  # the reason, not just the name


def test_a_blocked_pipeline_file_is_named_not_called_the_base_pipeline(chorus: Chorus, tmp_path: Path) -> None:
    """`chorus run/plan --pipeline other.yaml` said "the base pipeline is blocked" of a file that is not it."""
    other = tmp_path / "other.yaml"
    other.write_text("name: m2\nstages:\n  - name: a\n    models: [trunc]\n")
    with pytest.raises(PipelineBlocked) as err:
        chorus.pipeline(other)
    assert err.value.message.startswith("the pipeline 'm2' is blocked: trunc")
    planned = chorus.plan(chorus.pipeline(other, require_models=False))
    assert planned.run.blocked is not None and "the pipeline 'm2' is blocked" in planned.run.blocked.message
    base = chorus.plan(chorus.pipeline(require_models=False))  # pipeline.yaml itself: still "the base pipeline"
    assert base.run.blocked is None


def test_a_base_pipelines_models_are_checked_once_from_load_to_plan_and_run(chorus: Chorus,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    checked = counting(monkeypatch, chorus.registry, "pipeline_status")
    pipeline = chorus.pipeline()
    assert chorus.plan(pipeline).run.blocked is None
    assert fake_run(chorus, pipeline).run.status == "completed"
    assert len(checked) == 1  # at the front door; the plans take its answer


def test_a_base_pipeline_let_through_unchecked_is_blocked_on_its_plan_and_its_run(config_dir: ConfigDir) -> None:
    (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    door = Chorus.from_dir(config_dir.path)
    pipeline = door.pipeline(require_models=False)  # `chorus plan` shows it blocked; a run records why
    blocked = door.plan(pipeline).run.blocked
    assert blocked is not None and blocked.type == "PipelineBlocked" and "gemma3-270m" in blocked.extra["missing"]
    outcome = fake_run(door, pipeline)
    assert outcome.run.status == "failed" and outcome.run.error == blocked
    door.close()


def test_a_manual_pipeline_with_a_missing_model_loads_but_the_catalogue_leaves_it_out(
        config_dir: ConfigDir) -> None:
    (config_dir.path / "pipelines").mkdir()
    (config_dir.path / "pipelines" / "ghost.yaml").write_text(
        yamlfile.dump({"stages": [{"name": "x", "models": ["gone"]}]}))
    door = Chorus.from_dir(config_dir.path)
    spec = PipelineSpec.model_validate({"stages": [{"name": "x", "models": ["gone"]}]})
    assert door.pipeline(spec, mode="manual").mode == "manual"  # runs, and says per call what is missing
    assert [p.id for p in door.pipelines()] == ["chorus/base"]
    with pytest.raises(ModelUnavailable, match="gone"):
        door.pipeline_by_id("chorus/ghost")


def test_overrides_are_applied_and_reach_the_plan(chorus: Chorus) -> None:
    pipeline = chorus.pipeline(overrides=["defaults.max_tokens=7", "draft.temperature=0.1"])
    assert pipeline.spec.defaults.max_tokens == 7
    planned = chorus.plan(pipeline)
    draft = next(s for s in planned.run.stages if s.name == "draft")
    assert {c.request.max_tokens for s in planned.run.stages for c in s.calls} == {7}
    assert [c.request.temperature for c in draft.calls] == [0.1]


def test_a_bad_override_is_a_config_error_naming_the_field(chorus: Chorus) -> None:
    with pytest.raises(ConfigError, match="nonsense"):
        chorus.pipeline(overrides=["defaults.nonsense=1"])


def test_plan_resolves_the_run_plan_once_and_the_memory_plan_from_it(chorus: Chorus,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = counting(monkeypatch, Runtime, "plan")
    memory = counting(monkeypatch, app_module, "plan_memory")
    planned = chorus.plan(chorus.pipeline())
    assert len(resolved) == 1 and len(memory) == 1
    assert memory[0][1] is planned.run  # the memory plan is made from the same resolved plan
    assert planned.run.mode == "base"


def test_the_catalogue_offers_the_base_pipeline_and_each_pipeline_file(config_dir: ConfigDir) -> None:
    folder = config_dir.path / "pipelines"
    folder.mkdir()
    (folder / "solo.yaml").write_text(yamlfile.dump(ONE_STAGE))
    (folder / "bad name.yaml").write_text(yamlfile.dump(ONE_STAGE))
    door = Chorus.from_dir(config_dir.path)
    by_id = {p.id: p for p in door.pipelines()}
    assert sorted(by_id) == ["chorus/base", "chorus/solo"]
    assert by_id["chorus/base"].mode == "base" and by_id["chorus/solo"].mode == "manual"
    assert by_id["chorus/solo"].path == folder / "solo.yaml"


def test_a_rerun_refuses_a_bad_override_before_anything_runs(chorus: Chorus) -> None:
    parent = fake_run(chorus, chorus.pipeline())
    with pytest.raises(ConfigError, match="nonsense"):
        chorus.prepare_rerun(parent.session_id, 2, overrides=["draft.nonsense=1"])
    prepared = chorus.prepare_rerun(parent.session_id, 2, overrides=["draft.seed=5"])
    assert prepared.start.parent == parent.session_id and len(prepared.start.prior) == 1
    assert next(s for s in prepared.pipeline.spec.stages if s.name == "draft").seed == 5


def test_a_rerun_of_a_base_session_whose_pipeline_is_now_blocked_is_refused_before_anything_is_saved(
        config_dir: ConfigDir) -> None:
    door = Chorus.from_dir(config_dir.path)
    parent = fake_run(door, door.pipeline())
    door.close()
    (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()  # a model of the base pipeline is gone
    door = Chorus.from_dir(config_dir.path)
    sessions = sorted(p.name for p in config_dir.sessions_dir.iterdir())
    with pytest.raises(PipelineBlocked, match="gemma3-270m"):
        door.prepare_rerun(parent.session_id, 2)
    assert sorted(p.name for p in config_dir.sessions_dir.iterdir()) == sessions  # no new (failed) session
    door.close()
    from tests.clirun import run_main

    out = run_main("history", "rerun", parent.session_id, "--stage", "2", "--config-dir", str(config_dir.path))
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "the base pipeline is blocked" in out.stderr and "gemma3-270m" in out.stderr
    assert sorted(p.name for p in config_dir.sessions_dir.iterdir()) == sessions  # `chorus history rerun`: none


def test_the_memory_plan_names_a_stage_whose_model_fits_nowhere_not_even_alone(config_dir: ConfigDir) -> None:
    from launcher.process.server import MAX_N_CTX

    server = yamlfile.load((config_dir.path / "app.yaml").read_text())["server"]
    config_dir.write_app(server={**server, "memory_budget_mib": 4096})  # whatever this machine has
    chorus = Chorus.from_dir(config_dir.path)
    huge = PipelineSpec.model_validate({"stages": [
        {"name": "small", "models": ["gemma3-270m"], "n_ctx": 512},
        {"name": "huge", "models": ["gemma3-270m"], "n_ctx": MAX_N_CTX}]})
    memory = chorus.plan(chorus.pipeline(huge, mode="manual")).memory
    assert [s.stage for s in memory.fits_nowhere] == ["huge"] and not memory.fits  # waves cannot help
    assert [s.fits_alone for s in memory.stages] == [True, False]
    assert chorus.plan(chorus.pipeline(ONE_STAGE_SPEC, mode="manual")).memory.fits_nowhere == []
    chorus.close()


ONE_STAGE_SPEC = PipelineSpec.model_validate(ONE_STAGE)


def test_ps_and_stop_read_no_model_file(config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_runtime(*_args: Any, **_kwargs: Any) -> Runtime:
        raise AssertionError("the runtime (registry, GGUF headers) was built")

    monkeypatch.setattr(app_module, "Runtime", no_runtime)
    door = Chorus.from_dir(config_dir.path)
    assert door.servers() == []


def test_sampling_may_change_on_a_checked_pipeline_but_models_may_not(chorus: Chorus) -> None:
    pipeline = chorus.pipeline()
    cooler = pipeline.spec.model_copy(update={"defaults": pipeline.spec.defaults.model_copy(
        update={"temperature": 0.0})})
    assert pipeline.with_spec(cooler).spec.defaults.temperature == 0.0
    other = PipelineSpec.model_validate(ONE_STAGE)
    with pytest.raises(ValueError, match="sampling"):
        pipeline.with_spec(other)


@pytest.mark.integration
def test_a_real_run_through_the_front_door_is_answered_and_saved(config_dir: ConfigDir,
                                                                 llama_server_bin: Path) -> None:
    with Chorus.from_dir(config_dir.path) as door:
        pipeline = door.pipeline(PipelineSpec.model_validate(ONE_STAGE), mode="manual")
        door.require_binary(pipeline)
        outcome = door.run(pipeline, "The capital of France is")
    assert outcome.run.status == "completed" and outcome.run.final.strip()
    assert outcome.session_dir is not None and (outcome.session_dir / "config_snapshot.json").exists()


def test_a_model_that_fits_nowhere_is_refused_with_a_concrete_way_to_fit(config_dir: ConfigDir) -> None:
    """`chorus run --set defaults.n_ctx=1000000` said only "Use a smaller n_ctx or fewer slots, a smaller
    model, or free memory"; `chorus serve` said how small."""
    config_dir.write_app(server={"memory_budget_mib": 1024})  # the same on every machine
    chorus = Chorus.from_dir(config_dir.path)
    spec = PipelineSpec.model_validate({"stages": [{"name": "a", "models": ["gemma3-270m"]}],
                                        "defaults": {"n_ctx": 1_000_000}})
    stage = chorus.plan(chorus.pipeline(spec, mode="manual")).memory.stages[0]
    assert not stage.fits_alone
    m = re.search(r"use n_ctx (\d+) or less", stage.reason)
    assert m, stage.reason
    smaller = PipelineSpec.model_validate({"stages": [{"name": "a", "models": ["gemma3-270m"]}],
                                           "defaults": {"n_ctx": int(m.group(1))}})
    assert chorus.plan(chorus.pipeline(smaller, mode="manual")).memory.stages[0].fits_alone  # the way works
    chorus.close()
