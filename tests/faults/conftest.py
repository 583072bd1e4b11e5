"""Helpers for the fault-injection suite: model variants, small pipelines, runs, the CLI, sessions.

Every case that involves a model server uses the real llama-server and the demo model. Model variants
("gemma-a", "gemma-b"...) are the demo file under another name with its own default n_ctx, so each gets
its own server (the pool key is file, n_ctx, layers, slots) and one can be killed or hung alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.events import Event
from orchestrator.history.store import SessionStore
from orchestrator.runs import Runner, RunOutcome
from orchestrator.runtime import Runtime
from tests import yamlfile
from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir

DEMO = "gemma3-270m"


def add_variants(config_dir: ConfigDir, n_ctx: dict[str, int]) -> None:
    """Add models named after `n_ctx`'s keys: the demo file, each with its own default n_ctx (own server)."""
    models = config_dir.models()
    base = models["models"][DEMO]
    for name, ctx in n_ctx.items():
        models["models"][name] = {**base, "default_n_ctx": ctx, "description": f"demo model as {name}"}
    config_dir.write_models(models)


def manual(stages: list[dict[str, Any]], **defaults: Any) -> PipelineSpec:
    """A manual pipeline with tiny answers. No n_ctx default: each model keeps its own (its own server)."""
    return PipelineSpec.model_validate({"name": "fault", "defaults": {"max_tokens": 6, "seed": 1, **defaults},
                                        "stages": stages})


def answered(name: str, model: str = DEMO, **stage: Any) -> dict[str, Any]:
    """A stage whose output is never empty: two labelled calls merged by concat (a base model's few tokens
    may be only whitespace, and an empty answer is not what these tests are about)."""
    return {"name": name, "models": [{"model": model, "label": "a"}, {"model": model, "label": "b"}],
            "aggregation": {"type": "concat"}, **stage}


def make_runtime(config_dir: ConfigDir, **kwargs: Any) -> Runtime:
    return Runtime(load_config(config_dir.path), **kwargs)


def run(runtime: Runtime, pipeline: PipelineSpec, question: str = "The capital of France is",
        **kwargs: Any) -> tuple[RunOutcome, list[Event]]:
    events: list[Event] = []
    user_hook = kwargs.pop("on_event", None)

    def on_event(event: Event) -> None:
        events.append(event)
        if user_hook is not None:
            user_hook(event)

    outcome = Runner(runtime).run(pipeline, question, observers=[on_event], **kwargs)
    return outcome, events


def chorus(config_dir: ConfigDir, *args: str, timeout: int = 300, **popen: Any) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS --config-dir DIR` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL,
                          **popen)


def chorus_main(config_dir: ConfigDir, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS --config-dir DIR`, its main() in this process (tests/clirun.py): for what the command says
    and how it exits, where being a process of its own is not what the test is about."""
    return run_main(*args, "--config-dir", str(config_dir.path), input=input)


def assert_clean_failure(proc: subprocess.CompletedProcess[str]) -> None:
    """The CLI failed the way a user should see it: an exit status, a message, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def assert_session_valid(sessions_dir: Path, session_id: str, *, status: str = "completed") -> dict[str, Any]:
    """The session on disk is complete: it loads, every stage has its step file, the status is final."""
    store = SessionStore(sessions_dir)
    session = store.load(session_id)
    assert session.meta["status"] == status, session.meta
    assert session.meta["finished_at"] is not None
    assert [s.name for s in session.stages] == session.meta["stages"]
    for stage in session.stages:
        assert (session.dir / f"step{stage.index}.json").is_file()
        if len(stage.responses) > 1:
            for r in stage.responses:
                data = json.loads((session.dir / f"step{stage.index}_{r.label}.json").read_text())
                assert data["status"] == r.status
    if status == "completed":
        assert session.final is not None  # final.txt was written
    assert not list(session.dir.glob(".*.tmp")), "a half-written file was left behind"
    return session.to_dict()


def servers_of(runtime: Runtime, model: str) -> list[Any]:
    return [s for s in runtime.pool.servers() if s.model == model]


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def remote_config(tmp_path: Path) -> Path:
    """A config with one remote model (no GGUF, no llama-server) and a one-stage pipeline on it."""
    root = tmp_path / "config"
    root.mkdir()
    (root / "app.yaml").write_text(yamlfile.dump({"models_dir": str(tmp_path / "models"),
                                                   "sessions_dir": str(tmp_path / "sessions"),
                                                   "logs_dir": str(tmp_path / "logs")}))
    (root / "models.yaml").write_text(yamlfile.dump({"models": {"alpha": {"url": "http://upstream.test/v1"}}}))
    (root / "pipeline.yaml").write_text(yamlfile.dump({"name": "base", "stages": [
        {"name": "answer", "models": ["alpha"]}]}))
    return root


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end whatever happened, so a failing test leaves nothing behind either."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture
def wrapper(llama_server_bin: Path, tmp_path: Path) -> Path:
    """A `llama_server:` wrapper that does not `exec`: the real server is its child, in its process group."""
    script = tmp_path / "llama-server-wrapper.sh"
    script.write_text(f'#!/bin/sh\n"{llama_server_bin}" "$@"\necho "wrapper: server exited with $?"\n')
    script.chmod(0o755)
    return script
