"""Fault 7: llama-server cannot start: the port is taken, the binary is missing, not executable, or not a program.

The user sees one clear error with what to do, never a traceback; a run records the typed error and
its session stays valid.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import main as cli  # the module
from launcher.process import server as server_mod
from tests.conftest import ConfigDir
from tests.faults.conftest import (
    DEMO,
    assert_clean_failure,
    assert_session_valid,
    chorus,
    chorus_main,
    make_runtime,
    manual,
    run,
)

SMALL = ["--set", "defaults.max_tokens=4", "--set", "defaults.n_ctx=512"]


def _sessions(config_dir: ConfigDir) -> list[Path]:
    return sorted(config_dir.sessions_dir.glob("session_*")) if config_dir.sessions_dir.exists() else []


def test_missing_binary_is_one_clear_error_with_the_build_command(config_dir: ConfigDir, tmp_path: Path) -> None:
    config_dir.write_app(llama_server=str(tmp_path / "nowhere" / "llama-server"))
    out = chorus_main(config_dir, "run", "hello", *SMALL)
    assert_clean_failure(out)
    assert out.returncode == 2
    message = " ".join(out.stderr.split())  # the paragraph is wrapped at 100 columns, where a long path falls
    assert message.count("does not exist") == 1, out.stderr
    assert "scripts/build_llama_server.sh" in message
    assert _sessions(config_dir) == []  # nothing could run, so no failed session is left behind

    runtime = make_runtime(config_dir)  # the UI's path: the run fails, typed, and is saved
    try:
        outcome, _ = run(runtime, manual([{"name": "s", "models": [DEMO]}], n_ctx=512))
    finally:
        runtime.close()
    assert outcome.run.status == "failed" and outcome.run.error is not None
    assert outcome.run.error.type == "BinaryNotFound" and "build_llama_server" in (outcome.run.error.hint or "")
    assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="failed")  # type: ignore[arg-type]


def test_binary_that_is_not_executable_is_one_clear_error(config_dir: ConfigDir, tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\nexec true\n")
    binary.chmod(0o644)
    config_dir.write_app(llama_server=str(binary))
    out = chorus_main(config_dir, "run", "hello", *SMALL)
    assert_clean_failure(out)
    message = " ".join(out.stderr.split())  # wrapped at 100 columns, where a long path falls
    assert out.returncode == 2 and message.count("is not executable") == 1, out.stderr
    assert "scripts/build_llama_server.sh" in message


def test_binary_that_is_not_a_program_fails_the_run_with_a_typed_start_error(config_dir: ConfigDir,
                                                                           tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"\x7fELF but not really" + bytes(64))
    binary.chmod(0o755)
    config_dir.write_app(llama_server=str(binary))
    out = chorus(config_dir, "run", "hello", *SMALL)
    assert_clean_failure(out)
    assert "status: failed" in out.stderr and "cannot run" in out.stderr and "Exec format error" in out.stderr
    assert "build_llama_server.sh" in out.stderr  # the hint reaches the user
    session = _sessions(config_dir)[-1].name
    saved = assert_session_valid(config_dir.sessions_dir, session, status="failed")
    assert saved["error"]["type"] == "ServerStartError"


@pytest.fixture
def taken_port() -> Iterator[int]:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        yield blocker.getsockname()[1]
    finally:
        blocker.close()


@pytest.mark.integration
def test_port_taken_between_probe_and_bind_is_retried_and_the_run_completes(
        config_dir: ConfigDir, llama_server_bin, taken_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = iter([taken_port])
    real = server_mod.free_port
    monkeypatch.setattr(server_mod, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
    runtime = make_runtime(config_dir)
    try:
        outcome, _ = run(runtime, manual([{"name": "s", "models": [DEMO]}], n_ctx=512))
        (server,) = runtime.pool.servers()
    finally:
        runtime.close()
    assert outcome.run.status == "completed", outcome.run.error
    assert server.port != taken_port
    assert "bind" in next(config_dir.path.parent.glob(f"logs/*-{taken_port}.log")).read_text().lower()


@pytest.mark.integration
def test_port_always_taken_is_a_typed_port_error_for_the_user(
        config_dir: ConfigDir, llama_server_bin, taken_port: int, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(server_mod, "free_port", lambda host="127.0.0.1": taken_port)
    monkeypatch.setattr("cli.run.install_signal_cleanup", lambda: None)  # keep pytest's handlers
    spec = config_dir.path.parent / "manual.yaml"
    spec.write_text(f"stages:\n  - {{name: s, models: [{DEMO}], max_tokens: 4, n_ctx: 512}}\n")
    code = cli.main(["run", "hello", "--manual", str(spec), "--config-dir", str(config_dir.path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "port in use" in err and "status: failed" in err
    session = _sessions(config_dir)[-1].name
    saved = assert_session_valid(config_dir.sessions_dir, session, status="failed")
    assert saved["error"]["type"] == "PortInUse" and saved["error"]["log_tail"]
