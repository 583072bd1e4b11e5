"""Issue 24, item 10b: a remote (`url:`) model whose stream is not JSON.

Before: `data: {not json` then `data: [DONE]` was recorded as an `ok` call with empty output and the run
`completed`, because event lines that did not parse were skipped. Now such a line fails the call with a
reason that quotes it, and a run whose only model failed so is `failed`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.main import main
from launcher.errors import RequestFailed
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from tests import yamlfile
from tests.conftest import ConfigDir


def _stream_server(events: list[bytes]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server calls it by this name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for event in events:
                self.wfile.write(event + b"\n\n")
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # shutdown() waits a poll
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def broken_stream() -> Iterator[str]:
    yield from _stream_server([b"data: {not json", b"data: [DONE]"])


def _generate(url: str) -> str:
    async def ask() -> str:
        async with GenerationClient(timeout_s=10) as client:
            result = await client.generate(Endpoint("far", url, "chat", None, remote=True),
                                           GenerationRequest(prompt="hi"))
            return result.text
    return asyncio.run(ask())


def test_an_event_that_is_not_json_fails_the_call_quoting_it(broken_stream: str) -> None:
    with pytest.raises(RequestFailed) as caught:
        _generate(broken_stream)
    assert "is not JSON" in caught.value.detail and "'{not json'" in caught.value.detail
    assert f"{broken_stream}/chat/completions" in caught.value.detail and caught.value.hint


@pytest.mark.parametrize("event", [b"data: 42", b'data: ["a"]'])
def test_an_event_that_is_json_but_not_an_object_fails_the_call(event: bytes) -> None:
    for url in _stream_server([event, b"data: [DONE]"]):
        with pytest.raises(RequestFailed) as caught:
            _generate(url)
        assert "not a JSON object" in caught.value.detail


def test_a_good_stream_with_keepalive_comments_and_blank_data_still_answers() -> None:
    chunk = json.dumps({"choices": [{"delta": {"content": "Paris"}, "finish_reason": "stop"}]}).encode()
    for url in _stream_server([b": keep-alive", b"data: ", b"data: " + chunk, b"data: [DONE]"]):
        assert _generate(url) == "Paris"


def test_chorus_run_records_the_call_failed_and_the_run_failed(broken_stream: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    models.mkdir()
    config = ConfigDir(tmp_path, models)
    config.write_models({"models": {"far": {"url": broken_stream}}})
    spec = tmp_path / "far.yaml"
    spec.write_text(yamlfile.dump({"stages": [{"name": "ask", "models": ["far"]}]}))
    code = main(["run", "Why?", "--manual", str(spec), "--json", "--config-dir", str(config.path)])
    outcome = json.loads(capsys.readouterr().out)
    assert code == 1 and outcome["status"] == "failed"
    response = outcome["stages"][0]["responses"][0]
    assert response["status"] == "failed" and "is not JSON" in response["error"]["message"]
