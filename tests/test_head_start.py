"""The first stage's server gets a head start: it loads while the run is recorded, decided by the scheduler
from the state before the start, and the engine's first wave finds it warm (real llama-server, real budget)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.memory.fit import footprint
from launcher.process.server import ModelServer
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.events import Event, Notice
from orchestrator.engine.fake import FakeBackend
from orchestrator.history.store import SessionStore
from orchestrator.records import StageRecord
from orchestrator.runs import Runner
from orchestrator.runtime import Runtime
from tests.conftest import ConfigDir

MiB = 2**20
SMOL = "smollm2-135m"


def pipeline(stages: list[dict[str, Any]], n_ctx: int = 1024) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "head", "defaults": {"max_tokens": 6, "seed": 1, "n_ctx": n_ctx,
                                                                     "temperature": 0}, "stages": stages})


def three_of(model: str, name: str = "first") -> dict[str, Any]:
    return {"name": name, "models": [{"model": model, "label": f"{model}-{i}"} for i in range(3)],
            "aggregation": {"type": "concat"}}


def record_order(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """When each llama-server process was spawned and when each session was created, in order."""
    seen: list[tuple[str, float]] = []
    spawn, create = ModelServer._spawn, SessionStore.create

    def spawned(self: ModelServer, port: int) -> None:
        spawn(self, port)
        seen.append(("spawn", time.monotonic()))

    def created(self: SessionStore, snapshot: dict[str, Any]) -> Any:
        seen.append(("session", time.monotonic()))
        return create(self, snapshot)

    monkeypatch.setattr(ModelServer, "_spawn", spawned)
    monkeypatch.setattr(SessionStore, "create", created)
    return seen


def test_a_run_tells_its_backend_the_stages_it_will_run_before_anything_is_recorded(config_dir: ConfigDir) -> None:
    runtime = Runtime(load_config(config_dir.path))
    spec = pipeline([three_of(SMOL, "one"), three_of(SMOL, "two"), three_of(SMOL, "three")])
    backend = FakeBackend()
    prior = [StageRecord(index=1, name="one", output="done", status="ok")]
    first = asyncio.run(Runner(runtime).arun(spec, "q", backend=backend))
    rerun = asyncio.run(Runner(runtime).arun(spec, "q", backend=backend, prior_stages=prior))
    assert first.run.status == rerun.run.status == "completed"
    assert backend.prepared == [["one", "two", "three"], ["two", "three"]]


@pytest.mark.integration
def test_the_first_stages_server_is_spawned_before_the_session_is_written(
        config_dir: ConfigDir, llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_order(monkeypatch)
    runtime = Runtime(load_config(config_dir.path))
    try:
        outcome = Runner(runtime).run(pipeline([three_of(SMOL), three_of(SMOL, "second")]), "Why is the sky blue?")
        assert outcome.run.status == "completed" and outcome.session_id, outcome.run.error
        assert [what for what, _ in seen] == ["spawn", "session"]  # one start, and it came first
        assert runtime.pool.starts == 1
        again = Runner(runtime).run(pipeline([three_of(SMOL)]), "Why is the sky blue?")
        assert again.run.status == "completed" and runtime.pool.starts == 1  # warm: no head start needed
    finally:
        runtime.close()


@pytest.mark.integration
@pytest.mark.serial  # a budget from the live machine's figures: no other test's servers beside
def test_a_first_stage_that_fills_the_budget_runs_in_one_wave_on_the_server_it_started_early(
        config_dir: ConfigDir, llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head start's server is pending while the rest of the run is set up: had the preflight or the
    first wave counted it beside a new one, a budget that holds one 3-slot server would split the stage."""
    n_ctx = 4096
    probe = Runtime(load_config(config_dir.path))
    one = footprint(probe.memory_guard.need(probe.server_spec(SMOL, n_ctx=n_ctx, slots=3))) / MiB
    app = load_config(config_dir.path).app
    config_dir.write_app(server={**app.server.model_dump(mode="json"), "memory_budget_mib": int(one * 1.5)})
    seen = record_order(monkeypatch)
    events: list[Event] = []
    runtime = Runtime(load_config(config_dir.path))
    try:
        outcome = Runner(runtime).run(pipeline([three_of(SMOL)], n_ctx=n_ctx), "Why is the sky blue?",
                                      observers=[events.append])
    finally:
        runtime.close()
    assert outcome.run.status == "completed", outcome.run.error
    assert [what for what, _ in seen] == ["spawn", "session"]
    [stage] = outcome.run.stages
    assert stage.waves == [[f"{SMOL}-{i}" for i in range(3)]]  # one wave of three, on one 3-slot server
    assert all(r.status == "ok" for r in stage.responses), [r.error for r in stage.responses]
    assert not [e for e in events if isinstance(e, Notice)]  # no "runs in waves"
    assert runtime.pool.starts == 1
    session = json.loads((Path(str(outcome.session_dir)) / "step1.json").read_text())
    assert session["waves"] == stage.waves


@pytest.mark.integration
def test_a_head_start_that_fails_is_the_error_of_its_calls_without_a_start_per_call(
        config_dir: ConfigDir, llama_server_bin: Path) -> None:
    models = config_dir.models()
    models["models"][SMOL] = {**models["models"][SMOL], "extra_args": ["--no-such-flag"]}
    config_dir.write_models(models)
    runtime = Runtime(load_config(config_dir.path))
    try:
        outcome = Runner(runtime).run(pipeline([three_of(SMOL)]), "Why is the sky blue?")
    finally:
        runtime.close()
    assert outcome.run.status == "failed"
    errors = {r.error.type for r in outcome.run.stages[0].responses if r.error is not None}
    assert errors and all("Start" in e or "Server" in e for e in errors), errors
    assert runtime.pool.starts == 1  # before: one start per call (3)


class BrokenHeadStart(FakeBackend):
    async def prepare(self, stages: Any) -> None:
        raise RuntimeError("a bug in the head start")


def test_a_head_start_that_raises_costs_the_run_nothing(config_dir: ConfigDir) -> None:
    runtime = Runtime(load_config(config_dir.path))
    outcome = asyncio.run(Runner(runtime).arun(pipeline([three_of(SMOL)]), "q", backend=BrokenHeadStart()))
    assert outcome.run.status == "completed" and outcome.session_id is not None
