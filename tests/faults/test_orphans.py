"""Orphans: nothing chorus starts outlives it, however it is stopped.

Attacks: `kill -TERM` of `chorus ui` (Streamlit and its warm llama-server kept running); a `llama_server:`
wrapper script that does not `exec` (the real server outlived every run); a benchmark killed by a timeout
(its baseline llama-server kept running).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from launcher.process.server import ModelServer, ServerOptions, ServerSpec
from tests.conftest import REPO, ConfigDir
from tests.faults.conftest import DEMO, process_gone

pytestmark = pytest.mark.integration

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def llama_servers_under(root: int) -> list[psutil.Process]:
    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if _is_llama_server(p)]


def _is_llama_server(proc: psutil.Process) -> bool:
    """The real server, not a wrapper script (whose process name is the script's: llama-server-wrapper.sh)."""
    try:
        argv0 = proc.cmdline()[:1]
        return bool(argv0) and Path(argv0[0]).name == "llama-server" and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def all_gone(pids: list[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_gone(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False




# ---------------------------------------------------------------- (b) wrapper scripts

def test_wrapper_that_does_not_exec_leaves_no_server_after_stop(wrapper: Path, demo_model: Path,
                                                                tmp_path: Path, reaper: list[int]) -> None:
    server = ModelServer(ServerSpec("m", demo_model, n_ctx=512), wrapper, tmp_path / "logs",
                         ServerOptions(startup_timeout_s=60, stop_grace_s=5)).start()
    reaper.append(server.pid or 0)
    (real,) = llama_servers_under(server.pid or 0)
    reaper.append(real.pid)
    server.stop()
    assert all_gone([server.pid or 0, real.pid], timeout=5), "the real llama-server outlived its wrapper"


def test_wrapper_server_is_stopped_when_chorus_serve_gets_sigterm(config_dir: ConfigDir, wrapper: Path,
                                                                  reaper: list[int]) -> None:
    config_dir.write_app(llama_server=str(wrapper))
    serve = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", DEMO, "--n-ctx", "512",
                              "--config-dir", str(config_dir.path)], cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reaper.append(serve.pid)
    ready = serve.stdout.readline()  # type: ignore[union-attr]
    assert "ready in" in ready, serve.stderr.read() if serve.poll() is not None else ready  # type: ignore[union-attr]
    (real,) = llama_servers_under(serve.pid)
    reaper.append(real.pid)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=30) != 0
    assert all_gone([real.pid]), "the real llama-server behind the wrapper outlived `chorus serve`"


# ---------------------------------------------------------------- (a) chorus ui

def ui_command(config_dir: ConfigDir, port: int, app: Path | None = None) -> list[str]:
    if app is None:
        return [sys.executable, "-m", "cli.main", "ui", "--port", str(port),
                "--config-dir", str(config_dir.path)]
    driver = textwrap.dedent(f"""
        import argparse, sys
        from pathlib import Path
        from cli import ui
        ui.app_path = lambda: Path({str(app)!r})  # a page that starts a llama-server when a session opens
        sys.exit(ui.cmd_ui(argparse.Namespace(config_dir={str(config_dir.path)!r}, host="127.0.0.1", port={port},
                                             token=None, token_file=None, allow_remote=False)))
    """)
    return [sys.executable, "-c", driver]


def open_session(port: int, until: Callable[[], object], timeout: float = 90) -> None:
    """What a browser does first: open the websocket and ask for a script run; stay connected `until` holds
    (a closed session stops its script run)."""
    import asyncio

    from streamlit.proto.BackMsg_pb2 import BackMsg
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"]) as ws:
            msg = BackMsg()
            msg.rerun_script.query_string = ""
            msg.rerun_script.page_script_hash = ""
            await ws.send(msg.SerializeToString())
            deadline = time.monotonic() + timeout
            while not until() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.5)

    asyncio.run(go())


def start_ui(command: list[str], port: int, reaper: list[int]) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    ui = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    reaper.append(ui.pid)
    wait_for(lambda: listening(port) or ui.poll() is not None, 90, "chorus ui to listen")
    assert ui.poll() is None, f"chorus ui exited with {ui.returncode}"
    streamlit = next(p for p in psutil.Process(ui.pid).children(recursive=True) if "streamlit" in " ".join(p.cmdline()))
    reaper.append(streamlit.pid)
    return ui, streamlit


def test_sigterm_to_chorus_ui_stops_streamlit(config_dir: ConfigDir, reaper: list[int]) -> None:
    port = free_port()
    ui, streamlit = start_ui(ui_command(config_dir, port), port, reaper)
    ui.send_signal(signal.SIGTERM)
    assert ui.wait(timeout=30) == 128 + signal.SIGTERM
    assert all_gone([streamlit.pid]), "Streamlit outlived `chorus ui`"
    assert not listening(port)


def test_sigterm_to_chorus_ui_stops_the_llama_server_streamlit_started(config_dir: ConfigDir, demo_model: Path,
                                                                       llama_server_bin: Path, tmp_path: Path,
                                                                       reaper: list[int]) -> None:
    pid_file = tmp_path / "server.pid"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        from pathlib import Path
        import streamlit as st
        from launcher.process.server import ModelServer, ServerOptions, ServerSpec

        @st.cache_resource
        def warm() -> ModelServer:  # as ui/common.py keeps its Runtime and pool: warm for the process
            return ModelServer(ServerSpec("m", Path({str(demo_model)!r}), n_ctx=512), Path({str(llama_server_bin)!r}),
                               Path({str(tmp_path / "logs")!r}), ServerOptions(startup_timeout_s=60)).start()

        Path({str(pid_file)!r}).write_text(str(warm().pid))
        st.write("warm")
    """))
    port = free_port()
    ui, streamlit = start_ui(ui_command(config_dir, port, app), port, reaper)
    open_session(port, until=pid_file.is_file)
    server_pid = int(wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 5, "the warm llama-server"))
    reaper.append(server_pid)
    assert not process_gone(server_pid)
    ui.send_signal(signal.SIGTERM)
    assert ui.wait(timeout=30) == 128 + signal.SIGTERM
    assert all_gone([streamlit.pid, server_pid]), "Streamlit or its llama-server outlived `chorus ui`"
    assert not listening(port)


# ---------------------------------------------------------------- (c) benchmarks

@pytest.mark.parametrize(("script", "sig", "args"), [
    ("bench/launcher.py", signal.SIGTERM, ["--model", "{demo}"]),      # `timeout 60 python bench/launcher.py`
    ("bench/launcher.py", signal.SIGKILL, ["--model", "{demo}"]),      # `timeout -s KILL …`: no handler runs
    ("bench/memory_accuracy.py", signal.SIGTERM, ["--models", "demo"]),
])
def test_benchmark_killed_by_a_timeout_leaves_no_server(script: str, sig: int, args: list[str], demo_model: Path,
                                                        llama_server_bin: Path, reaper: list[int]) -> None:
    argv = [a.format(demo=demo_model) for a in args]
    bench = subprocess.Popen([sys.executable, script, *argv], cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "CHORUS_DEMO_MODEL": str(demo_model)})
    reaper.append(bench.pid)
    servers = wait_for(lambda: llama_servers_under(bench.pid), 60, "the benchmark's llama-server")
    reaper.extend(s.pid for s in servers)
    os.kill(bench.pid, sig)
    bench.wait(timeout=30)
    assert all_gone([s.pid for s in servers]), f"{script} killed by {signal.Signals(sig).name} left its server"
