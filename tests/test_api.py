"""The OpenAI-compatible API (`chorus api`).

Unit tests: the app in-process (FastAPI's TestClient) on the fake backend, with remote model entries so
no GGUF file or llama-server is needed; they run in milliseconds. Integration tests: the official `openai`
package against a real `chorus api` process on the demo model: models, a pipeline answer streamed and
not, a model proxied to its llama-server, each error case, a disconnect that cancels, two clients at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import INTERNAL, status_of
from api.mapping import conversation
from api.proxy import ModelProxy
from api.schemas import ChatRequest
from api.settings import ApiSettings
from cli.api import ApiKeyRequired, is_loopback
from cli.main import main as chorus_main
from launcher import errors as launcher_errors
from launcher.errors import ChorusError, InsufficientMemory
from orchestrator import errors as orchestrator_errors
from orchestrator.app import Chorus
from orchestrator.config.schema import load_config
from orchestrator.engine import run as engine_run
from orchestrator.engine.fake import FakeBackend, Script, crash
from orchestrator.history.store import SessionStore
from orchestrator.records import ErrorInfo
from tests import yamlfile
from tests.conftest import REPO, ConfigDir

# ---------------------------------------------------------------- unit: the app on the fake backend

LOCAL = "http://127.0.0.1"  # a loopback Host: the keyless API on loopback answers no other name

BASE_PIPELINE = {
    "name": "base", "description": "draft, then two reviews merged by synthesis",
    "defaults": {"temperature": 0.7, "max_tokens": 50},
    "stages": [
        {"name": "draft", "models": ["alpha"], "temperature": 0.9, "prompt": "Q: {{ question }}"},
        {"name": "review", "models": [{"model": "alpha", "seed": 11}, {"model": "beta", "max_tokens": 99}],
         "aggregation": {"type": "synthesis", "synthesis_model": "alpha"}},
    ],
}


def remote_config(tmp_path: Path, models: dict[str, Any], base: dict[str, Any],
                  pipelines: dict[str, dict[str, Any]]) -> Path:
    """A config folder under `tmp_path`: `models` (remote ones need no file nor server), `base` as
    pipeline.yaml, and `pipelines` as pipelines/NAME.yaml; the API tests' fixtures build theirs with it."""
    root = tmp_path / "config"
    (root / "pipelines").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (root / "app.yaml").write_text(yamlfile.dump({"models_dir": str(tmp_path / "models"),
                                                   "sessions_dir": str(tmp_path / "sessions"),
                                                   "logs_dir": str(tmp_path / "logs")}))
    (root / "models.yaml").write_text(yamlfile.dump({"models": models}))
    (root / "pipeline.yaml").write_text(yamlfile.dump(base, sort_keys=False))
    for name, spec in pipelines.items():
        (root / "pipelines" / f"{name}.yaml").write_text(yamlfile.dump(spec, sort_keys=False))
    return root


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config with two remote models (no file, no server), one missing model and four pipeline files."""
    root = remote_config(tmp_path, {"alpha": {"url": "http://upstream.test/v1", "description": "the first"},
                                    "beta": {"url": "http://upstream.test/v1"},
                                    "gone": {"file": "missing.gguf"}}, BASE_PIPELINE,
                         {"solo": {"stages": [{"name": "only", "models": ["alpha"]}]},
                          "blocked": {"stages": [{"name": "x", "models": ["gone"]}]}})
    (root / "pipelines" / "broken.yaml").write_text("stages: [ {name: x, models: [alpha], nonsense: 1} ]\n")
    return root


def make_client(config: Path, backend: FakeBackend | None = None, **settings: Any) -> TestClient:
    app = create_app(Chorus.from_dir(config), ApiSettings(**settings),
                     backend_factory=(lambda: backend) if backend else None)
    return TestClient(app, base_url=LOCAL)


def chat(model: str, question: str = "Why is the sky blue?", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": question}], **fields}


def sse_items(text: str) -> list[Any]:
    """The data items of an SSE body: JSON objects, and '[DONE]' as a string."""
    items = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            items.append(payload if payload == "[DONE]" else json.loads(payload))
    return items


def replies(request: Any) -> str:
    return f"  answer to <{request.prompt[:30]}> with t={request.temperature}  "


def test_models_lists_runnable_pipelines_and_registered_models_only(config: Path) -> None:
    with make_client(config) as client:
        data = client.get("/v1/models").json()
    by_id = {m["id"]: m for m in data["data"]}
    assert sorted(by_id) == ["alpha", "beta", "chorus/base", "chorus/solo"]  # not blocked, broken or missing
    assert by_id["chorus/base"]["owned_by"] == "chorus"
    assert by_id["chorus/base"]["description"] == BASE_PIPELINE["description"]
    assert by_id["chorus/base"]["chorus"]["stages"] == ["draft", "review"]
    assert by_id["alpha"]["description"] == "the first"
    assert by_id["alpha"]["chorus"]["kind"] == "model"


def test_a_blocked_base_pipeline_is_absent_and_answers_404(config: Path) -> None:
    pipeline = {**BASE_PIPELINE, "stages": [{"name": "x", "models": ["gone"]}]}
    (config / "pipeline.yaml").write_text(yamlfile.dump(pipeline))
    with make_client(config) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        r = client.post("/v1/chat/completions", json=chat("chorus/base"))
    assert "chorus/base" not in ids
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "gone" in r.json()["error"]["message"]


def test_pipeline_answer_is_the_final_output_and_the_run_is_saved(config: Path) -> None:
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/base"))
    assert r.status_code == 200, r.text
    body = r.json()
    session = SessionStore(load_config(config).sessions_dir).load(r.headers["X-Chorus-Session"])
    assert body["object"] == "chat.completion"
    assert body["model"] == "chorus/base"
    assert body["choices"][0]["message"]["content"] == session.final
    assert session.meta["status"] == "completed"
    assert body["chorus"]["session_id"] == session.id
    assert [s["name"] for s in body["chorus"]["stages"]] == ["draft", "review"]
    assert body["usage"]["completion_tokens"] > 0
    assert len(backend.requests) == 4  # draft, two reviewers, synthesis


def test_request_sampling_fields_apply_to_every_call_of_the_run(config: Path) -> None:
    backend = FakeBackend(default=Script(replies))
    fields = {"temperature": 0.2, "top_p": 0.5, "max_tokens": 5, "seed": 3, "stop": "END"}
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/base", **fields))
    assert r.status_code == 200, r.text
    seen = {(q.temperature, q.top_p, q.max_tokens, q.seed, tuple(q.stop or ())) for _, q in backend.requests}
    assert seen == {(0.2, 0.5, 5, 3, ("END",))}  # stage (0.9), slot (seed 11, max_tokens 99) values replaced
    pipeline_file = yamlfile.load((config / "pipeline.yaml").read_text())
    assert pipeline_file == BASE_PIPELINE  # the file is not changed


def test_without_sampling_fields_the_pipeline_values_hold(config: Path) -> None:
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        assert client.post("/v1/chat/completions", json=chat("chorus/base")).status_code == 200
    draft, reviewer, second, _synthesis = (q for _, q in backend.requests)
    assert (draft.temperature, reviewer.seed, second.max_tokens) == (0.9, 11, 99)


def test_stream_sends_the_final_stage_as_content_and_progress_as_chorus_events(config: Path) -> None:
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/base", stream=True,
                                                           stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    items = sse_items(r.text)
    assert items[-1] == "[DONE]"
    chunks = items[:-1]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    session = SessionStore(load_config(config).sessions_dir).load(r.headers["X-Chorus-Session"])
    assert content == session.final
    assert content.startswith("answer to <You are given a question")  # the synthesis call, not the draft
    events = [c["chorus"] for c in chunks if "chorus" in c]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_started" and events[0]["session_id"] == session.id
    assert [e["stage"] for e in events if e["type"] == "stage_finished"] == ["draft", "review"]
    assert "token" not in kinds  # earlier stages' tokens only on request
    for c in chunks:  # a progress chunk has an empty delta: plain clients print nothing
        if "chorus" in c and c["choices"]:
            assert c["choices"][0]["delta"].get("content") in (None, "")
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[-1]["chorus"]["status"] == "completed"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("events", ["progress", "tokens", "none"])
def test_stream_sends_run_started_exactly_once_with_session_and_stages(config: Path, events: str) -> None:
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/base", stream=True, chorus={"events": events}))
    assert r.status_code == 200, r.text
    started = [c["chorus"] for c in sse_items(r.text)[:-1] if c.get("chorus", {}).get("type") == "run_started"]
    assert started == [{"type": "run_started", "pipeline": "base", "mode": "base", "stages": ["draft", "review"],
                        "session_id": r.headers["X-Chorus-Session"]}]


def test_stream_can_carry_every_stage_token_as_events(config: Path) -> None:
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/base", stream=True, chorus={"events": "tokens"}))
    tokens = [c["chorus"] for c in sse_items(r.text)[:-1] if c.get("chorus", {}).get("type") == "token"]
    assert {t["stage"] for t in tokens} == {"draft", "review"}


def test_token_events_include_the_answer_writers_own(config: Path) -> None:
    """'solo': one stage, one model, whose tokens are the answer: they came as content only, no token event."""
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/solo", stream=True, chorus={"events": "tokens"}))
    items = sse_items(r.text)[:-1]
    tokens = [c["chorus"] for c in items if c.get("chorus", {}).get("type") == "token"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in items if c["choices"])
    assert tokens and "".join(t["text"] for t in tokens).strip() == content.strip()


def test_plain_completions_endpoint_runs_a_pipeline(config: Path) -> None:
    backend = FakeBackend(default=Script(replies))
    with make_client(config, backend) as client:
        r = client.post("/v1/completions", json={"model": "chorus/solo", "prompt": "Name a colour."})
        streamed = client.post("/v1/completions", json={"model": "chorus/solo", "prompt": "Name a colour.",
                                                        "stream": True})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["text"] == replies(backend.requests[0][1])
    text = "".join(c["choices"][0]["text"] for c in sse_items(streamed.text)[:-1] if c["choices"])
    assert text == r.json()["choices"][0]["text"]


def test_the_last_user_message_is_the_question_and_earlier_turns_the_history() -> None:
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "3+3?"}]},
    ]})
    question, history = conversation(request)
    assert question == "And 3+3?"
    assert history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                       {"role": "assistant", "content": "4"}]


def test_earlier_turns_reach_the_prompt_templates_as_history(config: Path) -> None:
    (config / "pipelines" / "chat.yaml").write_text(yamlfile.dump({"stages": [{
        "name": "only", "models": ["alpha"],
        "prompt": "{% for t in history %}{{ t.role }}: {{ t.content }}\n{% endfor %}user: {{ question }}"}]}))
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    backend = FakeBackend(default=Script("6"))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json={"model": "chorus/chat", "messages": messages})
    assert r.status_code == 200, r.text
    assert backend.requests[0][1].prompt == "user: What is 2+2?\nassistant: 4\nuser: And 3+3?"
    assert r.json()["chorus"]["history_used"] is True


@pytest.mark.parametrize(("messages", "why"), [
    ([{"role": "system", "content": "hi"}], "no user message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "not supported"),
])
def test_a_conversation_without_a_final_user_question_is_400(config: Path, messages: list, why: str) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", json={"model": "chorus/base", "messages": messages})
    assert r.status_code == 400
    assert why in r.json()["error"]["message"]


def test_unknown_model_is_404_in_openai_shape(config: Path) -> None:
    with make_client(config, FakeBackend()) as client:
        for model in ("nope", "chorus/nope", "gone"):
            r = client.post("/v1/chat/completions", json=chat(model))
            assert r.status_code == 404
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
            assert model in error["message"]


@pytest.mark.parametrize(("body", "status", "param"), [
    (chat("chorus/base", temperature=-1), 422, "temperature"),
    (chat("chorus/base", max_tokens="many"), 422, "max_tokens"),
    ({"model": "chorus/base"}, 422, "messages"),
    (chat("chorus/base", n=2), 400, "n"),
])
def test_bad_fields_are_refused_naming_the_field(config: Path, body: dict, status: int, param: str) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_body_that_is_not_json_is_400(config: Path) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_a_crashed_model_server_is_502_naming_the_model(config: Path) -> None:
    backend = FakeBackend().script("alpha", crash("alpha"))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/solo"))
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["model"] == "alpha" and "alpha" in error["message"] and error["chorus_type"] == "ServerCrashed"
    session = SessionStore(load_config(config).sessions_dir).load(error["session_id"])
    assert session.meta["status"] == "failed"  # saved like any other run


def test_a_run_that_does_not_fit_in_memory_is_503_with_need_and_have(config: Path) -> None:
    backend = FakeBackend().script("alpha", InsufficientMemory("alpha", {"ram": 8 << 30}, {"ram": 1 << 30}))
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/solo"))
        streamed = client.post("/v1/chat/completions", json=chat("chorus/solo", stream=True))
    assert r.status_code == 503
    error = r.json()["error"]
    assert (error["need"], error["have"]) == ({"ram": 8 << 30}, {"ram": 1 << 30})
    assert error["code"] == "insufficient_memory"
    items = sse_items(streamed.text)  # a stream has begun: the error is its last chunk, as OpenAI does
    assert items[-1] == "[DONE]" and items[-2]["error"]["code"] == "insufficient_memory"


def test_runs_beyond_the_limit_and_a_full_queue_answer_429(config: Path) -> None:
    backend = FakeBackend(default=Script("slow answer", delay_s=1.0))
    with make_client(config, backend, max_runs=1, max_queue=0) as client:
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(
            client.post("/v1/chat/completions", json=chat("chorus/solo")).status_code))
        first.start()
        deadline = time.monotonic() + 5
        while client.app.state.limiter.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client.post("/v1/chat/completions", json=chat("chorus/solo"))
        first.join()
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert second.headers["Retry-After"]
    assert results == [200]


def test_a_body_over_the_limit_is_413_declared_or_not(config: Path) -> None:
    big = json.dumps(chat("chorus/solo", question="x" * 5000)).encode()
    with make_client(config, FakeBackend(), max_body_bytes=2048) as client:
        declared = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        chunked = client.post("/v1/chat/completions", content=iter([big[:1500], big[1500:]]),
                              headers={"content-type": "application/json"})
        small = client.post("/v1/chat/completions", json=chat("chorus/solo"))
    assert declared.status_code == 413 and chunked.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200


def test_an_api_key_is_checked_when_set(config: Path) -> None:
    with make_client(config, FakeBackend(), api_key="s3cret") as client:
        missing = client.get("/v1/models")
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer s3cre"})
        right = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        posted = client.post("/v1/chat/completions", json=chat("chorus/solo"))
    assert (missing.status_code, wrong.status_code, right.status_code, posted.status_code) == (401, 401, 200, 401)
    assert missing.json()["error"]["code"] == "invalid_api_key"


def test_listening_beyond_loopback_without_a_key_is_refused(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ApiKeyRequired):
        ApiSettings(host="0.0.0.0")
    assert ApiSettings(host="0.0.0.0", api_key="k").api_key == "k"
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.2", "example.org")] == [
        True, True, True, False, False, False]
    assert chorus_main(["api", "--config-dir", str(config), "--host", "0.0.0.0"]) == 2  # before anything starts
    assert "API key is required" in capsys.readouterr().err


def test_every_typed_error_has_its_own_status() -> None:
    """A new error type in the hierarchy must be given a status, not fall through to 500."""
    modules = (launcher_errors, orchestrator_errors, engine_run)
    types = {cls for m in modules for cls in vars(m).values()
             if isinstance(cls, type) and issubclass(cls, ChorusError) and cls is not ChorusError}
    unmapped = sorted(cls.__name__ for cls in types if status_of(ErrorInfo(cls.__name__, "")) == INTERNAL)
    assert unmapped == []
    assert status_of(ErrorInfo("ServerCrashed", "")).http == 502
    assert status_of(ErrorInfo("ServerOutOfMemory", "")).http == 503
    assert status_of(ErrorInfo("SomeStartError", "", exit_code=1)).http == 502  # an unknown type, by its data


# ---------------------------------------------------------------- unit: the model proxy

def proxied_client(config: Path, handler: Any, settings: ApiSettings | None = None) -> tuple[TestClient, list[dict]]:
    sent: list[dict] = []

    async def record(request: httpx.Request) -> httpx.Response:
        sent.append({"url": str(request.url), "body": json.loads(request.content)})
        return await handler(request)

    chorus = Chorus.from_dir(config)
    proxy = ModelProxy(chorus, client=httpx.AsyncClient(transport=httpx.MockTransport(record)))
    return TestClient(create_app(chorus, settings or ApiSettings(), proxy=proxy), base_url=LOCAL), sent


def _ssl_context(client: httpx.AsyncClient) -> ssl.SSLContext:
    return client._transport._pool._ssl_context  # type: ignore[attr-defined]  # httpx keeps it on the pool


def test_plain_http_upstreams_load_no_ca_store_and_https_ones_verify_certificates(config: Path) -> None:
    """Loading the CA store cost 20-90 ms of CPU in every `create_app` (and every launcher client)."""
    from launcher.process.client import GenerationClient

    proxy = ModelProxy(Chorus.from_dir(config))
    launcher = GenerationClient()
    for client_for in (proxy._client, launcher.http):
        plain = _ssl_context(client_for("http://127.0.0.1:8080/v1/chat/completions"))
        assert plain.cert_store_stats()["x509_ca"] == 0
        tls = _ssl_context(client_for("https://models.example/v1/chat/completions"))
        assert tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
        assert tls.cert_store_stats()["x509_ca"] > 0
    asyncio.run(proxy.aclose())
    asyncio.run(launcher.aclose())


def test_a_server_has_a_fixed_http_thread_for_every_connection_chorus_may_hold_to_it(
        config: Path, tmp_path: Path) -> None:
    """cpp-httplib serves a kept-alive connection on one thread; a new connection that found none idle waited
    until another closed: 10-13 s through the proxy's pooled connections (bench/api_load.py, K=16)."""
    from launcher.process.client import GenerationClient
    from launcher.process.server import HTTP_THREADS, ModelServer, ServerOptions, ServerSpec

    argv = ModelServer(ServerSpec("m", tmp_path / "m.gguf"), Path("llama-server"), tmp_path).command(8080)
    assert argv[argv.index("--threads-http") + 1] == str(HTTP_THREADS)
    proxy, engine = ModelProxy(Chorus.from_dir(config)), GenerationClient()
    pools = [client._transport._pool for client in (proxy._client("http://127.0.0.1:1/v1"),  # type: ignore[attr-defined]
                                                    engine.http("http://127.0.0.1:1/v1"))]
    assert sum(pool._max_connections for pool in pools) <= HTTP_THREADS
    asyncio.run(proxy.aclose())
    asyncio.run(engine.aclose())
    own = ServerSpec("m", tmp_path / "m.gguf", extra_args=("--threads-http", "8"))
    argv = ModelServer(own, Path("llama-server"), tmp_path).command(8080)
    assert argv.count("--threads-http") == 1 and argv[-2:] == ["--threads-http", "8"]  # models.yaml's own wins
    capped = ServerOptions(rlimit_as_bytes=2**30)  # 128 stacks would reserve all of it: the server's default
    assert "--threads-http" not in ModelServer(ServerSpec("m", tmp_path / "m.gguf"), Path("llama-server"),
                                               tmp_path, capped).command(8080)


def test_model_requests_beyond_the_limit_wait_in_the_servers_queue_and_one_more_than_the_queue_is_429(
        config: Path) -> None:
    """The server's own queue hands a freed slot over at once; chorus keeps the bound (limit + queue)."""
    at_upstream = [0, 0]  # now, most at once

    async def slow(request: httpx.Request) -> httpx.Response:
        at_upstream[0] += 1
        at_upstream[1] = max(at_upstream[1], at_upstream[0])
        await asyncio.sleep(0.6)
        at_upstream[0] -= 1
        return httpx.Response(200, json={"model": "x", "object": "chat.completion",
                                         "choices": [{"message": {"role": "assistant", "content": "Hi"}}]})

    client, sent = proxied_client(config, slow, ApiSettings(max_runs=1, max_queue=2))
    statuses: list[int] = []
    with client:
        threads = [threading.Thread(target=lambda: statuses.append(
            client.post("/v1/chat/completions", json=chat("alpha")).status_code)) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        health = client.get("/health").json()
        refused = client.post("/v1/chat/completions", json=chat("alpha"))
        for t in threads:
            t.join()
    assert at_upstream[1] == 3  # all three at the server at once: one going, two in its queue
    assert (health["runs"], health["queued"]) == (1, 2)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert statuses == [200, 200, 200]


def test_a_model_request_is_forwarded_as_sent_and_answered_under_its_name(config: Path) -> None:
    async def upstream(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("stream"):
            lines = [json.dumps({"model": "upstream-name", "choices": [{"delta": {"content": w}}]})
                     for w in ("Hel", "lo")]
            return httpx.Response(200, text="".join(f"data: {x}\n\n" for x in [*lines, "[DONE]"]),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"model": "upstream-name", "object": "chat.completion",
                                         "choices": [{"message": {"role": "assistant", "content": "Hello"}}]})

    client, sent = proxied_client(config, upstream)
    with client:
        r = client.post("/v1/chat/completions", json=chat("alpha", temperature=0.1, top_k=5))
        s = client.post("/v1/chat/completions", json=chat("alpha", stream=True))
    assert r.status_code == 200 and r.json()["model"] == "alpha"
    assert sent[0]["url"] == "http://upstream.test/v1/chat/completions"
    assert sent[0]["body"]["top_k"] == 5 and sent[0]["body"]["temperature"] == 0.1  # llama-server's own fields too
    chunks = sse_items(s.text)
    assert chunks[-1] == "[DONE]"
    assert {c["model"] for c in chunks[:-1]} == {"alpha"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == "Hello"


def test_an_upstream_that_drops_the_connection_is_502_naming_the_model(config: Path) -> None:
    async def upstream(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    client, _ = proxied_client(config, upstream)
    with client:
        r = client.post("/v1/chat/completions", json=chat("beta"))
        assert client.app.state.limiter.active == 0  # the slot is given back on failure
    assert r.status_code == 502
    assert r.json()["error"]["model"] == "beta" and "beta" in r.json()["error"]["message"]


def test_an_upstream_error_status_is_passed_on(config: Path) -> None:
    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "context too long", "type": "invalid_request_error"}})

    client, _ = proxied_client(config, upstream)
    with client:
        r = client.post("/v1/chat/completions", json=chat("alpha", stream=True))
    assert r.status_code == 400 and r.json()["error"]["message"] == "context too long"


# ---------------------------------------------------------------- integration: a real `chorus api` process

TINY = """\
name: tiny
description: "a draft, then a synthesis: 8 tokens a call"
defaults: {temperature: 0, seed: 1, max_tokens: 8, n_ctx: 1024}
stages:
  - name: draft
    models: [gemma3-270m]
    prompt: "Question: {{ question }}\\nAnswer:"
  - name: final
    models: [gemma3-270m]
    prompt: "Question: {{ question }}\\nDraft: {{ previous }}\\nBetter answer:"
    aggregation:
      type: synthesis
      synthesis_model: gemma3-270m
      synthesis_prompt: "Question: {{ question }}\\nAnswer: {{ responses[0].text }}\\nFinal answer:"
"""
LONG = """\
name: long
defaults: {temperature: 0.8, max_tokens: 2000, n_ctx: 4096}
stages:
  - name: story
    models: [gemma3-270m]
    prompt: "Write a very long story about {{ question }}.\\n\\nChapter 1\\n"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiProcess:
    """`chorus api` as a user starts it, stopped (Ctrl-C, then SIGKILL) at the end."""

    def __init__(self, config: ConfigDir, *extra: str) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
        env["CHORUS_ADMISSION_LEDGER"] = str(config.path.parent / "admission.json")
        # a file, not a pipe: a pipe nobody reads fills up (64 KiB of log lines) and then blocks the API
        self.log = config.path.parent / f"api-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir",
                                          str(config.path), "--port", str(self.port), *extra],
                                         cwd=REPO, env=env, start_new_session=True,
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chorus api exited {self.proc.returncode}: {self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("chorus api did not answer /health in time")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> Any:
        # generous timeout: on a shared 2-core machine a 3-call pipeline has taken 45 s
        import openai  # here, not at the top: 0.8 s that every xdist worker of the fast tier paid to collect

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: exits 0 once uvicorn and its servers stopped
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def running_servers(self) -> list[Any]:
        from launcher.process.state import list_running

        return list_running(self.config.path.parent / "logs" / "running")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, second_model: Path,
        llama_server_bin: Path) -> Iterator[ApiProcess]:
    """One `chorus api` on the demo model for the module: a tiny pipeline, a long one, and a model entry
    too large for the memory budget (the 503 case)."""
    root = tmp_path_factory.mktemp("api")
    models = root / "models"
    models.mkdir()
    (models / demo_model.name).symlink_to(demo_model)
    (models / second_model.name).symlink_to(second_model)  # the base pipeline uses both demo models
    config = ConfigDir(root, models)
    config.write_app(models_dir=str(models), sessions_dir=str(config.sessions_dir), logs_dir=str(root / "logs"),
                     server={"memory_budget_mib": 2048, "idle_timeout_s": 300})
    entries = config.models()
    entries["models"]["huge"] = {**entries["models"]["gemma3-270m"], "default_n_ctx": 1048576}
    config.write_models(entries)
    (config.path / "pipelines").mkdir()
    (config.path / "pipelines" / "tiny.yaml").write_text(TINY)
    (config.path / "pipelines" / "long.yaml").write_text(LONG)
    process = ApiProcess(config, "--max-runs", "3")
    yield process
    assert process.stop() == 0
    assert process.running_servers() == []  # stopping `chorus api` stopped its llama-servers


def load_session(api: ApiProcess, session_id: str) -> Any:
    return SessionStore(api.config.sessions_dir).load(session_id)


@pytest.mark.integration
def test_real_models_lists_the_pipelines_and_the_demo_model(api: ApiProcess) -> None:
    ids = [m.id for m in api.client().models.list()]
    assert {"chorus/base", "chorus/tiny", "chorus/long", "gemma3-270m"} <= set(ids)


@pytest.mark.integration
def test_real_pipeline_answer_is_saved_in_history(api: ApiProcess) -> None:
    reply = api.client().chat.completions.create(
        model="chorus/tiny", messages=[{"role": "user", "content": "What is the capital of France?"}])
    chorus = reply.model_extra["chorus"]
    session = load_session(api, chorus["session_id"])
    assert reply.choices[0].message.content == session.final
    assert session.meta["status"] == "completed" and chorus["status"] == "completed"
    assert reply.usage.completion_tokens > 0


@pytest.mark.integration
def test_real_pipeline_answer_streams_the_final_stage(api: ApiProcess) -> None:
    stream = api.client().chat.completions.create(
        model="chorus/tiny", stream=True, messages=[{"role": "user", "content": "Name a large animal."}])
    content, events = "", []
    for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
        if (chunk.model_extra or {}).get("chorus"):
            events.append(chunk.model_extra["chorus"])
    session = load_session(api, events[0]["session_id"])
    assert content == session.final and content.strip()
    assert [e["stage"] for e in events if e["type"] == "stage_finished"] == ["draft", "final"]
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "completed"


@pytest.mark.integration
def test_real_model_is_proxied_to_its_warm_llama_server(api: ApiProcess) -> None:
    client = api.client()
    reply = client.chat.completions.create(model="gemma3-270m", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello."}])
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma3-270m", prompt="The sky is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert reply.model == "gemma3-270m" and reply.choices[0].message.content
    assert text.strip()
    servers = [s for s in api.running_servers() if s.model == "gemma3-270m" and s.n_ctx == 4096]
    assert len(servers) == 1  # one server for both requests, still warm after them


@pytest.mark.integration
def test_real_error_cases_in_openai_shape(api: ApiProcess) -> None:
    import openai

    client = api.client()
    ask = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="chorus/nope", messages=ask)
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="chorus/tiny", messages=ask, temperature=-1)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chorus/tiny", messages=[{"role": "system", "content": "x"}])
    for stream in (False, True):  # the server is leased before a response starts: 503 either way
        with pytest.raises(openai.InternalServerError) as no_memory:
            client.chat.completions.create(model="huge", messages=ask, max_tokens=4, stream=stream)
        error = no_memory.value.body
        assert no_memory.value.status_code == 503 and error["code"] == "insufficient_memory"
        assert any(need > error["have"].get(device, 0) for device, need in error["need"].items()), error
    assert not_found.value.body["code"] == "model_not_found"
    assert invalid.value.body["param"] == "temperature"
    assert "no user message" in bad.value.body["message"]


@pytest.mark.integration
def test_real_client_that_disconnects_cancels_its_run(api: ApiProcess) -> None:
    """It was flaky (2 of 4 full runs: still 'running' 30 s after the disconnect): the stream's pending read
    was left running when the client left, so the run was cancelled only when the garbage collector closed
    the stream; and the API's log went to a pipe nobody read, which blocks the API once it is full."""
    body = {"model": "chorus/long", "stream": True, "messages": [{"role": "user", "content": "a dragon"}]}
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                first = json.loads(line[6:])
                break
    session_id = first["chorus"]["session_id"]  # the connection is closed here, long before 2000 tokens
    deadline = time.monotonic() + 10
    while load_session(api, session_id).meta["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    session = load_session(api, session_id)
    assert session.meta["status"] == "cancelled"
    assert httpx.get(f"{api.url}/health").json()["runs"] == 0  # its run slot is free again


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_real_client_that_leaves_a_model_request_stops_its_generation(api: ApiProcess, stream: bool) -> None:
    """The connection to llama-server is closed when the client leaves, so the server stops generating
    (it cancels a request whose connection closed) instead of running on to max_tokens for nobody, and the
    place is given back at once."""
    import psutil

    body = {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True,
            "temperature": 0.8, "stream": stream}
    httpx.post(f"{api.url}/v1/completions", json={**body, "max_tokens": 2, "stream": False},
               timeout=120).raise_for_status()
    server = psutil.Process(next(s.pid for s in api.running_servers() if s.model == "gemma3-270m"))
    if stream:
        with httpx.stream("POST", f"{api.url}/v1/completions", json=body, timeout=60) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]  # it was generating when the client left
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{api.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=2.0))
    deadline = time.monotonic() + 15
    while httpx.get(f"{api.url}/health").json()["runs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{api.url}/health").json()["runs"] == 0  # its place is given back
    time.sleep(1.5)  # llama-server looks at the connection of a non-streamed request once a second
    server.cpu_percent()
    time.sleep(2.0)
    assert server.cpu_percent() < 25, "the model server is still generating for a client that left"


@pytest.mark.integration
@pytest.mark.parametrize("model", ["smollm2-135m", "chorus/tiny"])
def test_real_client_that_leaves_a_stream_gives_its_place_back_at_once(api: ApiProcess, model: str) -> None:
    """Leaving between two chunks: the chunk being read is cancelled and the stream closed there and then
    (it was left running, so closing it failed with a logged traceback and the place stayed taken until the
    garbage collector found the stream, seconds or minutes later)."""
    ask = {"model": model, "messages": [{"role": "user", "content": "Write a long story about a cat."}]}
    api.client().chat.completions.create(**ask, max_tokens=2)  # warm: the server is up
    errors_before = api.log_text().count("Exception in ASGI application")
    for _ in range(3):
        with httpx.stream("POST", f"{api.url}/v1/chat/completions", json={**ask, "stream": True, "max_tokens": 200},
                          timeout=60) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        left = time.monotonic()
        while httpx.get(f"{api.url}/health").json()["runs"] and time.monotonic() - left < 3.0:
            time.sleep(0.05)
        assert httpx.get(f"{api.url}/health").json()["runs"] == 0, "the place of a client that left is still held"
    assert api.log_text().count("Exception in ASGI application") == errors_before, api.log_text()[-3000:]


@pytest.mark.integration
def test_real_client_that_leaves_the_queue_gives_up_its_place(api: ApiProcess) -> None:
    """Nobody listens for a disconnect while a request waits for its place: it stayed queued, took a place
    that a later client was refused, and ran once its turn came, for nobody."""
    one = ApiProcess(api.config, "--max-runs", "1", "--max-queue", "2")
    try:
        holding = {"model": "chorus/long", "stream": True, "messages": [{"role": "user", "content": "a ship"}]}
        with httpx.stream("POST", f"{one.url}/v1/chat/completions", json=holding, timeout=120) as response:
            lines = response.iter_lines()  # kept: a line iterator dropped half-read closes the connection
            next(line for line in lines if line.startswith("data: "))  # the one place is taken
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{one.url}/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
                           json={"model": "chorus/tiny", "messages": [{"role": "user", "content": "abandoned"}]})
            left = time.monotonic()
            while httpx.get(f"{one.url}/health").json()["queued"] and time.monotonic() - left < 3.0:
                time.sleep(0.05)
            health = httpx.get(f"{one.url}/health").json()
            assert (health["runs"], health["queued"]) == (1, 0), health
        left = time.monotonic()
        while httpx.get(f"{one.url}/health").json()["runs"] and time.monotonic() - left < 30:
            time.sleep(0.1)
        time.sleep(1.0)  # had it stayed in the queue, its run would begin now
        assert not [s for s in SessionStore(api.config.sessions_dir).list() if s["question"] == "abandoned"]
    finally:
        assert one.stop() == 0


@pytest.mark.integration
def test_real_two_clients_at_once(api: ApiProcess) -> None:
    answers: dict[str, Any] = {}

    def ask(question: str) -> None:
        answers[question] = api.client().chat.completions.create(
            model="chorus/tiny", messages=[{"role": "user", "content": question}])

    threads = [threading.Thread(target=ask, args=(q,)) for q in ("Name a fruit.", "Name a colour.")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    sessions = {a.model_extra["chorus"]["session_id"] for a in answers.values()}
    assert len(answers) == 2 and len(sessions) == 2
    for reply in answers.values():
        session = load_session(api, reply.model_extra["chorus"]["session_id"])
        assert session.meta["status"] == "completed" and reply.choices[0].message.content == session.final


@pytest.mark.integration
def test_real_model_server_that_will_not_start_is_502_naming_the_model(config_dir: ConfigDir,
                                                                      llama_server_bin: Path) -> None:
    broken = config_dir.path.parent / "llama-server"
    broken.write_text("#!/bin/sh\necho 'error: simulated start failure' >&2\nexit 3\n")
    broken.chmod(0o755)
    config_dir.write_app(llama_server=str(broken))
    process = ApiProcess(config_dir)
    import openai

    try:
        with pytest.raises(openai.APIStatusError) as failed:
            process.client().chat.completions.create(model="gemma3-270m", max_tokens=4,
                                                     messages=[{"role": "user", "content": "hi"}])
    finally:
        assert process.stop() == 0
    assert failed.value.status_code == 502
    assert failed.value.body["model"] == "gemma3-270m" and "gemma3-270m" in failed.value.body["message"]
    assert failed.value.body["chorus_type"] == "ServerStartError"
