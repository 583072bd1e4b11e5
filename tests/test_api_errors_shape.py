"""Every error of `chorus api` in OpenAI's shape, `{"error": {message, type, param, code}}`, with the status an
OpenAI client acts on (it retries 5xx: a request's own fault must never be one).

Fast tests: the app in-process on the fake backend, or on a mock llama-server for a proxied model. Integration
tests: a real `chorus api` on the demo models, for llama-server's own error bodies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import context_overflow, status_of, upstream_error
from api.schemas import ChatRequest
from api.settings import ApiSettings
from launcher.errors import RequestFailed
from orchestrator.app import Chorus
from orchestrator.engine.fake import FakeBackend, Script
from orchestrator.records import ErrorInfo
from tests import yamlfile
from tests.conftest import ConfigDir
from tests.test_api import (
    BASE_PIPELINE,
    LOCAL,
    ApiProcess,
    chat,
    make_client,
    proxied_client,
    remote_config,
    sse_items,
)

# llama-server's own error bodies (b0-chorus-lcp0.3.36), as it sends them
TOOLS_500 = {"error": {"code": 500, "message": "Failed to parse tools: Missing tool function: {\"type\":\"function\"}",
                       "type": "server_error"}}
OVERFLOW_400 = {"error": {"code": 400, "message": "request (424 tokens) exceeds the available context size (256 "
                          "tokens), try increasing it", "type": "exceed_context_size_error",
                          "n_prompt_tokens": 424, "n_ctx": 256}}
FORMAT_400 = {"error": {"code": 400, "message": "response_format type must be one of \"text\" or \"json_object\", "
                        "but got: bogus", "type": "invalid_request_error"}}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Two remote models (no server), the base pipeline, `two` (one stage) and `broken` (an unknown model)."""
    return remote_config(tmp_path, {"alpha": {"url": "http://upstream.test/v1"},
                                    "beta": {"url": "http://upstream.test/v1"},
                                    "deadremote": {"url": "http://127.0.0.1:9/v1"}}, BASE_PIPELINE,
                         {"two": {"stages": [{"name": "only", "models": ["alpha"]}]},
                          "broken": {"stages": [{"name": "x", "models": ["nosuchmodel"]}]}})


def assert_openai_shape(error: dict[str, Any]) -> None:
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error


def replying(status: int, body: dict[str, Any]) -> Any:
    async def upstream(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    return upstream


# ---------------------------------------------------------------- 1. a proxied model's errors

@pytest.mark.parametrize(("tools", "param"), [
    ("x", "tools"),
    ([{"type": "function"}], "tools.0.function"),
    ([{"type": "function", "function": {}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": ""}}], "tools.0.function.name"),
    ([{"type": "nope", "function": {"name": "f"}}], "tools.0.type"),
    ([5], "tools.0"),
])
@pytest.mark.parametrize("model", ["alpha", "chorus/two"])
def test_malformed_tools_are_refused_before_any_model_sees_them(config: Path, tools: Any, param: str,
                                                                model: str) -> None:
    client, sent = proxied_client(config, replying(500, TOOLS_500))
    with client:
        r = client.post("/v1/chat/completions", json=chat(model, tools=tools))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert_openai_shape(error)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert sent == []  # never forwarded: llama-server answered it 500, which the openai package retries


def test_well_formed_tools_are_forwarded_as_sent(config: Path) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True},
            "x-vendor": 1}
    ok = {"object": "chat.completion", "model": "x", "choices": [{"message": {"role": "assistant", "content": "Hi"}}]}
    client, sent = proxied_client(config, replying(200, ok))
    with client:
        r = client.post("/v1/chat/completions", json=chat("alpha", tools=[tool], tool_choice="auto"))
    assert r.status_code == 200, r.text
    assert sent[0]["body"]["tools"] == [tool] and sent[0]["body"]["tool_choice"] == "auto"


def test_offered_tools_are_still_listed_as_ignored_by_a_pipeline_and_a_demanded_call_refused(config: Path) -> None:
    tool = {"type": "function", "function": {"name": "search"}}
    with make_client(config, FakeBackend(default=Script("hi"))) as client:
        offered = client.post("/v1/chat/completions", json=chat("chorus/two", tools=[tool]))
        demanded = client.post("/v1/chat/completions", json=chat("chorus/two", tools=[tool], tool_choice="required"))
    assert offered.status_code == 200 and offered.json()["chorus"]["ignored"] == ["tools"]
    assert demanded.status_code == 400 and demanded.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("status", "body", "expect"), [
    (500, TOOLS_500, (400, "invalid_request_error", "tools", "invalid_request")),
    (500, {"error": {"code": 500, "message": "Failed to parse messages: Missing tool call type: \"x\"",
                     "type": "server_error"}}, (400, "invalid_request_error", "messages", "invalid_request")),
    (500, {"error": {"code": 500, "message": "image input is not supported - hint: if this is unexpected, you may "
                     "need to provide the mmproj", "type": "server_error"}},
     (400, "invalid_request_error", "messages", "invalid_request")),
    (400, OVERFLOW_400, (400, "invalid_request_error", "messages", "context_length_exceeded")),
    (400, FORMAT_400, (400, "invalid_request_error", "response_format", "invalid_request")),
    (400, {"error": {"code": 400, "message": "Failed to initialize samplers: failed to parse grammar",
                     "type": "invalid_request_error"}}, (400, "invalid_request_error", "grammar", "invalid_request")),
    (400, {"error": {"code": 400, "message": "Field 'n_probs': [json.exception.type_error.302] type must be number",
                     "type": "invalid_request_error"}}, (400, "invalid_request_error", "n_probs", "invalid_request")),
    (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
     (503, "server_error", None, "model_server_unavailable")),
    (500, {"error": {"code": 500, "message": "something broke", "type": "server_error"}},
     (500, "server_error", None, "model_server_error")),
])
def test_a_proxied_models_error_keeps_its_status_in_openais_shape(config: Path, stream: bool, status: int,
                                                                   body: dict, expect: tuple) -> None:
    client, _ = proxied_client(config, replying(status, body))
    with client:
        r = client.post("/v1/chat/completions", json=chat("alpha", stream=stream))
        assert client.app.state.limiter.active == 0
    error = r.json()["error"]
    assert_openai_shape(error)
    assert (r.status_code, error["type"], error["param"], error["code"]) == expect
    assert error["message"] == body["error"]["message"]
    assert error["model"] == "alpha"


def test_a_proxied_context_overflow_keeps_llama_servers_counts(config: Path) -> None:
    client, _ = proxied_client(config, replying(400, OVERFLOW_400))
    with client:
        chat_error = client.post("/v1/chat/completions", json=chat("alpha")).json()["error"]
        text_error = client.post("/v1/completions", json={"model": "alpha", "prompt": "x"}).json()["error"]
    assert (chat_error["n_prompt_tokens"], chat_error["n_ctx"]) == (424, 256)
    assert (chat_error["param"], text_error["param"]) == ("messages", "prompt")


def test_an_openai_compatible_remote_keeps_its_own_code_and_param(config: Path) -> None:
    body = {"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}}
    client, _ = proxied_client(config, replying(400, body))
    with client:
        r = client.post("/v1/chat/completions", json=chat("alpha"))
    assert r.status_code == 400
    assert r.json()["error"] | {"model": "alpha"} == body["error"] | {"model": "alpha"}


@pytest.mark.parametrize("data", [{"error": "plain text"}, {"detail": "Not Found"}, [1, 2], "text"])
def test_an_upstream_error_of_any_shape_becomes_openais(data: Any) -> None:
    status, body = upstream_error(404, data, model="alpha", route="chat/completions")
    assert status == 404
    assert_openai_shape(body["error"])
    assert body["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- 2. a pipeline's context overflow

def overflowed(model: str = "alpha") -> RequestFailed:
    """What launcher/process/client.py raises for llama-server's 400 on a prompt over the context."""
    return RequestFailed(model, f"HTTP 400 from http://127.0.0.1:40000/v1/chat/completions: {json.dumps(OVERFLOW_400)}")


def test_a_pipeline_prompt_over_the_context_is_400_not_a_retried_502(config: Path) -> None:
    backend = FakeBackend().script("alpha", overflowed())
    with make_client(config, backend) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/two"))
        streamed = client.post("/v1/chat/completions", json=chat("chorus/two", stream=True))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert_openai_shape(error)
    assert (error["type"], error["code"]) == ("invalid_request_error", "context_length_exceeded")
    assert error["model"] == "alpha" and "context" in error["hint"]
    items = sse_items(streamed.text)
    assert items[-1] == "[DONE]" and items[-2]["error"]["code"] == "context_length_exceeded"


def test_context_overflow_is_recognised_in_every_form_a_run_records() -> None:
    llama = overflowed()
    assert context_overflow(llama) and status_of(llama).http == 400
    assert status_of(ErrorInfo.of(llama)).code == "context_length_exceeded"
    synthesis = ErrorInfo("SynthesisFailed", f"synthesis by 'alpha' failed: {llama.message}")
    assert status_of(synthesis).http == 400
    remote = RequestFailed("r", 'HTTP 400 from https://api.example/v1/chat/completions: {"error": {"message": '
                                '"too long", "code": "context_length_exceeded"}}')
    assert status_of(remote).http == 400
    for other in (RequestFailed("a", "HTTP 401 from http://x/v1: no key"),
                  RequestFailed("a", "HTTP 500 from http://x/v1: the context size is 4096, slot crashed")):
        assert status_of(other).http == 502, other
    assert status_of(ErrorInfo("ServerCrashed", "exceeds the available context size")).http == 502  # not a 400


# ---------------------------------------------------------------- 3. a blocked pipeline says which

def test_a_blocked_pipeline_is_named_not_called_the_base_pipeline(config: Path) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/broken"))
        base = client.post("/v1/chat/completions", json=chat("chorus/base"))
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "the pipeline 'broken' is blocked: nosuchmodel (not defined in models.yaml)" in message, message
    assert "base pipeline" not in message
    assert base.status_code == 200  # the base pipeline itself is fine


def test_a_blocked_base_pipeline_is_still_called_the_base_pipeline(config: Path) -> None:
    (config / "pipeline.yaml").write_text(yamlfile.dump({"stages": [{"name": "x", "models": ["nosuchmodel"]}]}))
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/base"))
    assert r.status_code == 404 and "the base pipeline is blocked: nosuchmodel" in r.json()["error"]["message"]


# ---------------------------------------------------------------- 4. a remote that cannot be reached

def test_an_unreachable_remote_says_it_could_not_connect(config: Path) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", json=chat("deadremote"))
    assert r.status_code == 502
    error = r.json()["error"]
    assert "could not connect to the remote endpoint" in error["message"], error
    assert "crashed" not in error["message"] and "restarted" not in (error.get("hint") or "")


# ---------------------------------------------------------------- 5. the request's own errors

@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": "chorus/two", "messages": [{"role": "user", "content": 5}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "chorus/two", "messages": [{"role": "user", "content": [5]}]},
     "messages.0.content.0"),
    ("/v1/chat/completions", chat("chorus/two", stop=5), "stop"),
    ("/v1/chat/completions", chat("chorus/two", stop=[5]), "stop.0"),
    ("/v1/chat/completions", chat("chorus/two", stop=["s"] * 17), "stop"),
    ("/v1/chat/completions", chat("chorus/two", stream_options=5), "stream_options"),
    ("/v1/chat/completions", chat("chorus/two", reasoning_format="x"), "reasoning_format"),
    ("/v1/chat/completions", {"model": "chorus/two", "messages": [{"role": "robot", "content": "hi"}]},
     "messages.0.role"),
    ("/v1/completions", {"model": "chorus/two", "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": "chorus/two", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "chorus/two", "prompt": [5]}, "prompt.0"),
])
def test_a_wrong_type_names_the_field_not_pydantics_union_branch(config: Path, path: str, body: dict,
                                                                 param: str) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert_openai_shape(error)
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize("content", [b'{"model": "chorus/two", "messages": [', b"{not json", b"",
                                     b'{"model": "chorus/two", "messages": [{"role": "user", "content": "\xff"}]}'])
def test_a_body_that_is_not_json_is_400_invalid_json_without_a_param(config: Path, content: bytes) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    if not content:  # no body at all: the fields are missing
        assert r.status_code == 422 and r.json()["error"]["param"] is None
        return
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert_openai_shape(error)
    assert (error["code"], error["param"]) == ("invalid_json", None)
    assert error["message"].startswith("the request body is not valid JSON")


@pytest.mark.parametrize("prompt", ["", "   ", [""]])
def test_an_empty_prompt_names_the_prompt_without_a_cli_hint(config: Path, prompt: Any) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/completions", json={"model": "chorus/two", "prompt": prompt})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "prompt" and "empty" in error["message"]
    assert "chorus run" not in json.dumps(error)


def test_an_empty_question_names_the_messages_without_a_cli_hint(config: Path) -> None:
    with make_client(config, FakeBackend()) as client:
        r = client.post("/v1/chat/completions", json=chat("chorus/two", question=" "))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "chorus run" not in r.text


def test_the_request_models_parse_what_they_did_before() -> None:
    request = ChatRequest.model_validate(chat("m", stop="END", tools=[{"type": "function", "function": {"name": "f"}}]))
    assert request.stop == ["END"] and request.ignored() == ["tools"]
    assert request.wire()["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert "tools" not in ChatRequest.model_validate(chat("m")).wire()


# ---------------------------------------------------------------- 6. `created` is stable and the same

def test_created_is_stable_and_the_same_in_the_list_and_for_one_model(config: Path) -> None:
    os.utime(config / "pipelines" / "two.yaml", (1_700_000_000, 1_700_000_000))
    os.utime(config / "models.yaml", (1_600_000_000, 1_600_000_000))
    with make_client(config, FakeBackend()) as client:
        first = {m["id"]: m["created"] for m in client.get("/v1/models").json()["data"]}
        second = {m["id"]: m["created"] for m in client.get("/v1/models").json()["data"]}
        one = {model: client.get(f"/v1/models/{model}").json()["created"] for model in first}
    assert first == second == one
    assert first["chorus/two"] == 1_700_000_000 and first["alpha"] == 1_600_000_000
    assert all(isinstance(c, int) and c > 0 for c in first.values())


def test_created_is_stable_without_a_models_file(config: Path) -> None:
    chorus = Chorus.from_dir(config)
    (config / "models.yaml").unlink()  # read at start; gone since
    with TestClient(create_app(chorus, ApiSettings()), base_url=LOCAL) as client:
        listed = {m["id"]: m["created"] for m in client.get("/v1/models").json()["data"]}
        one = client.get("/v1/models/alpha").json()["created"]
    assert listed["alpha"] == one > 0


# ---------------------------------------------------------------- integration: llama-server's own bodies

PROMPT_OVER_4096 = "word " * 6000
OVERFLOW = """\
name: overflow
defaults: {temperature: 0, max_tokens: 4}
stages:
  - name: only
    models: [smollm2-135m]
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, second_model: Path,
           llama_server_bin: Path) -> Iterator[ApiProcess]:
    root = tmp_path_factory.mktemp("api-errors")
    models = root / "models"
    models.mkdir()
    for model in (demo_model, second_model):
        (models / model.name).symlink_to(model)
    config = ConfigDir(root, models)
    config.write_app(models_dir=str(models), sessions_dir=str(config.sessions_dir), logs_dir=str(root / "logs"),
                     server={"memory_budget_mib": 2048, "idle_timeout_s": 300})
    (config.path / "pipelines").mkdir()
    (config.path / "pipelines" / "overflow.yaml").write_text(OVERFLOW)
    process = ApiProcess(config)
    yield process
    assert process.stop() == 0


@pytest.mark.integration
def test_real_pipeline_prompt_over_the_context_is_400_once(served: ApiProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=300)  # its default retries
    before = set(served.config.sessions_dir.glob("session_*")) if served.config.sessions_dir.exists() else set()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="chorus/overflow",
                                       messages=[{"role": "user", "content": PROMPT_OVER_4096}])
    error = refused.value.body
    assert (error["type"], error["code"]) == ("invalid_request_error", "context_length_exceeded"), error
    assert error["model"] == "smollm2-135m"
    sessions = set(served.config.sessions_dir.glob("session_*")) - before
    assert len(sessions) == 1  # one failed run: not retried three times


@pytest.mark.integration
def test_real_proxied_model_errors_in_openais_shape(served: ApiProcess) -> None:
    import openai

    client = served.client()
    ask = [{"role": "user", "content": "hi"}]
    for tools in ("x", [{"type": "function"}]):
        with pytest.raises(openai.UnprocessableEntityError) as bad_tools:
            client.chat.completions.create(model="smollm2-135m", messages=ask, max_tokens=2, tools=tools)
        assert bad_tools.value.body["param"].startswith("tools"), bad_tools.value.body
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model="smollm2-135m", max_tokens=2, stream=stream,
                                           messages=[{"role": "user", "content": PROMPT_OVER_4096}])
        error = too_long.value.body
        assert_openai_shape(error)
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error", "context_length_exceeded", "messages"), error
        with pytest.raises(openai.BadRequestError) as bad_format:
            client.chat.completions.create(model="smollm2-135m", messages=ask, max_tokens=2, stream=stream,
                                           response_format={"type": "bogus"})  # type: ignore[arg-type]
        error = bad_format.value.body
        assert_openai_shape(error)
        assert (error["type"], error["param"]) == ("invalid_request_error", "response_format"), error
    raw = httpx.post(f"{served.url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2-135m", "messages": ask, "max_tokens": 2,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "g"}}})  # a shape chorus passes; the server may refuse
    assert raw.status_code < 500 or raw.json()["error"]["code"] != 500, raw.text
    if raw.status_code != 200:
        assert_openai_shape(raw.json()["error"])


def test_the_param_is_the_field_the_request_sent() -> None:
    schema = {"error": {"code": 400, "type": "invalid_request_error", "message": "Unable to generate parser for this "
                        "template. Automatic parser generation failed: JSON schema error at #: unrecognized type x"}}
    for sent, param in (({"messages", "response_format"}, "response_format"), ({"messages", "json_schema"},
                                                                               "json_schema"), (None, "json_schema")):
        _, body = upstream_error(400, schema, model="m", route="chat/completions", sent=sent)
        assert body["error"]["param"] == param


def test_an_error_event_in_a_proxied_stream_comes_in_openais_shape(config: Path) -> None:
    """llama-server sends an error met after its 200 (a context filled while generating, say) as an SSE event of
    its own shape: it is passed on as OpenAI's, like its error answers."""
    events = ('data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"model":"x","object":"chat.completion.chunk"}'
              '\n\ndata: {"error":{"code":400,"message":"the request exceeds the available context size, try '
              'increasing it","type":"exceed_context_size_error","n_prompt_tokens":90,"n_ctx":64}}\n\n')

    async def upstream(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=events.encode(), headers={"content-type": "text/event-stream"})

    client, _ = proxied_client(config, upstream)
    with client:
        r = client.post("/v1/chat/completions", json=chat("alpha", stream=True))
    assert r.status_code == 200
    items = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert items[0]["model"] == "alpha" and items[0]["choices"][0]["delta"]["content"] == "Hi"
    error = items[1]["error"]
    assert_openai_shape(error)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded",
                                                              "messages")
