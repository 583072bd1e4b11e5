"""Fault 6: a hung llama-server (SIGSTOP). The request times out with a typed error and the server is replaced."""

from __future__ import annotations

import os
import signal

import pytest

from orchestrator.engine.events import Event
from tests.conftest import ConfigDir
from tests.faults.conftest import (
    add_variants,
    assert_session_valid,
    make_runtime,
    manual,
    process_gone,
    run,
    servers_of,
)

pytestmark = pytest.mark.integration

# SIGTERM is held while a process is stopped; without SIGCONT the stop would wait out this whole
# grace period and then SIGKILL. The run must not wait for it (pytest-timeout below would fire).
GRACE_S = 300


@pytest.mark.timeout(180)
def test_a_stopped_server_times_out_typed_and_is_replaced(config_dir: ConfigDir, llama_server_bin) -> None:
    config_dir.write_app(server={"startup_timeout_s": 120, "request_timeout_s": 4, "idle_timeout_s": 900,
                                 "stop_grace_s": GRACE_S, "memory_budget_mib": None})
    add_variants(config_dir, {"gemma-a": 512, "gemma-b": 640})
    spec = manual([{"name": "panel", "execution": "parallel", "aggregation": {"type": "concat"},
                    "models": [{"model": "gemma-a", "label": "a"},
                               {"model": "gemma-b", "label": "b", "max_tokens": 60}]}])
    runtime = make_runtime(config_dir)
    hung: list[object] = []

    def stop_b_on_its_first_token(event: Event) -> None:
        if event.type == "token" and event.label == "b" and not hung:
            (server,) = servers_of(runtime, "gemma-b")
            hung.append(server)
            os.kill(server.pid, signal.SIGSTOP)

    try:
        outcome, _ = run(runtime, spec, on_event=stop_b_on_its_first_token)
        assert hung, "gemma-b never streamed a token"
        stage = outcome.run.stages[0]
        b, a = stage.response("b"), stage.response("a")
        assert b is not None and b.status == "failed" and b.error is not None
        assert b.error.type == "RequestTimeout", b.error
        assert "request timed out" in b.error.message and "within 4s" in b.error.message
        assert a is not None and a.ok  # the other model of the stage is unaffected
        assert outcome.run.status == "partial" and stage.status == "partial"
        assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="partial")  # type: ignore[arg-type]

        old = hung[0]
        assert old not in runtime.pool.servers()  # discarded from the pool ...
        assert process_gone(old.pid)  # ... and the stopped process is gone, not left behind frozen
        assert old.process.returncode != -signal.SIGKILL  # it got SIGTERM and shut down, no grace wait

        again, _ = run(runtime, spec)
        assert again.run.status == "completed", again.run.error
        assert all(r.ok for r in again.run.stages[0].responses)
        (fresh,) = servers_of(runtime, "gemma-b")
        assert fresh is not old and fresh.is_alive()
    finally:
        for server in hung:  # never leave a frozen process behind, whatever happened
            if server.is_alive():
                os.kill(server.pid, signal.SIGCONT)
        runtime.close()
