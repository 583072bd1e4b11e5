"""The registry against the real demo model: available, missing, invalid, and base-mode blocking."""

from __future__ import annotations

import logging
import shutil

import pytest

from orchestrator.config.registry import Registry
from orchestrator.config.schema import load_config
from orchestrator.errors import ModelUnavailable, PipelineBlocked
from tests.conftest import DEMO_MODEL_NAME, ConfigDir


def test_demo_model_is_available_with_its_metadata(config_dir: ConfigDir) -> None:
    reg = Registry(load_config(config_dir.path))
    rec = reg.get("gemma3-270m")
    assert rec.status == "available"
    assert rec.metadata is not None and rec.metadata.architecture == "gemma3"
    assert rec.mode == "completion"  # a base model with no chat template
    assert reg.base_pipeline_status().available


def test_missing_file_is_unregistered_with_a_warning_and_blocks_base_mode(
        config_dir: ConfigDir, caplog: pytest.LogCaptureFixture) -> None:
    models = config_dir.models()
    models["models"]["ghost"] = {"file": "ghost.gguf", "default_n_ctx": 2048, "default_gpu_layers": 0,
                                 "description": "not there"}
    config_dir.write_models(models)
    pipeline = config_dir.pipeline()
    pipeline["stages"][1]["models"] = ["ghost"]
    config_dir.write_pipeline(pipeline)

    with caplog.at_level(logging.WARNING, logger="chorus.registry"):
        reg = Registry(load_config(config_dir.path))
    assert "ghost" not in reg.available and reg.records["ghost"].status == "missing"
    assert any("ghost" in r.getMessage() for r in caplog.records)
    status = reg.base_pipeline_status()
    assert not status.available and "ghost" in status.missing
    with pytest.raises(PipelineBlocked, match="ghost"):
        status.raise_if_blocked()
    with pytest.raises(ModelUnavailable, match="file not found"):
        reg.get("ghost")
    assert "gemma3-270m" in reg.available  # manual mode can still use the rest


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", b"not a model at all" * 100])
def test_broken_file_is_invalid_with_its_reason(config_dir: ConfigDir, content: bytes) -> None:
    (config_dir.models_dir / "broken.gguf").write_bytes(content)
    models = config_dir.models()
    models["models"]["broken"] = {"file": "broken.gguf"}
    config_dir.write_models(models)
    reg = Registry(load_config(config_dir.path))
    rec = reg.records["broken"]
    assert rec.status == "invalid" and rec.reason and "GGUF" in rec.reason


def test_missing_models_dir_makes_every_file_model_missing_without_crashing(
        config_dir: ConfigDir, caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(config_dir.models_dir)
    with caplog.at_level(logging.WARNING, logger="chorus.registry"):
        reg = Registry(load_config(config_dir.path))
    assert reg.available == {}
    assert "models directory" in (reg.records["gemma3-270m"].reason or "")
    assert sum("removable disk" in r.getMessage() for r in caplog.records) == 1
    assert not reg.base_pipeline_status().available


def test_adding_a_model_is_file_plus_entry_plus_refresh(config_dir: ConfigDir) -> None:
    cfg = load_config(config_dir.path)
    reg = Registry(cfg)
    assert "second" not in reg.records
    (config_dir.models_dir / "second.gguf").symlink_to(config_dir.models_dir / DEMO_MODEL_NAME)
    models = config_dir.models()
    models["models"]["second"] = {"file": "second.gguf", "default_n_ctx": 1024}
    config_dir.write_models(models)
    reg = Registry(load_config(config_dir.path))  # a restart
    assert reg.get("second").metadata is not None


def test_pipeline_naming_an_undefined_model_is_blocked(config_dir: ConfigDir) -> None:
    pipeline = config_dir.pipeline()
    pipeline["stages"][0]["models"] = ["nobody"]
    config_dir.write_pipeline(pipeline)
    status = Registry(load_config(config_dir.path)).base_pipeline_status()
    assert status.missing == {"nobody": "not defined in models.yaml"}


def test_broken_pipeline_yaml_blocks_base_mode_instead_of_raising(config_dir: ConfigDir) -> None:
    config_dir.write_pipeline("stages: [\n")
    status = Registry(load_config(config_dir.path)).base_pipeline_status()
    assert not status.available and "pipeline.yaml" in (status.reason or "")


def test_remote_model_is_available_without_a_file(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["far"] = {"url": "http://127.0.0.1:9/v1", "api_key_env": "FAR_KEY"}
    config_dir.write_models(models)
    rec = Registry(load_config(config_dir.path)).get("far")
    assert rec.is_remote and rec.mode == "chat"


def test_a_missing_judge_model_blocks_base_mode_and_is_in_the_session_snapshot(config_dir: ConfigDir) -> None:
    from orchestrator.runs import config_snapshot
    from orchestrator.runtime import Runtime

    pipeline = config_dir.pipeline()
    pipeline["stages"][2]["aggregation"] = {"type": "judge", "judge_model": "absent-judge"}
    config_dir.write_pipeline(pipeline)
    cfg = load_config(config_dir.path)
    spec = cfg.load_pipeline()
    assert spec.model_names()[-1] == "absent-judge"
    status = Registry(cfg).base_pipeline_status()
    assert status.missing == {"absent-judge": "not defined in models.yaml"}
    rt = Runtime(cfg)
    snapshot = config_snapshot(rt, rt.plan(spec, "manual"), "q")
    assert snapshot["models"]["absent-judge"] == {"status": "undefined"}


def test_an_embedding_model_is_kept_in_records_but_offered_to_no_generate_stage(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["embedder"] = {"file": DEMO_MODEL_NAME, "role": "embedding"}
    config_dir.write_models(models)
    pipeline = config_dir.pipeline()
    pipeline["stages"][1]["models"] = ["embedder"]
    config_dir.write_pipeline(pipeline)
    reg = Registry(load_config(config_dir.path))
    assert reg.records["embedder"].available and "embedder" in reg.available  # complete, for `chorus docs`
    assert "embedder" not in reg.generators and "gemma3-270m" in reg.generators
    status = reg.base_pipeline_status()
    assert not status.available and "embedding" in status.missing["embedder"]
