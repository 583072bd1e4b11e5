"""A pipeline answer through `chorus api` shows its earlier stages as reasoning (`reasoning_content`).

Fast tests: the app on the fake backend behind a real uvicorn server on loopback, read with the official
`openai` package (reasoning is an extra field on its models: `model_extra`), streamed and not, chat and
text, on and off. Integration: the same on the real llama-server with the demo models, where the first
visible delta must come before the final stage starts.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.settings import ApiSettings
from launcher.process.client import Endpoint, GenerationRequest, GenerationResult
from orchestrator.app import Chorus
from orchestrator.config.schema import load_config, load_pipeline
from orchestrator.engine.backend import TokenCallback
from orchestrator.engine.fake import FakeBackend, Script, crash
from orchestrator.errors import ConfigError
from orchestrator.history.store import SessionStore
from orchestrator.rag.store import DocStore
from tests import yamlfile
from tests.conftest import ConfigDir
from tests.test_api import remote_config

if TYPE_CHECKING:  # imported where a client is made: 0.8 s that every xdist worker paid to collect
    import openai

PIPELINE = {
    "name": "base", "description": "draft, then two reviews merged by synthesis",
    "defaults": {"temperature": 0.7, "max_tokens": 50},
    "stages": [
        {"name": "draft", "models": ["alpha"], "prompt": "Q: {{ question }}"},
        {"name": "review", "models": [{"model": "alpha", "label": "facts"}, "beta"],
         "prompt": "Improve: {{ previous }}", "aggregation": {"type": "synthesis", "synthesis_model": "alpha"}},
    ],
}
SOLO = {"stages": [{"name": "only", "models": ["alpha"]}]}
QUESTION = "Why is the sky blue?"


def reply(request: GenerationRequest) -> str:
    """A different text per call: its system prompt and the start of its prompt."""
    return f"  said {request.system_prompt or '-'} to <{request.prompt[:24]}> and more  "


@dataclass
class Paced(FakeBackend):
    """The fake backend with one token every `token_s[model]` seconds (interleaving as real servers do)
    and a wait before a model's first call (`start_s[model]`, as a cold server's start)."""

    token_s: dict[str, float] = field(default_factory=dict)
    start_s: dict[str, float] = field(default_factory=dict)

    async def generate(self, endpoint: Endpoint, request: GenerationRequest,
                       on_token: TokenCallback | None = None) -> GenerationResult:
        if not any(model == endpoint.model for model, _ in self.requests):
            await asyncio.sleep(self.start_s.get(endpoint.model, 0.0))
        self.requests.append((endpoint.model, request))
        script = self.scripts.get(endpoint.model, self.default)
        text = script.reply(request) if callable(script.reply) else str(script.reply)
        for word in text.split(" "):
            await asyncio.sleep(self.token_s.get(endpoint.model, 0.0))
            if on_token is not None:
                on_token(word + " ")
        return GenerationResult(text=text, prompt_tokens=3, completion_tokens=len(text.split()), first_token_s=0.0,
                                total_s=0.01, finish_reason="stop", server_timings={})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Two remote models (no file, no server) and three pipelines: base (3 stages' worth of calls), solo,
    and quiet (base with the reasoning stream turned off in the file)."""
    quiet = {**PIPELINE, "name": "quiet", "defaults": {**PIPELINE["defaults"], "stream_reasoning": False}}
    return remote_config(tmp_path, {"alpha": {"url": "http://upstream.test/v1"},
                                    "beta": {"url": "http://upstream.test/v1"}}, PIPELINE,
                         {"solo": SOLO, "quiet": quiet})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The app behind a real uvicorn server on loopback, in a thread: a real HTTP stream, chunk by chunk."""

    def __init__(self, app: FastAPI) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def client(self) -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve(config: Path) -> Iterator[Callable[[FakeBackend], Served]]:
    """`serve(backend)`: the API on that fake backend, stopped after the test."""
    started: list[Served] = []

    def start(backend: FakeBackend) -> Served:
        app = create_app(Chorus.from_dir(config), ApiSettings(), backend_factory=lambda: backend)
        started.append(Served(app))
        return started[-1]

    yield start
    for served in started:
        served.stop()


@dataclass
class Read:
    """A stream as a client saw it: every visible piece in order, with when it came."""

    pieces: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, text, seconds after request)
    events: list[tuple[dict[str, Any], float]] = field(default_factory=list)  # the `chorus` records

    def text(self, kind: str) -> str:
        return "".join(t for k, t, _ in self.pieces if k == kind)

    def first(self, kind: str | None = None) -> float:
        return next(at for k, _, at in self.pieces if kind is None or k == kind)


def read_chat(client: openai.OpenAI, model: str, **fields: Any) -> Read:
    start = time.perf_counter()
    out = Read()
    for chunk in client.chat.completions.create(model=model, stream=True,
                                                messages=[{"role": "user", "content": QUESTION}], **fields):
        at = time.perf_counter() - start
        if chunk.choices:
            delta = chunk.choices[0].delta
            for kind, text in (("reasoning", (delta.model_extra or {}).get("reasoning_content")),
                               ("content", delta.content)):
                if text:
                    out.pieces.append((kind, text, at))
        if (chunk.model_extra or {}).get("chorus"):
            out.events.append((chunk.model_extra["chorus"], at))
    return out


def read_text(client: openai.OpenAI, model: str, **fields: Any) -> Read:
    out = Read()
    for chunk in client.completions.create(model=model, prompt=QUESTION, stream=True, **fields):
        if chunk.choices:
            choice = chunk.choices[0]
            for kind, text in (("reasoning", (choice.model_extra or {}).get("reasoning_content")),
                               ("content", choice.text)):
                if text:
                    out.pieces.append((kind, text, 0.0))
    return out


def expected_reasoning(config: Path, session_id: str, answer_label: str = "alpha-synthesis") -> str:
    """What the reasoning must say, from the saved session: each call but the answer's, under its header."""
    session = SessionStore(load_config(config).sessions_dir).load(session_id)
    names = {"alpha-synthesis": "synthesis (alpha)", "facts": "facts (alpha)"}
    blocks = []
    for stage in session.stages:
        for r in stage.responses:
            blocks.append(f"## {stage.name} · {names.get(r.label, r.label)}\n\n{r.text.strip()}")
    last = session.stages[-1].name
    return "\n\n".join(blocks) + f"\n\n## {last} · {names[answer_label]} → the answer\n\n"


def session_of(read: Read) -> str:
    return str(read.events[0][0]["session_id"])


def test_stream_sends_each_earlier_call_as_reasoning_under_its_header_then_the_answer(
        config: Path, serve: Callable[[FakeBackend], Served]) -> None:
    served = serve(FakeBackend(default=Script(reply)))
    read = read_chat(served.client(), "chorus/base")
    session = SessionStore(load_config(config).sessions_dir).load(session_of(read))
    kinds = [k for k, _, _ in read.pieces]
    assert kinds.index("content") == kinds.count("reasoning")  # every reasoning piece before the answer
    assert read.text("reasoning") == expected_reasoning(config, session.id)
    assert read.text("content") == session.final
    assert read.text("reasoning").startswith("## draft · alpha\n\nsaid - to <Q: Why is the sky blue?>")
    assert [e["stage"] for e, _ in read.events if e["type"] == "stage_finished"] == ["draft", "review"]


def test_non_streamed_answer_carries_the_same_reasoning_in_the_message(
        config: Path, serve: Callable[[FakeBackend], Served]) -> None:
    served = serve(FakeBackend(default=Script(reply)))
    answer = served.client().chat.completions.create(model="chorus/base",
                                                     messages=[{"role": "user", "content": QUESTION}])
    message = answer.choices[0].message
    chorus = answer.model_extra["chorus"]
    assert message.model_extra["reasoning_content"] == expected_reasoning(config, chorus["session_id"])
    assert message.content == SessionStore(load_config(config).sessions_dir).load(chorus["session_id"]).final
    assert chorus["ignored"] == []  # reasoning_format is a known field, never reported as ignored


def test_text_endpoint_carries_reasoning_beside_the_text_streamed_and_not(
        config: Path, serve: Callable[[FakeBackend], Served]) -> None:
    client = serve(FakeBackend(default=Script(reply))).client()
    read = read_text(client, "chorus/base")
    whole = client.completions.create(model="chorus/base", prompt=QUESTION)
    kinds = [k for k, _, _ in read.pieces]
    assert kinds.index("content") == kinds.count("reasoning")
    assert read.text("reasoning").startswith("## draft · alpha\n\n")
    assert read.text("reasoning").count("## ") == 4  # draft, two reviews, the synthesis that answers
    session_id = whole.model_extra["chorus"]["session_id"]
    assert whole.choices[0].model_extra["reasoning_content"] == expected_reasoning(config, session_id)
    assert whole.choices[0].text == SessionStore(load_config(config).sessions_dir).load(session_id).final


@pytest.mark.parametrize("endpoint", ["chat", "text"])
def test_reasoning_format_none_turns_the_reasoning_off_and_keeps_the_chorus_events(
        serve: Callable[[FakeBackend], Served], endpoint: str) -> None:
    client = serve(FakeBackend(default=Script(reply))).client()
    off = {"extra_body": {"reasoning_format": "none"}}
    if endpoint == "chat":
        read = read_chat(client, "chorus/base", **off)
        whole: Any = client.chat.completions.create(model="chorus/base", **off,
                                                    messages=[{"role": "user", "content": QUESTION}])
        extra = whole.choices[0].message.model_extra
        assert {e["type"] for e, _ in read.events} >= {"run_started", "stage_finished", "run_finished"}
    else:
        read = read_text(client, "chorus/base", **off)
        whole = client.completions.create(model="chorus/base", prompt=QUESTION, **off)
        extra = whole.choices[0].model_extra
    assert read.text("reasoning") == "" and read.text("content").startswith("said")
    assert "reasoning_content" not in (extra or {})


def test_the_pipeline_setting_turns_it_off_and_a_request_turns_it_back_on(
        serve: Callable[[FakeBackend], Served]) -> None:
    client = serve(FakeBackend(default=Script(reply))).client()
    quiet = read_chat(client, "chorus/quiet")
    asked = read_chat(client, "chorus/quiet", extra_body={"reasoning_format": "deepseek"})
    auto = read_chat(client, "chorus/quiet", extra_body={"reasoning_format": "auto"})
    assert quiet.text("reasoning") == "" and auto.text("reasoning") == ""  # auto: the pipeline decides
    assert asked.text("reasoning").startswith("## draft · alpha")
    assert quiet.text("content") and asked.text("content")


def test_a_pipeline_whose_only_call_answers_streams_no_reasoning(serve: Callable[[FakeBackend], Served]) -> None:
    client = serve(FakeBackend(default=Script(reply))).client()
    read = read_chat(client, "chorus/solo")
    whole = client.chat.completions.create(model="chorus/solo", messages=[{"role": "user", "content": QUESTION}])
    assert [k for k, _, _ in read.pieces] == ["content"] * len(read.pieces) and read.pieces
    assert "reasoning_content" not in (whole.choices[0].message.model_extra or {})


def test_parallel_calls_read_whole_under_their_headers_in_stage_order(
        config: Path, serve: Callable[[FakeBackend], Served]) -> None:
    """facts (slow) goes on air first; beta (fast) finishes behind it and is sent whole when facts ends."""
    backend = Paced(default=Script(reply), token_s={"alpha": 0.03, "beta": 0.002})
    read = read_chat(serve(backend).client(), "chorus/base")
    reasoning = read.text("reasoning")
    assert reasoning == expected_reasoning(config, session_of(read))
    facts, beta = reasoning.index("## review · facts (alpha)"), reasoning.index("## review · beta")
    assert facts < beta
    assert "## " not in reasoning[facts + 3:beta]  # nothing of beta's inside facts' block
    beta_piece = next(t for k, t, _ in read.pieces if k == "reasoning" and "## review · beta" in t)
    assert beta_piece.strip().endswith("and more")  # beta's text, held while facts was on air, sent whole


def test_the_first_visible_delta_is_the_first_calls_header_before_its_first_token(
        serve: Callable[[FakeBackend], Served]) -> None:
    """A slow start (a cold server) and long earlier stages do not delay it: it comes as the call starts."""
    backend = Paced(default=Script(lambda r: "word " * 30), start_s={"alpha": 1.5}, token_s={"alpha": 0.01})
    read = read_chat(serve(backend).client(), "chorus/base")
    first_kind, first_text, first_at = read.pieces[0]
    assert (first_kind, first_text) == ("reasoning", "## draft · alpha\n\n")
    second_at = read.pieces[1][2]  # the draft's first token, after its 1.5 s "server start"
    assert first_at < 1.0 <= second_at
    final_started = next(at for e, at in read.events if e["type"] == "stage_started" and e["stage"] == "review")
    assert first_at < final_started


def test_a_failed_call_is_said_in_the_reasoning_and_the_others_go_on(
        serve: Callable[[FakeBackend], Served]) -> None:
    backend = FakeBackend(default=Script(reply)).script("beta", crash("beta"))
    read = read_chat(serve(backend).client(), "chorus/base")
    reasoning = read.text("reasoning")
    beta = reasoning[reasoning.index("## review · beta"):]
    assert beta.split("## review · synthesis")[0] == "## review · beta\n\n_(failed: model 'beta': server crashed: " \
                                                     "connection lost)_\n\n"
    assert read.text("content").startswith("said")


def test_a_retrieve_stage_says_in_the_reasoning_how_many_passages_it_found(
        config: Path, serve: Callable[[FakeBackend], Served]) -> None:
    docs = config.parent / "docs"
    docs.mkdir()
    (docs / "sky.md").write_text("# Sky\n\nThe sky is blue because air scatters blue light the most.\n")
    DocStore.beside(load_config(config).sessions_dir).add("kb", [docs])
    (config / "pipelines" / "rag.yaml").write_text(yamlfile.dump({"stages": [
        {"name": "find", "kind": "retrieve", "collection": "kb", "top_k": 2},
        {"name": "answer", "models": ["alpha"], "prompt": "{{ context }}"}]}))
    read = read_chat(serve(FakeBackend(default=Script(reply))).client(), "chorus/rag")
    assert read.text("reasoning") == ("## find · passages from 'kb'\n\n1 passage found.\n\n"
                                      "## answer · alpha → the answer\n\n")
    assert read.text("content").strip().startswith("said - to <Answer from the numbered")


def test_tools_only_offered_are_answered_without_a_call_and_a_demanded_call_is_refused(
        serve: Callable[[FakeBackend], Served]) -> None:
    """Open WebUI 0.12 offers its built-in tools with every request; a pipeline answers as a model may."""
    served = serve(FakeBackend(default=Script(reply)))
    tool = {"type": "function", "function": {"name": "search_notes", "parameters": {"type": "object"}}}
    ask = {"model": "chorus/solo", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    offered = httpx.post(f"{served.url}/v1/chat/completions", json=ask, timeout=60)
    required = httpx.post(f"{served.url}/v1/chat/completions", json={**ask, "tool_choice": "required"}, timeout=60)
    assert offered.status_code == 200 and offered.json()["chorus"]["ignored"] == ["tools"]
    assert offered.json()["choices"][0]["message"]["content"].strip().startswith("said")
    assert required.status_code == 400 and required.json()["error"]["param"] == "tool_choice"


def test_an_unknown_reasoning_format_is_refused_naming_the_field(serve: Callable[[FakeBackend], Served]) -> None:
    served = serve(FakeBackend())
    r = httpx.post(f"{served.url}/v1/chat/completions", json={
        "model": "chorus/base", "reasoning_format": "loud", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "reasoning_format"


def test_a_bad_stream_reasoning_in_the_pipeline_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("defaults:\n  stream_reasoning: sometimes\nstages:\n  - {name: a, models: [alpha]}\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline(path)
    text = str(error.value)
    assert "p.yaml" in text and "defaults.stream_reasoning" in text and "line 2" in text


# ---------------------------------------------------------------- integration: the real llama-server

REAL = {
    "name": "think", "defaults": {"temperature": 0, "seed": 1, "n_ctx": 1024, "max_tokens": 48},
    "stages": [
        {"name": "analyse", "models": ["smollm2-135m"], "prompt": "List the key facts for: {{ question }}"},
        {"name": "answer", "models": ["gemma3-270m"], "max_tokens": 12,
         "prompt": "Notes: {{ previous }}\nQuestion: {{ question }}\nAnswer:"},
    ],
}


def test_real_reasoning_arrives_before_the_answer_and_before_the_final_stage(
        config_dir: ConfigDir, llama_server_bin: Path) -> None:
    (config_dir.path / "pipelines").mkdir(exist_ok=True)
    (config_dir.path / "pipelines" / "think.yaml").write_text(yamlfile.dump(REAL, sort_keys=False))
    served = Served(create_app(Chorus.from_dir(config_dir.path), ApiSettings()))
    try:
        read = read_chat(served.client(), "chorus/think")
    finally:
        served.stop()
    kinds = [k for k, _, _ in read.pieces]
    assert kinds[0] == "reasoning" and "content" in kinds
    assert kinds.index("content") == kinds.count("reasoning")
    reasoning = read.text("reasoning")
    assert reasoning.startswith("## analyse · smollm2-135m\n\n") and len(reasoning) > 40  # the header and its text
    assert "## answer · gemma3-270m → the answer" in reasoning
    final_started = next(at for e, at in read.events if e["type"] == "stage_started" and e["stage"] == "answer")
    analysed = next(at for e, at in read.events if e["type"] == "model_finished" and e["stage"] == "analyse")
    assert read.first() < final_started
    assert read.first() < analysed  # the first model's work is visible while it runs, not after it
    session = SessionStore(config_dir.sessions_dir).load(session_of(read))
    assert read.text("content") == session.final
    assert session.stages[0].responses[0].text.strip() in reasoning
