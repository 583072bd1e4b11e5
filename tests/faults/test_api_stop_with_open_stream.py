"""Issue 24, item 10c: SIGTERM to `chorus api` while a stream is open.

Before: uvicorn waited out its graceful timeout (5 s), cancelled the response and logged a 55-line
"Exception in ASGI application" traceback; the client's stream just dropped, with no error chunk. Now the
app sees the stop signal too: every open stream ends at once with an error chunk (`shutting_down`) and
`[DONE]`, its run is cancelled and recorded, and the API stops quietly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.history.store import SessionStore
from tests import yamlfile
from tests.apiwait import wait_healthy
from tests.conftest import REPO


@pytest.fixture
def endless_model() -> Iterator[str]:
    """An OpenAI-compatible endpoint whose answer streams a token every 0.1 s for a minute."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server calls it by this name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for i in range(600):
                    chunk = {"model": "far", "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # chorus hung up: what it does when its run is cancelled

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()  # shutdown() waits a poll
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(tmp_path: Path, endless_model: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    config = tmp_path / "config"
    config.mkdir()
    (tmp_path / "models").mkdir()
    (config / "app.yaml").write_text(yamlfile.dump({"models_dir": str(tmp_path / "models"),
                                                     "sessions_dir": str(tmp_path / "sessions"),
                                                     "logs_dir": str(tmp_path / "logs")}))
    (config / "models.yaml").write_text(yamlfile.dump({"models": {"far": {"url": endless_model}}}))
    (config / "pipeline.yaml").write_text(yamlfile.dump({"name": "base", "stages": [{"name": "s",
                                                                                       "models": ["far"]}]}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(config),
                             "--port", str(port)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        yield proc, url, tmp_path / "sessions"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read_stream(url: str, model: str, items: list[Any], opened: threading.Event) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    items.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                    opened.set()
    except httpx.HTTPError as exc:
        items.append(exc)


@pytest.mark.parametrize("model", ["chorus/base", "far"], ids=["pipeline stream", "model stream"])
def test_sigterm_ends_an_open_stream_with_an_error_chunk_and_done_and_stops_quietly(
        api: tuple[subprocess.Popen[bytes], str, Path], model: str) -> None:
    proc, url, sessions = api
    items: list[Any] = []
    opened = threading.Event()
    reader = threading.Thread(target=_read_stream, args=(url, model, items, opened))
    reader.start()
    assert opened.wait(30), items
    time.sleep(0.5)  # a few tokens in
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=30)[0].decode()
    reader.join(10)
    assert time.monotonic() - stopped_at < 4.0  # not uvicorn's 5 s graceful timeout, then a cancel
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output
    assert len(output.splitlines()) <= 2, output  # the start line (and nothing like 55 lines of traceback)
    assert items[-1] == "[DONE]", items[-3:]
    error = items[-2]["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    if model.startswith("chorus/"):
        (session,) = SessionStore(sessions).list()
        assert session["status"] == "cancelled"  # the run was stopped and recorded
