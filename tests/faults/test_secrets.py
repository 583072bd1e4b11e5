"""Secrets and privacy: the server's API key never reaches argv, and every file the launcher writes is owner-only.

Attack: any local user runs `ps` (or reads /proc/<pid>/cmdline) and gets the key of every llama-server, then
completions from it; or reads the logs and `running/` records of another user's servers.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from launcher.errors import InvalidModelFile, ServerStartError
from launcher.process.server import ModelServer, ServerOptions, ServerSpec

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dead_pid() -> int:
    """The pid of a process that has exited (a chorus killed with -9, as far as its key file knows)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def test_api_key_is_not_in_argv_its_file_is_private_and_gone_after_stop(llama_server_bin: Path, demo_model: Path,
                                                                         tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "runtime").mkdir(parents=True)
    (logs / "runtime").chmod(0o755)  # left loose by an older chorus: tightened before a key goes in
    options = ServerOptions(startup_timeout_s=60, state_dir=logs / "running")
    server = ModelServer(ServerSpec("m", demo_model, n_ctx=512), llama_server_bin, logs, options).start()
    try:
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert server.api_key.encode() not in b" ".join(argv)
        assert b"--api-key" not in argv
        key_file = Path(argv[argv.index(b"--api-key-file") + 1].decode())
        assert key_file == server.key_path and key_file.read_text().strip() == server.api_key
        assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
        assert server.log_path is not None and mode(server.log_path) == 0o600
        (record,) = (logs / "running").glob("server-*.json")
        assert mode(record) == 0o600 and mode(logs / "running") == 0o700
        # the key from the file is the one the server checks
        assert httpx.post(f"{server.base_url}/completion", json={"prompt": "hi", "n_predict": 1}).status_code == 401
        ok = httpx.post(f"{server.base_url}/completion", json={"prompt": "hi", "n_predict": 1},
                        headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)
        assert ok.status_code == 200
    finally:
        server.stop()
    assert not key_file.exists()
    assert list((logs / "running").glob("server-*.json")) == []
    assert mode(server.log_path) == 0o600  # the log stays, for the user alone


def test_a_new_logs_dir_is_created_owner_only(llama_server_bin: Path, demo_model: Path, tmp_path: Path) -> None:
    logs = tmp_path / "fresh" / "logs"
    server = ModelServer(ServerSpec("m", demo_model, n_ctx=512), llama_server_bin, logs,
                         ServerOptions(startup_timeout_s=60)).start()
    try:
        assert mode(logs) == 0o700 and mode(logs / "runtime") == 0o700
    finally:
        server.stop()


def test_key_file_is_removed_when_the_server_fails_to_start(llama_server_bin: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a model\n" * 1000)
    server = ModelServer(ServerSpec("m", bogus, n_ctx=512), llama_server_bin, tmp_path / "logs")
    with pytest.raises(InvalidModelFile) as err:
        server.start()
    assert not server.key_path.exists() and list((tmp_path / "logs" / "runtime").iterdir()) == []
    assert server.api_key not in " ".join(err.value.command) and "--api-key-file" in err.value.command


def test_key_files_of_a_chorus_killed_with_9_are_swept_at_the_next_start(demo_model: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "logs" / "runtime"
    runtime.mkdir(parents=True, mode=0o700)
    stale = runtime / f"key-{dead_pid()}-0123456789ab"
    stale.write_text("old key\n")
    not_a_binary = tmp_path / "llama-server"
    not_a_binary.write_text("not a program")
    with pytest.raises(ServerStartError, match="cannot run"):  # the sweep runs before the spawn fails
        ModelServer(ServerSpec("m", demo_model, n_ctx=512), not_a_binary, tmp_path / "logs").start()
    assert list(runtime.iterdir()) == []  # the stale key is gone, and so is the one of the failed start
