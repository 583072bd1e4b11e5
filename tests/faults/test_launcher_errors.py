"""Launcher errors keep the one-paragraph promise: what went wrong, where, and what to do.

Attacks: a logs dir that cannot be created or written (was a raw OSError, or "cannot run llama-server …
rebuild it"); `chorus serve --n-ctx -1` (reached llama-server) and `--slots 0/-3` (silently 1); a server
killed mid-answer (was only "connection lost", with no exit status or log).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.errors import InvalidServerSpec, ServerCrashed, ServerFilesUnwritable
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from launcher.process.server import ModelServer, ServerOptions, ServerSpec
from tests.conftest import ConfigDir
from tests.faults.conftest import DEMO, assert_clean_failure, chorus, chorus_main

pytestmark = pytest.mark.integration


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into: chmod 0500, or for root (who ignores modes) a read-only tmpfs."""
    path = tmp_path / "ro-logs"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if shutil.which("mount") is None:
        pytest.skip("root needs a read-only mount for this, and there is no mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------- logs dir

def test_logs_dir_under_a_file_is_one_error_naming_it(llama_server_bin: Path, demo_model: Path,
                                                      tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ServerFilesUnwritable) as err:
        ModelServer(ServerSpec("m", demo_model, n_ctx=512), llama_server_bin, blocker / "logs").start()
    assert err.value.path == str(blocker / "logs") and "Not a directory" in err.value.message
    assert "logs_dir" in (err.value.hint or "") and "rebuild" not in str(err.value)


def test_read_only_logs_dir_is_not_reported_as_a_broken_binary(llama_server_bin: Path, demo_model: Path,
                                                               read_only_dir: Path) -> None:
    server = ModelServer(ServerSpec("m", demo_model, n_ctx=512), llama_server_bin, read_only_dir)
    with pytest.raises(ServerFilesUnwritable) as err:
        server.start()
    assert str(read_only_dir) in err.value.path and "Read-only file system" in err.value.message
    assert "cannot run" not in str(err.value) and "rebuild" not in str(err.value)
    assert server.process is None  # nothing was started


def test_chorus_run_with_an_unwritable_logs_dir_says_which_dir_and_what_to_do(config_dir: ConfigDir,
                                                                              tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config_dir.write_app(logs_dir=str(blocker / "logs"))
    out = chorus(config_dir, "run", "hello", "--set", "defaults.max_tokens=4", "--set", "defaults.n_ctx=512")
    assert_clean_failure(out)
    text = " ".join(out.stderr.split())
    assert "cannot write the server's files" in text and str(blocker / "logs") in text
    assert "logs_dir" in text and "rebuild" not in text


# ---------------------------------------------------------------- serve arguments and ServerSpec

@pytest.mark.parametrize(("args", "complaint"), [
    (["--n-ctx", "-1"], "argument --n-ctx: must be at least 64, got -1"),
    (["--n-ctx", "0"], "argument --n-ctx: must be at least 64, got 0"),
    (["--slots", "0"], "argument --slots: must be at least 1, got 0"),
    (["--slots", "-3"], "argument --slots: must be at least 1, got -3"),
    (["--n-gpu-layers", "-2"], "argument --n-gpu-layers: must be at least -1, got -2"),
])
def test_chorus_serve_refuses_out_of_range_settings_before_starting_anything(
        config_dir: ConfigDir, args: list[str], complaint: str) -> None:
    out = chorus_main(config_dir, "serve", DEMO, *args)  # refused by its arguments: no process needed
    assert_clean_failure(out)
    assert out.returncode == 2 and complaint in out.stderr
    assert not (config_dir.path.parent / "logs").exists()  # no server was started, so no log either


@pytest.mark.parametrize(("field", "value", "minimum"), [
    ("n_ctx", -1, 64), ("n_ctx", 0, 64), ("slots", 0, 1), ("slots", -3, 1), ("n_gpu_layers", -2, -1),
    ("threads", 0, 1),
])
def test_server_spec_refuses_out_of_range_values_with_the_field(field: str, value: int, minimum: int) -> None:
    with pytest.raises(InvalidServerSpec) as err:
        ServerSpec("m", Path("m.gguf"), **{field: value})  # type: ignore[arg-type]
    assert (err.value.field, err.value.value, err.value.minimum) == (field, value, minimum)
    assert f"{field} must be at least {minimum}, got {value}" in str(err.value)


# ---------------------------------------------------------------- server killed mid-answer

def test_server_killed_mid_answer_reports_its_signal_and_log_tail(llama_server_bin: Path, demo_model: Path,
                                                                  tmp_path: Path) -> None:
    server = ModelServer(ServerSpec("m", demo_model, n_ctx=512), llama_server_bin, tmp_path,
                         ServerOptions(startup_timeout_s=60)).start()
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)

    def kill_on_first_token(_piece: str) -> None:
        if server.is_alive():
            os.kill(server.pid or 0, signal.SIGKILL)

    async def go() -> None:
        async with GenerationClient(timeout_s=60) as client:
            await client.generate(ep, GenerationRequest("Count: 1, 2, 3,", max_tokens=400), kill_on_first_token)

    try:
        with pytest.raises(ServerCrashed) as err:
            asyncio.run(go())
    finally:
        server.stop()
    exc = err.value
    assert "lost" in exc.detail and "killed by SIGKILL" in exc.detail and "exit status -9" in exc.detail
    assert exc.exit_code == -signal.SIGKILL
    assert exc.log_tail and exc.log_tail.splitlines()[-1] in server.log_tail()
    assert exc.log_path == str(server.log_path) and str(server.log_path) in (exc.hint or "")
    record = exc.to_dict()
    assert record["exit_code"] == -9 and record["log_tail"] == exc.log_tail
