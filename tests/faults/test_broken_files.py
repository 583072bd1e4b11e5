"""Fault 3: corrupt, truncated, zero-byte and non-GGUF files in the models dir.

The registry reads each file's GGUF header: a broken file is registered as invalid with its reason and
never reaches llama-server. A file the header check cannot catch (an unknown architecture), or one
broken after registration, fails at the real llama-server with a typed error on that model only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from orchestrator.config.registry import Registry
from orchestrator.config.schema import load_config
from tests.conftest import DEMO_MODEL_NAME, ConfigDir, demo_model_path
from tests.faults.conftest import DEMO, assert_session_valid, chorus_main, make_runtime, manual, run

HEAD_BYTES = 16 << 20  # the demo model's GGUF header and tensor index fit in this


def _head(source: Path | None = None) -> bytes:
    with open(source or demo_model_path(), "rb") as f:
        return f.read(HEAD_BYTES)


def sparse_model(path: Path, head: bytes, size: int) -> Path:
    """The demo model's header, then zeros (a sparse file) up to `size` bytes: cheap, but GGUF-shaped."""
    path.write_bytes(head)
    os.truncate(path, size)
    return path


def broken_files(models_dir: Path) -> dict[str, tuple[str, str]]:
    """Write one broken file per kind; return model name -> (file name, what its reason must say)."""
    source = models_dir / DEMO_MODEL_NAME  # the real demo file or the fast tier's synthetic one
    head, size = _head(source), source.stat().st_size
    corrupt = bytearray(head)
    corrupt[24:4024] = bytes((i * 131 + 7) % 251 for i in range(4000))  # garbage over the metadata
    (models_dir / "corrupt.gguf").write_bytes(bytes(corrupt))
    sparse_model(models_dir / "truncated.gguf", head, size // 2)
    (models_dir / "empty.gguf").write_bytes(b"")
    (models_dir / "notes.gguf").write_text("these are my notes, not a model\n" * 100)
    (models_dir / "safetensors.gguf").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(1000))
    bad_version = bytearray(head[:1 << 20])
    bad_version[4:8] = (99).to_bytes(4, "little")
    (models_dir / "future.gguf").write_bytes(bytes(bad_version))
    (models_dir / "folder.gguf").mkdir()
    return {
        "corrupt": ("corrupt.gguf", "string length"),
        "truncated": ("truncated.gguf", "past the end"),
        "empty": ("empty.gguf", "empty file"),
        "notes": ("notes.gguf", "not a GGUF file"),
        "safetensors": ("safetensors.gguf", "not a GGUF file"),
        "future": ("future.gguf", "unsupported GGUF version 99"),
        "folder": ("folder.gguf", "directory"),
    }


def test_broken_files_are_invalid_each_with_its_reason(config_dir: ConfigDir,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    kinds = broken_files(config_dir.models_dir)
    models = config_dir.models()
    for name, (file, _) in kinds.items():
        models["models"][name] = {"file": file, "default_n_ctx": 512}
    config_dir.write_models(models)
    with caplog.at_level(logging.WARNING, logger="chorus.registry"):
        registry = Registry(load_config(config_dir.path))
    for name, (_, reason) in kinds.items():
        rec = registry.records[name]
        assert rec.status == "invalid", (name, rec.status, rec.reason)
        assert rec.reason and reason in rec.reason, (name, rec.reason)
        assert rec.reason.startswith("not a valid GGUF file")
        assert any(f"'{name}'" in r.getMessage() for r in caplog.records), f"no warning for {name}"
    assert registry.records[DEMO].available  # the good models are unaffected
    assert set(registry.available) == {n for n in models["models"] if n not in kinds}

    status = registry.pipeline_status(manual([{"name": "s", "models": [DEMO, "truncated"]}]))
    assert not status.available and "past the end" in status.missing["truncated"]

    listed = chorus_main(config_dir, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {r["name"]: r for r in json.loads(listed.stdout)}
    assert {n: by_name[n]["status"] for n in kinds} == dict.fromkeys(kinds, "invalid")
    assert all(by_name[n]["reason"] for n in kinds)


@pytest.mark.integration
def test_a_file_the_header_check_passes_but_llama_server_rejects_fails_that_model_typed(
        config_dir: ConfigDir, llama_server_bin) -> None:
    """Unknown architecture: a readable GGUF header, so registered; the real server refuses to load it."""
    head = bytearray(_head())
    at = head.find(b"general.architecture") + len(b"general.architecture") + 12  # type u32, length u64
    assert head[at:at + 6] == b"gemma3"
    head[at:at + 6] = b"qwertz"
    sparse_model(config_dir.models_dir / "alien.gguf", bytes(head), demo_model_path().stat().st_size)
    models = config_dir.models()
    models["models"]["alien"] = {"file": "alien.gguf", "default_n_ctx": 512}
    config_dir.write_models(models)
    runtime = make_runtime(config_dir)
    try:
        assert runtime.registry.records["alien"].available
        spec = manual([{"name": "s", "aggregation": {"type": "concat"}, "models": ["alien", DEMO]}], n_ctx=512)
        outcome, _ = run(runtime, spec)
    finally:
        runtime.close()
    assert outcome.run.stages, outcome.run.error
    stage = outcome.run.stages[0]
    alien, good = stage.response("alien"), stage.response(DEMO)
    assert alien is not None and alien.status == "failed" and alien.error is not None
    assert alien.error.type == "InvalidModelFile", alien.error
    assert "architecture" in alien.error.message and alien.error.log_tail
    assert good is not None and good.ok
    assert outcome.run.status == "partial" and stage.status == "partial"
    assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="partial")  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_file_truncated_after_registration_fails_at_start_with_a_typed_error(
        config_dir: ConfigDir, llama_server_bin) -> None:
    runtime = make_runtime(config_dir)
    try:
        assert runtime.registry.records[DEMO].available
        link = config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf"
        link.unlink()  # the download is replaced by a partial one while chorus runs
        sparse_model(link, _head(), demo_model_path().stat().st_size // 2)
        outcome, _ = run(runtime, manual([{"name": "s", "models": [DEMO]}], n_ctx=512))
    finally:
        runtime.close()
    response = outcome.run.stages[0].responses[0]
    assert response.status == "failed" and response.error is not None
    assert response.error.type == "InvalidModelFile", response.error
    assert outcome.run.status == "failed" and outcome.run.error == response.error
    assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="failed")  # type: ignore[arg-type]
