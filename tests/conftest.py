"""Shared fixtures: the two demo models, and throwaway config dirs built from the shipped ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"          # gemma3-270m: a base model, completion mode
SECOND_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # smollm2-135m: an instruct model, chat mode


def demo_model_path() -> Path:
    return Path(os.environ.get("CHORUS_DEMO_MODEL", REPO / "models" / DEMO_MODEL_NAME))


def second_model_path() -> Path:
    return Path(os.environ.get("CHORUS_SECOND_MODEL", REPO / "models" / SECOND_MODEL_NAME))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = demo_model_path()
    if not path.is_file():
        pytest.skip(f"demo model not found at {path}: run scripts/setup.sh")
    return path


@pytest.fixture(scope="session")
def second_model() -> Path:
    """SmolLM2-135M-Instruct (scripts/fetch_smollm2.py): the base pipeline's chat-mode model."""
    path = second_model_path()
    if not path.is_file():
        pytest.skip(f"second demo model not found at {path}: run scripts/setup.sh")
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("CHORUS_CONFIG_DIR", "CHORUS_MODELS_DIR", "CHORUS_SESSIONS_DIR", "CHORUS_HOME"):
        monkeypatch.delenv(var, raising=False)
    # the cross-process admission ledger of this test only (the real one is shared by the whole machine)
    monkeypatch.setenv("CHORUS_ADMISSION_LEDGER", str(tmp_path / "admission.json"))


class ConfigDir:
    """A copy of the shipped config in tmp, with models_dir pointing at a folder we control."""

    def __init__(self, root: Path, models_dir: Path) -> None:
        self.path = root / "config"
        shutil.copytree(REPO / "config", self.path)
        self.models_dir = models_dir
        self.sessions_dir = root / "sessions"
        self.write_app(models_dir=str(models_dir), sessions_dir=str(self.sessions_dir),
                       logs_dir=str(root / "logs"))

    def write_app(self, **values: object) -> None:
        app = yaml.safe_load((self.path / "app.yaml").read_text()) or {}
        app.update(values)
        (self.path / "app.yaml").write_text(yaml.safe_dump(app))

    def models(self) -> dict:
        return yaml.safe_load((self.path / "models.yaml").read_text())

    def write_models(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else yaml.safe_dump(data)
        (self.path / "models.yaml").write_text(text)

    def pipeline(self) -> dict:
        return yaml.safe_load((self.path / "pipeline.yaml").read_text())

    def write_pipeline(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        (self.path / "pipeline.yaml").write_text(text)


@pytest.fixture
def config_dir(tmp_path: Path, demo_model: Path, second_model: Path) -> ConfigDir:
    """Shipped config whose models_dir holds (links to) both demo models: the base pipeline uses both."""
    models = tmp_path / "models"
    models.mkdir()
    (models / DEMO_MODEL_NAME).symlink_to(demo_model)
    (models / SECOND_MODEL_NAME).symlink_to(second_model)
    return ConfigDir(tmp_path, models)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server. Missing in CI is a failure (setup builds it); locally a skip."""
    from launcher.errors import BinaryNotFound
    from launcher.process.binary import find_llama_server

    try:
        return find_llama_server()
    except BinaryNotFound as exc:
        if os.environ.get("CI"):
            pytest.fail(f"llama-server is required in CI: {exc}")
        pytest.skip(f"llama-server not built: {exc}")


@pytest.fixture
def runtime(config_dir: ConfigDir, llama_server_bin: Path):
    """A Runtime on the shipped config (demo model), its servers stopped at the end."""
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime

    rt = Runtime(load_config(config_dir.path))
    yield rt
    rt.close()


def small_pipeline(**overrides: object):
    """The shipped base pipeline with short answers, for fast integration tests."""
    from orchestrator.config.overrides import apply_overrides
    from orchestrator.config.schema import load_pipeline

    spec = load_pipeline(REPO / "config" / "pipeline.yaml")
    sets = [f"defaults.{k}={v}" for k, v in {"max_tokens": 12, "n_ctx": 1024, "seed": 7, **overrides}.items()]
    return apply_overrides(spec, sets)


def engine_run(runtime, spec, question: str = "Why is the sky blue?", *, mode: str = "manual",
               allow_sequential=True, observers=(), **kwargs):
    """Run `spec` on the real backend without history: (record, events)."""
    import asyncio

    from orchestrator.engine.local import LocalBackend
    from orchestrator.engine.run import Engine

    events: list = []

    async def go():
        async with LocalBackend(runtime) as backend:
            engine = Engine(backend, observers=[events.append, *observers], allow_sequential=allow_sequential)
            return await engine.run(runtime.plan(spec, mode), question, **kwargs)

    return asyncio.run(go()), events
