"""Issue 24.8: what chorus starts must die with it, also on SIGKILL (a supervisor's timeout).

Attacks: a `llama_server:` wrapper script that does not `exec`, and `kill -9` of chorus: PR_SET_PDEATHSIG kills
the wrapper only, the real llama-server lived on with parent 1, and `chorus ps` / `chorus stop --all` could not
see it (the record named the wrapper). `kill -9` of `chorus ui --host 0.0.0.0`: Streamlit kept listening on
0.0.0.0 with parent 1 (its SIGTERM shutdown took seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from launcher.process import state
from launcher.process.server import ModelServer, ServerOptions, ServerSpec
from tests.conftest import REPO, ConfigDir
from tests.faults.conftest import DEMO, chorus_main, process_gone
from tests.faults.test_orphans import (
    all_gone,
    free_port,
    listening,
    llama_servers_under,
    open_session,
    wait_for,
)

pytestmark = pytest.mark.integration




def serve_and_kill(config_dir: ConfigDir, reaper: list[int]) -> psutil.Process:
    """`chorus serve` through the wrapper, then `kill -9` of chorus: returns the real server it leaves behind."""
    serve = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", DEMO, "--n-ctx", "512",
                              "--config-dir", str(config_dir.path)], cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    reaper.append(serve.pid)
    assert "ready in" in serve.stdout.readline()  # type: ignore[union-attr]
    (real,) = llama_servers_under(serve.pid)
    reaper.append(real.pid)
    os.kill(serve.pid, signal.SIGKILL)
    serve.wait(timeout=30)
    wait_for(lambda: real.ppid() != serve.pid and not llama_servers_under(serve.pid), 10, "the wrapper to die")
    assert not process_gone(real.pid), "no orphan to find: PR_SET_PDEATHSIG reached the real server"
    return real


def test_ps_and_stop_find_the_server_a_killed_chorus_left_behind_a_wrapper(config_dir: ConfigDir, wrapper: Path,
                                                                           reaper: list[int]) -> None:
    config_dir.write_app(llama_server=str(wrapper))
    real = serve_and_kill(config_dir, reaper)
    ps = chorus_main(config_dir, "ps", "--json")  # the killed chorus is the other process
    assert ps.returncode == 0, ps.stderr
    (listed,) = json.loads(ps.stdout)
    assert listed["pid"] == real.pid and listed["model"] == DEMO, "ps does not show the orphaned server"
    assert listed["rss_bytes"] and listed["rss_bytes"] > 50 * 2**20  # the server's memory, not the shell's
    assert f"{listed['owner_pid']} (gone)" in chorus_main(config_dir, "ps").stdout  # the table marks the orphan
    stopped = chorus_main(config_dir, "stop", "--all")
    assert stopped.returncode == 0 and f"{DEMO} (pid {real.pid}" in stopped.stdout, stopped.stdout
    assert all_gone([real.pid], timeout=10), "chorus stop --all left the orphaned server running"
    assert chorus_main(config_dir, "ps").stdout.strip() == "no llama-server running"


def test_the_next_start_stops_the_server_a_killed_chorus_left(config_dir: ConfigDir, wrapper: Path,
                                                              llama_server_bin: Path, demo_model: Path,
                                                              reaper: list[int]) -> None:
    config_dir.write_app(llama_server=str(wrapper))
    real = serve_and_kill(config_dir, reaper)
    running = config_dir.path.parent / "logs" / "running"
    server = ModelServer(ServerSpec("other", demo_model, n_ctx=256), llama_server_bin, config_dir.path.parent / "logs",
                         ServerOptions(startup_timeout_s=60, state_dir=running)).start()
    try:
        assert all_gone([real.pid], timeout=10), "the next start left the orphaned server running"
        assert [r.pid for r in state.list_running(running)] == [server.pid]
    finally:
        server.stop()
    assert state.list_running(running) == []


def test_behind_a_wrapper_the_record_names_the_listening_server(wrapper: Path, demo_model: Path, tmp_path: Path,
                                                               reaper: list[int]) -> None:
    running = tmp_path / "logs" / "running"
    server = ModelServer(ServerSpec("m", demo_model, n_ctx=512), wrapper, tmp_path / "logs",
                         ServerOptions(startup_timeout_s=60, state_dir=running)).start()
    reaper.append(server.pid or 0)
    try:
        (real,) = llama_servers_under(server.pid or 0)
        assert server.listen_pid == real.pid != server.pid
        (record,) = state.list_running(running)
        assert (record.pid, record.pgid, record.port) == (real.pid, server.pid, server.port)
        assert record.owner_alive()
    finally:
        server.stop()
    assert state.list_running(running) == [] and all_gone([real.pid], timeout=5)


def test_a_record_whose_wrapper_died_before_ready_follows_the_group_and_is_swept(tmp_path: Path,
                                                                                reaper: list[int]) -> None:
    """chorus killed while the server loads: the record names the wrapper (dead), the server lives in its group.
    The server stands in as `sleep` run under the name llama-server: a group member that is no server is
    another program's (tests/test_stale_server_records.py)."""
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir()
    server.symlink_to(shutil.which("sleep") or "/bin/sleep")
    wrapper = subprocess.Popen(["sh", "-c", f"'{server}' 300 & wait"], start_new_session=True)
    reaper.append(wrapper.pid)
    child = wait_for(lambda: psutil.Process(wrapper.pid).children(), 10, "the wrapper's child")[0]
    reaper.append(child.pid)
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    running = tmp_path / "running"
    state.write_record(running, state.ServerRecord(
        pid=wrapper.pid, port=1, model="m", model_path="/m.gguf", n_ctx=512, n_gpu_layers=0, slots=1,
        owner_pid=dead_owner.pid, started_at=time.time() - 1, pgid=wrapper.pid,
        create_time=state.start_time(wrapper.pid), owner_create_time=None))
    os.kill(wrapper.pid, signal.SIGKILL)  # as PR_SET_PDEATHSIG does when chorus dies
    wrapper.wait(timeout=10)
    (record,) = state.list_running(running)
    assert record.pid == child.pid and not record.owner_alive()
    assert [p.name for p in running.iterdir()] == [f"server-{child.pid}.json"]
    (swept,) = state.sweep_orphans(running, grace_s=2)
    assert swept[1] == "stopped" and all_gone([child.pid], timeout=5)
    assert state.list_running(running) == []


def test_the_sweep_leaves_servers_of_a_live_chorus_alone(tmp_path: Path, reaper: list[int]) -> None:
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    reaper.append(server.pid)
    running = tmp_path / "running"
    state.write_record(running, state.ServerRecord(
        pid=server.pid, port=1, model="m", model_path="/m.gguf", n_ctx=512, n_gpu_layers=0, slots=1,
        owner_pid=os.getpid(), started_at=time.time(), pgid=server.pid, create_time=state.start_time(server.pid),
        owner_create_time=state.own_start_time()))
    assert state.sweep_orphans(running, grace_s=1) == []
    assert server.poll() is None and [r.pid for r in state.list_running(running)] == [server.pid]


def ui_driver(app: Path, port: int, token_file: Path) -> list[str]:
    """`chorus ui --host 0.0.0.0 --allow-remote --token-file FILE` with `app` as the Streamlit script."""
    driver = textwrap.dedent(f"""
        import argparse, sys
        from pathlib import Path
        from cli import ui
        ui.app_path = lambda: Path({str(app)!r})
        sys.exit(ui.cmd_ui(argparse.Namespace(config_dir=None, host="0.0.0.0", port={port}, allow_remote=True,
                                              token=None, token_file={str(token_file)!r})))
    """)
    return [sys.executable, "-c", driver]


def test_sigkill_of_chorus_ui_beyond_loopback_takes_streamlit_down_at_once(tmp_path: Path,
                                                                          reaper: list[int]) -> None:
    """Streamlit's own shutdown can take seconds (here: an exit handler that sleeps 30 s, standing in for warm
    servers being stopped); a kill -9 of chorus must not wait for it."""
    token = tmp_path / "token"
    token.write_text("correct-horse-battery-staple\n")
    token.chmod(0o600)
    started = tmp_path / "started"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        import atexit, time
        from pathlib import Path
        import streamlit as st

        @st.cache_resource
        def slow_shutdown() -> bool:
            atexit.register(time.sleep, 30)
            return True

        slow_shutdown()
        Path({str(started)!r}).write_text("1")
        st.write("ready")
    """))
    port = free_port()
    ui = subprocess.Popen(ui_driver(app, port, token), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    reaper.append(ui.pid)
    wait_for(lambda: listening(port) or ui.poll() is not None, 90, "chorus ui to listen")
    assert ui.poll() is None, f"chorus ui exited with {ui.returncode}"
    (streamlit,) = [p for p in psutil.Process(ui.pid).children() if "streamlit" in " ".join(p.cmdline())]
    reaper.append(streamlit.pid)
    open_session(port, until=started.is_file)
    os.kill(ui.pid, signal.SIGKILL)  # a supervisor's timeout: no handler of chorus runs
    ui.wait(timeout=10)
    assert all_gone([streamlit.pid], timeout=3), "Streamlit outlived a kill -9 of `chorus ui` by over 3 s"
    wait_for(lambda: not listening(port), 3, "the port to close")
