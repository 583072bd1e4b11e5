"""Fault 2: out of memory at load.

A small machine is simulated in the fit check (a FixedProbe, or app.yaml's memory_budget_mib from the
CLI): the start is refused before any process runs, with what is needed and what is free. A real
llama-server under a tight address-space limit dies while loading: its typed ServerOutOfMemory reaches
the run and the user. Nothing crashes.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from launcher.memory.calibration import CalibrationCache
from launcher.memory.probes import FixedProbe
from launcher.process.server import HTTP_THREADS, ModelServer, ServerOptions, ServerSpec
from tests.conftest import ConfigDir
from tests.faults.conftest import (
    DEMO,
    assert_clean_failure,
    assert_session_valid,
    chorus,
    make_runtime,
    manual,
    run,
    servers_of,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
ONE_MODEL = manual([{"name": "s", "models": [DEMO]}], n_ctx=512)
SMALL = ["--set", "defaults.max_tokens=4", "--set", "defaults.n_ctx=512"]


def test_fit_check_on_a_small_machine_refuses_before_the_start_with_need_and_have(
        config_dir: ConfigDir, llama_server_bin, tmp_path: Path) -> None:
    small_machine = FixedProbe(ram_total_bytes=1024 * MiB, ram_available_bytes=800 * MiB)  # 10% + 512 MiB kept free
    runtime = make_runtime(config_dir, probe=small_machine, calibration=CalibrationCache(tmp_path / "calibration"))
    try:
        outcome, events = run(runtime, ONE_MODEL)
        assert runtime.pool.starts == 0 and runtime.pool.servers() == []  # refused before any process ran
    finally:
        runtime.close()
    error = outcome.run.error
    assert outcome.run.status == "failed" and error is not None
    assert error.type == "RunRefused", error  # the whole run is planned first: refused before stage 1
    assert "does not fit in memory" in error.message and "ram: needs" in error.message
    assert "usable" in error.message and error.hint
    assert error.extra["reasons"]["s"].startswith(f"{DEMO} does not fit even alone")
    assert outcome.run.stages == [] and not any(e.type == "model_started" for e in events)
    assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="failed")  # type: ignore[arg-type]


def test_memory_budget_refusal_reaches_the_cli_user_without_a_traceback(config_dir: ConfigDir,
                                                                        llama_server_bin) -> None:
    config_dir.write_app(server={"startup_timeout_s": 120, "request_timeout_s": 600, "idle_timeout_s": 900,
                                 "stop_grace_s": 5, "memory_budget_mib": 16})
    out = chorus(config_dir, "run", "hello", *SMALL)
    assert_clean_failure(out)
    assert "status: failed" in out.stderr and "does not fit in memory" in out.stderr
    assert "budget: needs" in out.stderr and "16 MiB usable" in out.stderr, out.stderr
    assert not [p for p in (config_dir.path.parent / "logs").glob("*.log") if p.name != "chorus.log"]  # no server


@pytest.fixture
def limited_binary(llama_server_bin: Path, tmp_path: Path) -> Path:
    """The real llama-server, started under a 300 MiB address-space limit (too little to load the model)."""
    wrapper = tmp_path / "llama-server-300m"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        ulimit -v {300 * 1024}
        exec {llama_server_bin} "$@"
    """))
    wrapper.chmod(0o755)
    return wrapper


def test_server_dying_of_oom_at_load_is_a_typed_error_for_the_run_and_the_user(
        config_dir: ConfigDir, limited_binary: Path) -> None:
    config_dir.write_app(llama_server=str(limited_binary))
    runtime = make_runtime(config_dir)
    try:
        outcome, _ = run(runtime, ONE_MODEL)
        assert servers_of(runtime, DEMO) == []
    finally:
        runtime.close()
    error = outcome.run.stages[0].responses[0].error
    assert error is not None and error.type == "ServerOutOfMemory", error
    assert "out of memory" in error.message and error.log_tail and error.extra["command"]
    assert outcome.run.status == "failed"
    assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="failed")  # type: ignore[arg-type]

    out = chorus(config_dir, "run", "hello", *SMALL)
    assert_clean_failure(out)
    assert out.returncode == 1 and "out of memory" in out.stderr and "status: failed" in out.stderr


def test_a_limit_that_refuses_the_http_threads_gets_a_server_with_llama_servers_own_count(
        llama_server_bin: Path, demo_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """900 MiB of address space: enough for the model and llama-server's default threads, not for the 128
    HTTP threads' stacks (1 GiB), whose start aborts ("Resource temporarily unavailable"). A limit chorus
    cannot see (set in a wrapper); the server is started again with the default count and serves."""
    wrapper = tmp_path / "llama-server-900m"
    wrapper.write_text(f"#!/bin/sh\nulimit -v {900 * 1024}\nexec {llama_server_bin} \"$@\"\n")
    wrapper.chmod(0o755)
    server = ModelServer(ServerSpec(DEMO, demo_model, n_ctx=512), wrapper, tmp_path / "logs",
                         ServerOptions(startup_timeout_s=60))
    with caplog.at_level("WARNING", logger="chorus.server"):
        server.start()
    try:
        assert server.is_alive() and "--threads-http" not in server.command(server.port or 0)
        assert f"could not create {HTTP_THREADS} HTTP threads" in caplog.text
        assert "Resource temporarily unavailable" in caplog.text
    finally:
        server.stop()
