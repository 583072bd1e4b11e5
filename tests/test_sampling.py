"""Every llama-server sampling parameter: validated at the config boundary, layered slot → stage → defaults,
settable with --set, sent under each endpoint's names, recorded on the session; and models.yaml's extra_args.

The last tests run the real llama-server on both demo models and check the parameters take effect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from launcher.process.server import ModelServer
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.registry import Registry
from orchestrator.config.schema import (
    GENERATION_KEYS,
    GenerationParams,
    PipelineSpec,
    StageSpec,
    load_config,
    load_pipeline,
)
from orchestrator.engine.fake import FakeBackend
from orchestrator.engine.run import Engine
from orchestrator.errors import ConfigError
from orchestrator.plan.resolve import Machine, build_plan
from tests.conftest import ConfigDir

EVERY_PARAM: dict[str, Any] = {
    "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 0.95, "repeat_penalty": 1.3,
    "repeat_last_n": 32, "presence_penalty": 0.2, "frequency_penalty": 0.3, "mirostat": 2, "mirostat_tau": 4.0,
    "mirostat_eta": 0.2, "max_tokens": 16, "seed": 5, "stop": ["\n\n"], "grammar": 'root ::= "yes" | "no"',
    "logit_bias": {"15": -100.0, "hello": 5.0},
}


def stage(**kw: Any) -> dict[str, Any]:
    return {"name": "s", "models": ["gemma3-270m"], **kw}


# ---------------------------------------------------------------- one definition


def test_request_carries_every_generation_param_under_the_same_name() -> None:
    request_fields = {f.name for f in dataclasses.fields(GenerationRequest)} - {"prompt", "system_prompt"}
    assert set(GENERATION_KEYS) == set(GenerationParams.model_fields) == request_fields
    assert set(EVERY_PARAM) | {"json_schema"} == request_fields  # this file's tests cover each of them


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("key", "value"), [
    ("top_k", -1), ("min_p", 1.5), ("typical_p", 0), ("repeat_penalty", -0.1), ("repeat_last_n", -2),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("mirostat", 3), ("mirostat_tau", -1),
    ("mirostat_eta", 0), ("seed", -2), ("seed", 2**32), ("stop", [""]), ("grammar", ""),
    ("logit_bias", {"15": 101}), ("json_schema", "not a mapping"), ("top_k", "many"),
])
def test_out_of_range_sampling_values_are_refused(key: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        StageSpec.model_validate(stage(**{key: value}))
    assert info.value.errors()[0]["loc"][0] == key


def test_every_param_is_accepted_at_defaults_stage_and_slot() -> None:
    spec = PipelineSpec.model_validate({"defaults": EVERY_PARAM, "stages": [
        stage(**EVERY_PARAM, models=[{"model": "gemma3-270m", **EVERY_PARAM}])]})
    for level in (spec.defaults, spec.stages[0], spec.stages[0].models[0]):
        assert {k: getattr(level, k) for k in EVERY_PARAM} == EVERY_PARAM


def test_yaml_int_token_ids_and_a_single_stop_string_are_normalised() -> None:
    s = StageSpec.model_validate(stage(logit_bias={15043: -100, "yes": 2}, stop="\n"))
    assert s.logit_bias == {"15043": -100.0, "yes": 2.0} and s.stop == ["\n"]


def test_grammar_and_json_schema_on_one_level_are_refused() -> None:
    with pytest.raises(ValidationError, match="grammar' or 'json_schema', not both"):
        StageSpec.model_validate(stage(grammar='root ::= "a"', json_schema={"type": "object"}))


def test_a_json_schema_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - name: s\n    models: [m]\n    json_schema: {type: string, when: 2024-01-01}\n")
    with pytest.raises(ConfigError, match="json_schema must be plain JSON data") as info:
        load_pipeline(path)
    assert info.value.line == 4 and info.value.field == "stages[0].json_schema"


def test_bad_sampling_value_in_pipeline_yaml_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - name: s\n    models:\n      - model: m\n        repeat_penalty: 11\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 5, "stages[0].models[0].repeat_penalty")


# ---------------------------------------------------------------- resolution


@pytest.fixture
def registry(config_dir: ConfigDir) -> Registry:
    return Registry(load_config(config_dir.path))


def test_each_param_comes_from_the_slot_then_the_stage_then_the_defaults(registry: Registry) -> None:
    spec = PipelineSpec.model_validate({
        "defaults": {"top_k": 10, "min_p": 0.1, "mirostat": 1, "logit_bias": {"1": 1}},
        "stages": [stage(top_k=20, min_p=0.2, models=[
            {"model": "gemma3-270m", "label": "a", "top_k": 30},
            {"model": "gemma3-270m", "label": "b"}],
            aggregation={"type": "synthesis", "synthesis_model": "smollm2-135m"})]})
    s = build_plan(spec, registry, Machine()).stage(1)
    a, b = s.call("a").request, s.call("b").request
    assert (a.top_k, a.min_p, a.mirostat, a.logit_bias) == (30, 0.2, 1, {"1": 1.0})
    assert (b.top_k, b.min_p, b.mirostat) == (20, 0.2, 1)
    assert s.synthesis is not None and (s.synthesis.request.top_k, s.synthesis.request.min_p) == (20, 0.2)


def test_a_slot_json_schema_replaces_the_stage_grammar_instead_of_joining_it(registry: Registry) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}}
    spec = PipelineSpec.model_validate({"defaults": {"grammar": 'root ::= "x"'}, "stages": [stage(
        grammar='root ::= "yes" | "no"',
        models=[{"model": "gemma3-270m", "label": "a", "json_schema": schema},
                {"model": "gemma3-270m", "label": "b"}])]})
    s = build_plan(spec, registry, Machine()).stage(1)
    assert (s.call("a").request.grammar, s.call("a").request.json_schema) == (None, schema)
    assert (s.call("b").request.grammar, s.call("b").request.json_schema) == ('root ::= "yes" | "no"', None)


def test_every_set_param_is_recorded_on_the_session_responses(registry: Registry) -> None:
    spec = PipelineSpec.model_validate({"stages": [stage(**EVERY_PARAM)]})
    plan = build_plan(spec, registry, Machine())
    record = asyncio.run(Engine(FakeBackend(), observers=[]).run(plan, "q"))
    params = record.stages[0].responses[0].params
    assert {k: params[k] for k in EVERY_PARAM} == EVERY_PARAM
    assert plan.stage(1).calls[0].to_dict()["request"]["repeat_penalty"] == 1.3  # chorus plan --json shows it


# ---------------------------------------------------------------- --set


def test_set_takes_lists_mappings_and_one_slot_by_its_label() -> None:
    spec = PipelineSpec.model_validate({"stages": [stage(models=[
        {"model": "gemma3-270m", "label": "facts"}, {"model": "gemma3-270m", "label": "clarity"}])]})
    out = apply_overrides(spec, ['defaults.logit_bias={"15043": -100, 42: 5}', "s.stop=[a, b]", "s.mirostat=2",
                                 "s.facts.top_k=40", "s.clarity.json_schema={type: object}"])
    assert out.defaults.logit_bias == {"15043": -100.0, "42": 5.0}
    assert (out.stages[0].stop, out.stages[0].mirostat) == (["a", "b"], 2)
    assert (out.stages[0].models[0].top_k, out.stages[0].models[1].top_k) == (40, None)
    assert out.stages[0].models[1].json_schema == {"type": "object"}


def test_set_grammar_replaces_a_json_schema_of_the_same_level() -> None:
    spec = PipelineSpec.model_validate({"stages": [stage(json_schema={"type": "object"})]})
    out = apply_overrides(spec, ['s.grammar=root ::= "yes" | "no"'])
    assert (out.stages[0].grammar, out.stages[0].json_schema) == ('root ::= "yes" | "no"', None)


def test_set_out_of_range_is_a_config_error_naming_the_field() -> None:
    spec = PipelineSpec.model_validate({"stages": [stage()]})
    with pytest.raises(ConfigError, match="Input should be 0, 1 or 2") as info:
        apply_overrides(spec, ["s.mirostat=3"])
    assert info.value.field == "stages[0].mirostat"


# ---------------------------------------------------------------- request JSON


def every_param_request(**kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt="p", system_prompt="sys", **{**EVERY_PARAM, **kw})


def test_native_completion_body_uses_llama_server_names() -> None:
    url, body = Endpoint("m", "http://h:1", "completion").url_and_body(every_param_request())
    assert url == "http://h:1/completion"
    expected = {("n_predict" if k == "max_tokens" else k): v for k, v in EVERY_PARAM.items()}
    assert {k: body[k] for k in expected} == expected and "max_tokens" not in body
    assert body["prompt"] == "sys\n\np" and body["stream"] is True


def test_chat_body_uses_openai_names_and_a_json_schema_as_response_format() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    req = every_param_request(grammar=None, json_schema=schema)
    url, body = Endpoint("m", "http://h:1", "chat").url_and_body(req)
    assert url == "http://h:1/v1/chat/completions"
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    assert "json_schema" not in body and "n_predict" not in body and body["max_tokens"] == 16
    for key in ("top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "seed", "stop", "logit_bias"):
        assert body[key] == EVERY_PARAM[key], key
    assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "p"}]


def test_remote_bodies_name_the_model_and_leave_unset_params_out() -> None:
    remote = Endpoint("llama3", "https://x/v1", "chat", remote=True)
    url, body = remote.url_and_body(GenerationRequest(prompt="p", top_k=5, stop=[]))
    assert url == "https://x/v1/chat/completions" and body["model"] == "llama3" and body["top_k"] == 5
    assert not {"stop", "temperature", "grammar", "response_format", "logit_bias"} & set(body)
    url, body = dataclasses.replace(remote, mode="completion").url_and_body(every_param_request())
    assert url == "https://x/v1/completions" and body["max_tokens"] == 16 and body["grammar"] == EVERY_PARAM["grammar"]


# ---------------------------------------------------------------- extra_args


def test_extra_args_reach_the_server_spec_and_its_argv(config_dir: ConfigDir, tmp_path: Path) -> None:
    models = config_dir.models()
    models["models"]["gemma3-270m"]["extra_args"] = ["-ctk", "q8_0", "--temp", "0.1"]
    config_dir.write_models(models)
    registry = Registry(load_config(config_dir.path))
    plan = build_plan(PipelineSpec.model_validate({"stages": [stage()]}), registry, Machine())
    spec = plan.stage(1).calls[0].target.server
    assert spec is not None and spec.extra_args == ("-ctk", "q8_0", "--temp", "0.1")
    argv = ModelServer(spec, Path("/bin/llama-server"), tmp_path).command(8080)
    assert argv[-4:] == ["-ctk", "q8_0", "--temp", "0.1"]
    assert plan.to_dict()["servers"][0]["extra_args"] == ["-ctk", "q8_0", "--temp", "0.1"]


@pytest.mark.parametrize(("arg", "flag", "instead"), [
    ("--port", "--port", "chorus picks the address"), ("--port=8080", "--port", "address"),
    ("-c", "-c", "default_n_ctx"), ("--ctx_size", "--ctx-size", "default_n_ctx"), ("-np", "-np", "'parallel'"),
    ("-ngl", "-ngl", "default_gpu_layers"), ("--n-gpu-layers", "--n-gpu-layers", "default_gpu_layers"),
    ("-m", "-m", "'file'"), ("--api-key", "--api-key", "its own key"), ("--api-key-file", "--api-key-file", "key"),
    ("--host", "--host", "address"), ("-t", "-t", "'threads'"), ("--no-webui", "--no-webui", "chorus sets it"),
    ("--log-file", "--log-file", "chorus sets it"), ("-hf", "-hf", "'file'"),
    ("--chat-template", "--chat-template", "'chat_template'"),
])
def test_extra_args_refuse_flags_chorus_manages_naming_file_line_and_field(config_dir: ConfigDir, arg: str,
                                                                          flag: str, instead: str) -> None:
    config_dir.write_models("models:\n  g:\n    file: gemma-3-270m-q4_k_m.gguf\n"
                            f"    extra_args:\n      - -ctk\n      - q8_0\n      - {json.dumps(arg)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_dir.path)
    err = info.value
    assert err.file == str(config_dir.path / "models.yaml") and err.line == 7 and err.field == "models.g.extra_args[2]"
    assert f"'{flag}' is set by chorus itself" in err.message and instead in err.message


def test_extra_args_on_a_remote_model_are_refused(config_dir: ConfigDir) -> None:
    config_dir.write_models("models:\n  far:\n    url: http://192.0.2.1/v1\n    extra_args: [-ctk, q8_0]\n")
    with pytest.raises(ConfigError, match="a remote 'url' runs none here"):
        load_config(config_dir.path)


def test_pooling_is_accepted_in_extra_args_of_an_embedding_model(config_dir: ConfigDir) -> None:
    config_dir.write_models("models:\n  e:\n    file: gemma-3-270m-q4_k_m.gguf\n    role: embedding\n"
                            "    extra_args: [--pooling, mean]\n")
    assert load_config(config_dir.path).models["e"].extra_args == ["--pooling", "mean"]


@pytest.mark.parametrize("arg", ["--embedding", "--embeddings"])
def test_embeddings_flag_on_a_generate_model_is_refused_pointing_at_role(config_dir: ConfigDir, arg: str) -> None:
    config_dir.write_models(f"models:\n  g:\n    file: gemma-3-270m-q4_k_m.gguf\n    extra_args: [{arg}]\n")
    with pytest.raises(ConfigError, match="role: embedding") as info:
        load_config(config_dir.path)
    assert info.value.file == str(config_dir.path / "models.yaml")
    config_dir.write_models(f"models:\n  e:\n    file: gemma-3-270m-q4_k_m.gguf\n    role: embedding\n"
                            f"    extra_args: [{arg}]\n")
    assert load_config(config_dir.path).models["e"].extra_args == [arg]  # resolve then adds nothing


# ---------------------------------------------------------------- the real server


def _run(server: ModelServer, mode: str, request: GenerationRequest) -> str:
    endpoint = Endpoint(server.model, server.base_url, mode, api_key=server.api_key)  # type: ignore[arg-type]

    async def go() -> str:
        async with GenerationClient(timeout_s=300) as client:
            return (await client.generate(endpoint, request)).text

    return asyncio.run(go())


def _settings(server: ModelServer, mode: str, request: GenerationRequest) -> dict[str, Any]:
    """The generation settings llama-server read from our body (non-streamed; `verbose` shows them in chat)."""
    url, body = Endpoint(server.model, server.base_url, mode).url_and_body(request)  # type: ignore[arg-type]
    body.update(stream=False, verbose=True)
    body.pop("stream_options", None)
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    return (data["__verbose"] if mode == "chat" else data)["generation_settings"]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_llama_server_reads_every_param_under_the_names_we_send(request: pytest.FixtureRequest, mode: str) -> None:
    server = request.getfixturevalue("warm_demo_server" if mode == "completion" else "warm_chat_server")
    got = _settings(server, mode, GenerationRequest(prompt="Is water wet?", **{**EVERY_PARAM, "max_tokens": 4}))
    for key in ("top_k", "repeat_last_n", "mirostat", "seed", "stop"):
        assert got[key] == EVERY_PARAM[key], key
    for key in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "mirostat_tau", "mirostat_eta"):
        assert got[key] == pytest.approx(EVERY_PARAM[key]), key
    assert got["n_predict"] == 4 and "yes" in got["grammar"]
    assert any(b["bias"] == -100 and b["token"] == 15 for b in got["logit_bias"])


@pytest.mark.integration
def test_grammar_json_schema_top_k_and_logit_bias_take_effect(warm_demo_server: ModelServer,
                                                              warm_chat_server: ModelServer) -> None:
    base, chat = warm_demo_server, warm_chat_server
    # a grammar forces a yes/no answer from a base model that would ramble on
    answers = {_run(base, "completion", GenerationRequest(prompt=f"Q: {q}\nA:", grammar='root ::= "yes" | "no"',
                                                           max_tokens=8, seed=s, temperature=1.0))
               for s, q in ((1, "Is the sky blue?"), (2, "Is fire cold?"), (3, "Can fish fly?"))}
    assert answers <= {"yes", "no"} and answers
    # a JSON schema makes the chat model's output parse and match it
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["blue", "red", "green"]}},
              "required": ["colour"]}
    text = _run(chat, "chat", GenerationRequest(prompt="What colour is the sky? Answer in JSON.",
                                                json_schema=schema, max_tokens=40, temperature=0.2))
    assert json.loads(text)["colour"] in {"blue", "red", "green"}
    # logit_bias +100 on one token: greedy (top_k 1) output is that token again and again
    token = httpx.post(f"{chat.base_url}/tokenize", json={"content": " banana"},
                       headers={"Authorization": f"Bearer {chat.api_key}"}).json()["tokens"][0]
    piece = httpx.post(f"{chat.base_url}/detokenize", json={"tokens": [token]},
                       headers={"Authorization": f"Bearer {chat.api_key}"}).json()["content"]
    text = _run(chat, "chat", GenerationRequest(prompt="Say hello.", logit_bias={str(token): 100.0}, top_k=1,
                                                max_tokens=3, repeat_penalty=1.0))
    assert text.strip() == (piece * 3).strip()
    # top_k 1 is greedy: two seeds at temperature 1.5 give the same answer
    twice = {_run(base, "completion", GenerationRequest(prompt="The capital of France is", top_k=1, seed=s,
                                                        temperature=1.5, max_tokens=6)) for s in (1, 99)}
    assert len(twice) == 1
