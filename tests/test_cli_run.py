"""`chorus run` and `chorus history` as a user runs them, on the demo model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir

pytestmark = pytest.mark.integration


def chorus(config_dir: ConfigDir, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL)


def chorus_main(config_dir: ConfigDir, *args: str) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS` through main() in this process (tests/clirun.py): for commands that start no server,
    where what they print matters, not that they are a process of their own."""
    return run_main(*args, "--config-dir", str(config_dir.path))


def test_run_json_then_history_list_show_search_rerun(config_dir: ConfigDir, llama_server_bin) -> None:
    out = chorus(config_dir, "run", "Why is the sky blue?", "--json", "--set", "defaults.max_tokens=10",
                 "--set", "defaults.n_ctx=1024")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"session_id", "session_dir", "status", "final", "stages"}
    assert data["status"] == "completed" and data["final"]
    assert [s["name"] for s in data["stages"]] == ["analyse", "draft", "review"]
    assert {"model", "text", "error"} <= set(data["stages"][2]["responses"][0])
    assert data["stages"][2]["aggregation"]["kind"] == "synthesis"
    assert "[1/3] analyse" in out.stderr and "tokens in" in out.stderr

    listed = json.loads(chorus_main(config_dir, "history", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [data["session_id"]]
    shown = chorus_main(config_dir, "history", "show", "1")
    assert "step 3: review" in shown.stdout and "== final" in shown.stdout
    found = json.loads(chorus_main(config_dir, "history", "search", "sky", "--json").stdout)
    assert found and found[0]["id"] == data["session_id"]

    rerun = chorus(config_dir, "history", "rerun", "1", "--stage", "3", "--json", "--set", "review.max_tokens=4")
    assert rerun.returncode == 0, rerun.stderr
    child = json.loads(rerun.stdout)
    assert child["session_id"] == "session_002" and child["stages"][0]["status"] == "copied"

    reindexed = chorus_main(config_dir, "history", "reindex")
    assert "reindexed 2 session(s)" in reindexed.stdout


def test_run_plain_prints_the_final_answer_on_stdout(config_dir: ConfigDir, llama_server_bin, tmp_path) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text("stages:\n  - {name: only, models: [gemma3-270m], max_tokens: 6, n_ctx: 512}\n")
    out = chorus(config_dir, "run", "The capital of France is", "--manual", str(spec))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "status: completed" in out.stderr and "session_001" in out.stderr


def test_run_in_base_mode_with_a_missing_model_is_refused_with_the_reason(config_dir: ConfigDir) -> None:
    (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    out = chorus_main(config_dir, "run", "hello")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "base pipeline is blocked" in out.stderr and "gemma3-270m" in out.stderr


def test_bad_set_value_names_the_field(config_dir: ConfigDir) -> None:
    out = chorus_main(config_dir, "run", "hello", "--set", "review.temperature=hot")
    assert out.returncode == 2 and "stages[2].temperature" in out.stderr and "Traceback" not in out.stderr


def test_history_show_of_an_unknown_session_is_a_clear_error(config_dir: ConfigDir) -> None:
    out = chorus_main(config_dir, "history", "show", "42")
    assert out.returncode == 2 and "no session 'session_042'" in " ".join(out.stderr.split())


TWO_STAGES = ("stages:\n  - {name: first, models: [gemma3-270m], max_tokens: 8, n_ctx: 512}\n"
              "  - {name: last, models: [gemma3-270m], max_tokens: 8, n_ctx: 512}\n")
# the first stage generates long enough (~1 s) for the live area's 0.25 s redraws to show its tokens and rate
LIVE_STAGES = ("stages:\n  - {name: first, models: [gemma3-270m], max_tokens: 64, n_ctx: 512}\n"
               "  - {name: last, models: [gemma3-270m], max_tokens: 8, n_ctx: 512}\n")


def run_in_pty(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on one pseudo-terminal (100 columns), as in a terminal."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_run_in_a_terminal_shows_live_progress_and_streams_the_answer_once(config_dir: ConfigDir, llama_server_bin,
                                                                           tmp_path) -> None:
    import re

    spec = tmp_path / "two.yaml"
    spec.write_text(LIVE_STAGES)
    code, screen = run_in_pty([sys.executable, "-m", "cli", "--config-dir", str(config_dir.path),
                               "run", "The capital of France is", "--manual", str(spec)])
    assert code == 0, screen
    assert "Traceback" not in screen and "DEBUG" not in screen and "HTTP Request" not in screen
    assert "[1/2] first: gemma3-270m" in screen and "[2/2] last: gemma3-270m" in screen
    assert "\x1b[1F\x1b[J" in screen  # the live area is redrawn in place
    assert re.search(r"gemma3-270m \(gemma3-270m\):\s+\d+ tokens\s+[\d.]+ tok/s\s+[\d.]+s", screen)
    final = json.loads(chorus_main(config_dir, "history", "show", "1", "--json").stdout)["final"].strip()
    screen = screen.replace("\r\n", "\n")  # the terminal writes each newline of the answer as CR LF
    assert final and screen.count(final) == 1  # streamed as it came, not printed again at the end
    assert screen.index(final) < screen.index("status: completed")


def test_run_dash_reads_the_question_from_stdin_and_json_stays_pure(config_dir: ConfigDir, llama_server_bin,
                                                                      tmp_path) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text("stages:\n  - {name: only, models: [gemma3-270m], max_tokens: 6, n_ctx: 512}\n")
    out = subprocess.run([sys.executable, "-m", "cli", "-v", "run", "-", "--manual", str(spec), "--json",
                          "--config-dir", str(config_dir.path)], input="The capital of France is\n",
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # nothing streamed into the JSON
    assert data["question"] == "The capital of France is" and data["status"] == "completed"
    assert "starting llama-server for 'gemma3-270m'" in out.stderr  # -v before the subcommand is kept
    assert "connect_tcp" not in out.stderr and "Traceback" not in out.stderr  # not the HTTP library's lines
