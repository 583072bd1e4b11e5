"""The shipped demo: two real models, each in its mode and role, with prompts whose labels do not leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.memory.gguf import read_gguf
from orchestrator.config.registry import Registry
from orchestrator.config.schema import load_config, load_pipeline
from tests.conftest import REPO, ConfigDir, engine_run, small_pipeline


def test_the_second_model_has_a_chat_template_and_is_registered_in_chat_mode(config_dir: ConfigDir,
                                                                              second_model: Path) -> None:
    assert read_gguf(second_model).chat_template  # scripts/fetch_smollm2.py took the instruct GGUF
    registry = Registry(load_config(config_dir.path))
    assert (registry.get("smollm2-135m").mode, registry.get("gemma3-270m").mode) == ("chat", "completion")
    assert registry.pipeline_status(load_config(config_dir.path).load_pipeline()).available


def test_base_pipeline_gives_each_model_the_role_it_is_good_at() -> None:
    pipeline = load_pipeline(REPO / "config" / "pipeline.yaml")
    roles = {s.name: {m.model for m in s.models} for s in pipeline.stages}
    assert roles == {"analyse": {"smollm2-135m"}, "draft": {"gemma3-270m"}, "review": {"smollm2-135m"}}
    assert pipeline.stages[-1].aggregation.synthesis_model == "smollm2-135m"
    draft = pipeline.stages[1]
    assert not draft.system_prompt  # a base model would continue a system prompt as text of its own
    assert draft.stop and all(s.startswith("\n") for s in draft.stop)  # it ends where it would ramble on
    assert all((s.repeat_penalty or pipeline.defaults.repeat_penalty or 1) > 1 for s in pipeline.stages)


@pytest.mark.integration
def test_a_base_run_on_both_models_answers_without_leaking_prompt_labels(shared_runtime) -> None:
    record, _ = engine_run(shared_runtime, small_pipeline(max_tokens=24), mode="base")
    assert record.status == "completed", [s.error for s in record.stages]
    models = {r.model for s in record.stages for r in s.responses}
    assert models == {"smollm2-135m", "gemma3-270m"}
    for stage in record.stages:
        for response in stage.responses:
            assert response.text.strip(), (stage.name, response.label)
            for label in ("Question:", "A draft answer:", "Three answers to combine", "Write a better answer"):
                assert label not in response.text, (stage.name, response.label, response.text)
    assert record.final.strip()
