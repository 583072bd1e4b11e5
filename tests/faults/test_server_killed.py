"""Fault 1: kill -9 one model's llama-server in the middle of a parallel stage."""

from __future__ import annotations

import os
import signal

import pytest

from orchestrator.engine.events import Event
from orchestrator.runs import Runner
from tests.conftest import ConfigDir
from tests.faults.conftest import (
    add_variants,
    answered,
    assert_session_valid,
    make_runtime,
    manual,
    process_gone,
    run,
    servers_of,
)

pytestmark = pytest.mark.integration


def test_kill_9_mid_generation_fails_only_that_model_and_the_rerun_works(config_dir: ConfigDir,
                                                                          llama_server_bin) -> None:
    add_variants(config_dir, {"gemma-a": 512, "gemma-b": 640})  # one server each
    spec = manual([
        {"name": "panel", "execution": "parallel", "aggregation": {"type": "concat"},
         "models": [{"model": "gemma-a", "label": "a"},
                    {"model": "gemma-b", "label": "b", "max_tokens": 60}]},  # killed while generating
        answered("after", "gemma-a", prompt="{{ previous }}"),
    ])
    runtime = make_runtime(config_dir)
    killed: list[int] = []

    def kill_b_on_its_first_token(event: Event) -> None:
        if event.type == "token" and event.stage == "panel" and event.label == "b" and not killed:
            (server,) = servers_of(runtime, "gemma-b")
            killed.append(server.pid)
            os.kill(server.pid, signal.SIGKILL)

    try:
        outcome, events = run(runtime, spec, on_event=kill_b_on_its_first_token)
        assert killed, "gemma-b never streamed a token"
        run_rec = outcome.run
        assert run_rec.status == "partial", run_rec.error  # a call failed: the run says so
        panel = run_rec.stages[0]
        assert panel.status == "partial"
        a, b = panel.response("a"), panel.response("b")
        assert a is not None and a.ok and a.text
        assert b is not None and b.status == "failed"
        assert b.error is not None and b.error.type == "ServerCrashed" and b.error.message
        assert panel.output.strip() == a.text.strip()  # the merge used the surviving model only
        assert run_rec.stages[1].status == "ok" and run_rec.final
        finished = {e.label: e.response.status for e in events
                    if e.type == "model_finished" and e.stage == "panel"}
        assert finished["b"] == "failed" and finished["a"] == "ok"
        assert outcome.history_error is None

        saved = assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="partial")  # type: ignore[arg-type]
        saved_b = next(r for r in saved["steps"][0]["responses"] if r["label"] == "b")
        assert saved_b["status"] == "failed" and saved_b["error"]["type"] == "ServerCrashed"
        assert saved["steps"][0]["status"] == "partial"
        assert process_gone(killed[0])

        again = Runner(runtime).rerun(outcome.session_id, 1)  # type: ignore[arg-type]
        assert again.run.status == "completed", again.run.error
        assert again.run.stages[0].status == "ok"
        assert all(r.ok and r.text for r in again.run.stages[0].responses)
        (fresh,) = servers_of(runtime, "gemma-b")
        assert fresh.is_alive() and fresh.pid != killed[0]  # the dead server was replaced on next use
        child = assert_session_valid(config_dir.sessions_dir, again.session_id)  # type: ignore[arg-type]
        assert child["parent_session"] == outcome.session_id and child["rerun_from_stage"] == 1
    finally:
        runtime.close()

