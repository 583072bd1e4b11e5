"""Issue 24.9: the API key on the command line. `chorus api --api-key KEY` (the README's own example) showed the
key in `ps -ef` to every user of the machine for the server's whole life.

Now a key in argv is refused with the safe ways in the hint; the key comes from `--api-key-file`,
`$CHORUS_API_KEY` or a prompt on a terminal, and reaches uvicorn through its environment only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.apiwait import wait_healthy as answers_health
from tests.clirun import run_main
from tests.conftest import REPO

KEY = "k3y-that-must-stay-out-of-ps-0123456789"


@pytest.fixture
def config(remote_config: Path) -> Path:
    return remote_config


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}, **extra}


def chorus_api(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`chorus api` refusing its arguments: its main() in this process (tests/clirun.py). The tests where it
    starts run it as a process of its own: what `ps` shows is of a real process tree."""
    return run_main("api", "--config-dir", str(config), *args, env=clean_env())


def flat(text: str) -> str:
    """CLI output with its line wrapping undone."""
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[bytes], url: str) -> None:
    if not answers_health(proc, url):
        pytest.fail(f"chorus api did not start (exit {proc.poll()})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def argv_of_tree(pid: int) -> str:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return "\n".join(" ".join(p.cmdline()) for p in procs)


def key_is_checked(url: str) -> tuple[int, int]:
    without = httpx.get(f"{url}/v1/models", timeout=30).status_code
    with_key = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code
    return without, with_key


@pytest.mark.parametrize("argv", [["--api-key", KEY], [f"--api-key={KEY}"]])
def test_a_key_in_argv_is_refused_with_the_safe_ways(config: Path, argv: list[str]) -> None:
    out = chorus_api(config, "--host", "0.0.0.0", "--port", str(free_port()), *argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--api-key on the command line is refused" in flat(out.stderr) and "ps -ef" in flat(out.stderr)
    assert "--api-key-file" in flat(out.stderr) and "$CHORUS_API_KEY" in flat(out.stderr)
    assert KEY not in out.stderr + out.stdout


@pytest.mark.parametrize(("content", "reason"), [(None, "No such file or directory"), ("", "the file is empty"),
                                                 ("a\nb\n", "the file has more than one line")])
def test_an_unusable_key_file_is_one_error_naming_the_flag_and_the_file(config: Path, tmp_path: Path,
                                                                       content: str | None, reason: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    out = chorus_api(config, "--host", "0.0.0.0", "--api-key-file", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--api-key-file {path}: {reason}" in flat(out.stderr)


def test_key_file_keeps_the_key_out_of_every_argv_and_is_enforced(config: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(config), "--host",
                             "0.0.0.0", "--port", str(port), "--api-key-file", str(key_file)],
                            cwd=REPO, env=clean_env(), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        assert KEY not in argv_of_tree(proc.pid)
        assert key_is_checked(f"http://127.0.0.1:{port}") == (401, 200)
    finally:
        stop(proc)


def test_a_loose_key_file_is_used_with_a_warning(config: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    (config / "app.yaml").write_text("nonsense_key: 1\n")  # stops chorus right after it has read the key
    out = chorus_api(config, "--host", "0.0.0.0", "--api-key-file", str(key_file))
    assert f"{key_file} can be read by other users (mode 644); chmod 600" in flat(out.stderr)
    assert "nonsense_key" in out.stderr, "the key was not accepted"


def test_environment_key_is_enforced(config: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(config), "--host",
                             "0.0.0.0", "--port", str(port)], cwd=REPO, env=clean_env(CHORUS_API_KEY=KEY),
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        assert key_is_checked(f"http://127.0.0.1:{port}") == (401, 200)
    finally:
        stop(proc)


def test_on_a_terminal_the_key_is_asked_for_and_never_echoed(config: Path) -> None:
    master, slave = pty.openpty()
    port = free_port()

    def own_terminal() -> None:  # after setsid: the pty becomes the controlling terminal getpass opens
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(config), "--host",
                             "0.0.0.0", "--port", str(port)], cwd=REPO, env=clean_env(), start_new_session=True,
                            stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"API key for chorus api on 0.0.0.0:" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 1024)
        os.write(master, KEY.encode() + b"\n")
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        assert key_is_checked(f"http://127.0.0.1:{port}") == (401, 200)
        os.set_blocking(master, False)
        with contextlib.suppress(BlockingIOError, OSError):
            seen += os.read(master, 65536)
        assert KEY.encode() not in seen, "the typed key was echoed"
    finally:
        stop(proc)
        os.close(master)
