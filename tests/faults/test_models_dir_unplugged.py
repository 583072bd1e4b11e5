"""Fault 4: the models directory disappears mid-session (a removable disk unplugged), then comes back.

Simulated by renaming the tmp models dir. llama-server maps the model file, so a running server keeps
serving; a new server cannot start and says why; the registry marks the models missing with one
warning; once the directory is back, everything works again.
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import ConfigDir, engine_run
from tests.faults.conftest import DEMO, assert_clean_failure, assert_session_valid, chorus, make_runtime, manual, run

pytestmark = pytest.mark.integration


def test_unplugged_models_dir_keeps_warm_servers_and_recovers_when_back(config_dir: ConfigDir, llama_server_bin,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    small = manual([{"name": "s", "models": [DEMO]}], n_ctx=512)
    other_ctx = manual([{"name": "s", "models": [DEMO]}], n_ctx=640)  # needs a server of its own
    models_dir = config_dir.models_dir
    unplugged = models_dir.with_name("models.unplugged")
    runtime = make_runtime(config_dir)
    try:
        first, _ = run(runtime, small)
        assert first.run.status == "completed"
        (warm,) = runtime.pool.servers()

        models_dir.rename(unplugged)  # the disk is gone
        try:
            served, _ = run(runtime, small)  # the warm server still has the model mapped
            assert served.run.status == "completed", served.run.error
            assert runtime.pool.servers() == [warm] and warm.is_alive() and runtime.pool.starts == 1

            cold, _ = run(runtime, other_ctx)  # a new server cannot load a file that is not there
            response = cold.run.stages[0].responses[0]
            assert cold.run.status == "failed" and response.error is not None
            assert response.error.type == "ServerStartError" and "model file not found" in response.error.message
            assert str(models_dir) in response.error.message and "unplugged" in (response.error.hint or "")
            assert warm.is_alive()

            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="chorus.registry"):
                runtime.registry.refresh()
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "not there" in warnings[0] and str(models_dir) in warnings[0]
            rec = runtime.registry.records[DEMO]
            assert rec.status == "missing" and "models directory" in (rec.reason or "")

            blocked, _ = run(runtime, small, mode="base")
            assert blocked.run.status == "failed" and blocked.run.error is not None
            assert blocked.run.error.type == "PipelineBlocked" and "models directory" in blocked.run.error.message
            assert_session_valid(config_dir.sessions_dir, blocked.session_id, status="failed")  # type: ignore[arg-type]
            unavailable, _ = engine_run(runtime, small, "q")
            assert unavailable.status == "failed" and unavailable.error is not None
            assert unavailable.error.type == "ModelUnavailable"
            assert warm.is_alive()  # nothing stopped the running server

            cli = chorus(config_dir, "run", "hello")  # the user sees one clear error, no traceback
            assert_clean_failure(cli)
            assert "models directory" in cli.stderr and "not found" in cli.stderr
        finally:
            if unplugged.exists():
                unplugged.rename(models_dir)  # plugged back in

        runtime.registry.refresh()
        assert runtime.registry.records[DEMO].available
        back, _ = run(runtime, other_ctx)
        assert back.run.status == "completed", back.run.error
        again, _ = run(runtime, small)
        assert again.run.status == "completed" and warm.is_alive()
        assert_session_valid(config_dir.sessions_dir, back.session_id)  # type: ignore[arg-type]
    finally:
        runtime.close()
