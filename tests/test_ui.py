"""The Streamlit pages under AppTest, on the real demo model and llama-server."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from launcher.process.client import GenerationRequest
from orchestrator.config.schema import GenerationParams, PipelineSpec, load_config
from orchestrator.config.schema import load_pipeline as load_pipeline_file
from orchestrator.engine.fake import FakeBackend
from orchestrator.plan.resolve import RunMode, RunPlan
from orchestrator.runs import Runner
from orchestrator.runtime import Runtime
from tests.conftest import REPO, ConfigDir
from ui import stage_builder

APP = str(REPO / "ui" / "app.py")


@pytest.fixture
def ui_env(config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch):
    """The pages on `config_dir`; at the end the servers started meanwhile (the pages' runs) are stopped, not
    the session's warm ones (tests/conftest.py)."""
    from launcher.process import server as server_module
    from ui.common import _chorus

    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config_dir.path))
    before = set(server_module._LIVE)
    yield config_dir
    _chorus.clear()
    for server in set(server_module._LIVE) - before:
        server.stop(grace_s=1.0)


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    return at


def plain(text: str) -> str:
    """Page text with md_escape's backslashes taken out, as the user reads it."""
    return re.sub(r"\\(.)", r"\1", text)


@pytest.mark.parametrize("page", [None, "run", "results", "history", "models", "eval", "documents"])
def test_every_page_renders_without_exception(ui_env: ConfigDir, page: str | None) -> None:
    at = app(page)
    assert not at.exception, [e.value for e in at.exception]
    assert at.title


def test_the_run_page_resolves_the_plan_once_per_render(ui_env: ConfigDir, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app("run")
    calls: list[str] = []
    original = Runtime.plan

    def counted(self: Runtime, pipeline: PipelineSpec, mode: RunMode = "manual", **given: Any) -> RunPlan:
        calls.append(mode)
        return original(self, pipeline, mode, **given)

    monkeypatch.setattr(Runtime, "plan", counted)
    at.run()
    assert not at.exception
    assert calls == ["base"]  # one resolution feeds the memory plan and the machine view, in the run's mode


def test_the_memory_plan_is_drawn_only_while_its_box_is_open(ui_env: ConfigDir) -> None:
    def memory_box(at: AppTest):
        return next(e for e in at.expander if e.label == "Memory plan")

    at = app("run")
    closed = memory_box(at)
    assert not closed.get("image") and not closed.get("dataframe")  # nothing drawn, nothing converted
    at.session_state["memory-plan"] = True  # the user opens the box
    at.run()
    assert not at.exception
    opened = memory_box(at)
    assert len(opened.get("image")) == 1 and opened.get("dataframe")  # the chart and a table per stage


def test_base_mode_is_disabled_with_the_reason_when_a_model_is_missing(ui_env: ConfigDir) -> None:
    (ui_env.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    at = app("run")
    assert not at.exception
    radio = at.radio(key="mode_blocked")
    assert radio.disabled and radio.value == "Manual"
    assert any("Base mode is unavailable" in plain(w.value) and "gemma3-270m" in plain(w.value) for w in at.warning)


def test_base_mode_is_offered_when_every_model_is_there(ui_env: ConfigDir) -> None:
    at = app("run")
    assert at.radio(key="mode").value == "Base" and not at.radio(key="mode").disabled


def test_stage_builder_produces_the_spec_the_user_built(ui_env: ConfigDir) -> None:
    at = app("run")
    at.radio(key="mode").set_value("Manual").run()
    at.button(key="add-stage").click().run()
    a, b = (s["id"] for s in at.session_state["builder_stages"])
    at.text_input(key=f"s{a}-name").set_value("first").run()
    at.text_input(key=f"s{b}-name").set_value("second").run()
    call = at.session_state["builder_stages"][1]["models"][0]["id"]
    at.selectbox(key=f"c{call}-model").set_value("gemma3-270m").run()
    at.number_input(key=f"s{b}-temperature").set_value(0.2).run()
    at.number_input(key=f"s{b}-max_tokens").set_value(32).run()
    at.selectbox(key=f"s{b}-agg").set_value("synthesis").run()
    at.selectbox(key=f"s{b}-synth").set_value("gemma3-270m").run()
    at.button(key=f"s{b}-up").click().run()  # reorder: second becomes first
    assert not at.exception
    spec = stage_builder.build_spec(at.session_state["builder_stages"])
    assert [s.name for s in spec.stages] == ["second", "first"]
    second = spec.stages[0]
    assert second.temperature == 0.2 and second.max_tokens == 32
    assert second.aggregation.type == "synthesis" and second.aggregation.synthesis_model == "gemma3-270m"
    at.button(key=f"s{b}-remove").click().run()
    assert [s["name"] for s in at.session_state["builder_stages"]] == ["first"]


@pytest.mark.integration  # a real run: the demo models, not the fast tier's synthetic files
def test_a_run_from_the_page_streams_to_its_final_answer(ui_env: ConfigDir) -> None:
    at = app("run")
    at.radio(key="mode").set_value("Manual").run()
    sid = at.session_state["builder_stages"][0]["id"]
    at.number_input(key=f"s{sid}-max_tokens").set_value(8).run()
    at.number_input(key=f"s{sid}-n_ctx").set_value(512).run()
    at.text_area(key="question").set_value("The capital of France is").run()
    at.button(key="run").click().run()
    live = at.session_state["live_run"]
    assert live.wait(120) and live.outcome and live.outcome.run.status == "completed"
    at.run()
    assert not at.exception
    assert any("Completed" in s.value for s in at.success)
    assert any("chorus-final-answer" in m.value for m in at.markdown)


def test_history_shows_a_saved_session(ui_env: ConfigDir, llama_server_bin: Path) -> None:
    rt = Runtime(load_config(ui_env.path))
    try:
        spec = PipelineSpec.model_validate({"stages": [{"name": "answer", "models": ["gemma3-270m"],
                                                        "max_tokens": 6, "n_ctx": 512}]})
        outcome = Runner(rt).run(spec, "What colour is the sea?")
    finally:
        rt.close()
    at = app("history")
    assert not at.exception
    table = at.dataframe[0].value
    assert outcome.session_id in list(table["id"])
    assert any("What colour is the sea?" in t.value for t in at.text)  # user text is shown as text
    assert any("Step 1: answer" in e.label for e in at.expander)


def test_stage_builder_rejects_a_stage_without_models_naming_it() -> None:
    stages = [stage_builder.new_stage(1, [])]
    with pytest.raises(Exception) as err:
        stage_builder.build_spec(stages)
    assert "stage 1 (stage1)" in str(err.value) and "models" in str(err.value)


def start_long_run(at: AppTest, question: str = "count") -> Any:
    """A manual run of one demo model counting to 3000 tokens (a LiveRun), returned once it is really
    generating."""
    import time

    manual(at)
    sid = at.session_state["builder_stages"][0]["id"]
    at.number_input(key=f"s{sid}-max_tokens").set_value(3000).run()
    at.text_input(key=f"s{sid}-prompt").set_value("Count: 1, 2, 3,").run()
    at.text_area(key="question").set_value(question).run()
    at.button(key="run").click().run()
    live = at.session_state["live_run"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(m.text for s in live.snapshot() for m in s.models.values()):
        time.sleep(0.05)
    assert not live.done, live.error
    return live


@pytest.mark.integration  # a real run: the demo models, not the fast tier's synthetic files
def test_stop_button_cancels_the_run_in_flight(ui_env: ConfigDir) -> None:
    at = app("run")
    live = start_long_run(at)
    at.button(key="stop").click().run()
    assert live.wait(60) and live.outcome is not None
    assert live.outcome.run.status == "cancelled"
    at.run()
    assert not at.exception and any("cancelled" in e.value for e in at.error)


# ---------------------------------------------------------------- custom aggregators: choose, never name a module

DOOR_SENTINEL = "chorus_ui_door_sentinel"


@pytest.fixture
def door_sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module outside the allowed places that leaves a file behind if it is ever imported."""
    site, marker = tmp_path / "site", tmp_path / "sentinel-imported"
    site.mkdir()
    (site / f"{DOOR_SENTINEL}.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                              "def fn(question, responses):\n    return 'pwned'\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, DOOR_SENTINEL, raising=False)
    return marker


def test_custom_aggregation_offers_only_allowed_functions_and_no_text_box(ui_env: ConfigDir,
                                                                          door_sentinel: Path) -> None:
    (ui_env.path / "aggregators").mkdir()
    (ui_env.path / "aggregators" / "votes.py").write_text(
        "def longest(question, responses):\n    return max(r['text'] for r in responses)\n\n"
        "def _helper():\n    pass\n")
    ui_env.write_app(aggregators={"allowed": ["chorus_listed_pkg.mod:fn"]})
    at = app("run")
    at.radio(key="mode").set_value("Manual").run()
    sid = at.session_state["builder_stages"][0]["id"]
    at.selectbox(key=f"s{sid}-agg").set_value("custom").run()
    assert not at.exception
    choice = at.selectbox(key=f"s{sid}-func")
    assert choice.options == ["chorus_listed_pkg.mod:fn", "votes:longest"]
    assert all(t.key != f"s{sid}-func" for t in at.text_input)  # nothing to type a module name into
    with pytest.raises(ValueError):
        choice.set_value("os:system").run()
    at.selectbox(key=f"s{sid}-func").set_value("votes:longest").run()
    assert stage_builder.build_spec(at.session_state["builder_stages"]).stages[0].aggregation.function == \
        "votes:longest"
    at.session_state["builder_stages"][0]["function"] = f"{DOOR_SENTINEL}:fn"  # a forged stage dict
    at.run()
    assert at.session_state["builder_stages"][0]["function"] in ("votes:longest", "")
    assert DOOR_SENTINEL not in sys.modules and not door_sentinel.exists()


@pytest.mark.parametrize("function", ["os:system", f"{DOOR_SENTINEL}:fn"])
def test_base_pipeline_naming_a_module_is_refused_on_the_page_before_anything_runs(
        ui_env: ConfigDir, door_sentinel: Path, function: str) -> None:
    ui_env.write_pipeline({"stages": [{"name": "answer", "models": ["gemma3-270m"],
                                       "aggregation": {"type": "custom", "function": function}}]})
    at = app("run")
    at.text_area(key="question").set_value("What is 2 + 2?").run()
    assert not at.exception
    errors = [plain(e.value) for e in at.error]  # shown escaped: the function name is the file's text
    assert any(f"'{function}' is not an allowed aggregator" in e and "stages.answer.aggregation.function" in e
               and "allowed: none" in e for e in errors), errors
    assert at.button(key="run").disabled
    assert DOOR_SENTINEL not in sys.modules and not door_sentinel.exists()


# ---------------------------------------------------------------- issue 14.7: the builder builds what the YAML can

def manual(at: AppTest) -> AppTest:
    at.radio(key="mode").set_value("Manual").run()
    return at


def test_the_same_model_twice_in_one_stage_each_with_its_label_system_prompt_and_seed(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    sid = at.session_state["builder_stages"][0]["id"]
    at.button(key=f"s{sid}-add-call").click().run()
    first, second = (c["id"] for c in at.session_state["builder_stages"][0]["models"])
    assert at.selectbox(key=f"c{second}-model").value == "gemma3-270m"  # the same model again
    for call, label, system, seed in ((first, "warm", "Be warm.", 1), (second, "cold", "Be cold.", 2)):
        at.text_input(key=f"c{call}-label").set_value(label).run()
        at.text_input(key=f"c{call}-system").set_value(system).run()
        at.number_input(key=f"c{call}-seed").set_value(seed).run()
    at.session_state[f"c{second}-more"] = True  # the user opens "Other parameters of this call"
    at.run()
    at.number_input(key=f"c{second}-top_k").set_value(40).run()  # a generated control of one call
    assert not at.exception and not at.error
    slots = stage_builder.build_spec(at.session_state["builder_stages"]).stages[0].models
    assert [(s.model, s.label, s.system_prompt, s.seed, s.top_k) for s in slots] == [
        ("gemma3-270m", "warm", "Be warm.", 1, None), ("gemma3-270m", "cold", "Be cold.", 2, 40)]
    at.text_input(key=f"c{second}-label").set_value("warm").run()  # two calls, one label: refused, named
    assert any("share the label 'warm'" in plain(e.value) for e in at.error) and at.button(key="run").disabled
    at.button(key=f"c{first}-remove").click().run()
    assert [c["label"] for c in at.session_state["builder_stages"][0]["models"]] == ["warm"]


def test_stop_strings_execution_and_vote_options_reach_the_spec(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    sid = at.session_state["builder_stages"][0]["id"]
    at.session_state[f"s{sid}-more"] = True  # the user opens "More sampling parameters"
    at.run()
    at.text_area(key=f"s{sid}-stop").set_value("\\nQuestion:\nEND").run()
    at.selectbox(key=f"s{sid}-execution").set_value("sequential").run()
    at.selectbox(key=f"s{sid}-on_error").set_value("stop").run()
    at.selectbox(key=f"s{sid}-agg").set_value("majority_vote").run()
    at.selectbox(key=f"s{sid}-vote-extract").set_value("regex").run()
    assert any("needs a 'pattern'" in plain(e.value) for e in at.error)  # the schema's own message, on the page
    at.text_input(key=f"s{sid}-vote-pattern").set_value(r"answer: (\w+)").run()
    at.number_input(key=f"s{sid}-vote-similarity").set_value(0.6).run()
    at.selectbox(key=f"s{sid}-synth").set_value("gemma3-270m").run()
    at.selectbox(key=f"s{sid}-vote-tie").set_value("synthesis").run()
    assert not at.exception and not at.error
    stage = stage_builder.build_spec(at.session_state["builder_stages"]).stages[0]
    assert stage.stop == ["\nQuestion:", "END"] and stage.execution == "sequential" and stage.on_error == "stop"
    vote = stage.aggregation.vote
    assert (stage.aggregation.type, vote.extract, vote.pattern, vote.similarity, vote.tie_break) == \
        ("majority_vote", "regex", r"answer: (\w+)", 0.6, "synthesis")
    at.text_area(key=f"s{sid}-logit_bias").set_value("{15043: -100}").run()  # not JSON: refused, not dropped
    assert any("not valid JSON" in plain(e.value) for e in at.error) and at.button(key="run").disabled
    at.session_state[f"s{sid}-more"] = False  # folded, the text that does not parse still refuses the run
    at.run()
    assert not any(w.key == f"s{sid}-logit_bias" for w in at.text_area)
    assert any("not valid JSON" in plain(e.value) for e in at.error) and at.button(key="run").disabled
    at.session_state[f"s{sid}-more"] = True  # and is there again to fix
    at.run()
    assert at.text_area(key=f"s{sid}-logit_bias").value == "{15043: -100}"
    at.text_area(key=f"s{sid}-logit_bias").set_value('{"15043": -100}').run()
    assert not at.error and not at.button(key="run").disabled
    assert stage_builder.build_spec(at.session_state["builder_stages"]).stages[0].logit_bias == {"15043": -100}


def test_a_built_pipeline_is_saved_asked_before_replacing_and_loaded_back(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    sid = at.session_state["builder_stages"][0]["id"]
    at.text_input(key=f"s{sid}-name").set_value("answer").run()
    at.number_input(key=f"s{sid}-max_tokens").set_value(24).run()
    at.session_state["defaults-open"] = True  # the user opens "Pipeline defaults"
    at.run()
    at.checkbox(key="pd-stream_reasoning").uncheck().run()  # the API's reasoning stream, off for this one
    at.text_input(key="pipeline-name").set_value("mine").run()
    at.button(key="save").click().run()
    path = ui_env.path / "pipelines" / "mine.yaml"
    assert path.is_file() and any("Saved" in s.value for s in at.success)
    saved = path.read_text()
    at.number_input(key=f"s{sid}-max_tokens").set_value(48).run()
    at.button(key="save").click().run()  # the same name again: asked first, nothing written
    assert any("exists. Replace it?" in plain(w.value) for w in at.warning) and path.read_text() == saved
    assert not any("Saved" in s.value for s in at.success)  # the first save's message is gone: not done yet
    at.button(key="save-overwrite").click().run()
    assert load_pipeline_file(path).stages[0].max_tokens == 48
    assert load_pipeline_file(path).defaults.stream_reasoning is False

    fresh = manual(app("run"))  # another browser tab: load it into an empty builder
    fresh.selectbox(key="load-choice").set_value("mine").run()
    fresh.button(key="load").click().run()
    assert not fresh.exception
    spec = stage_builder.build_spec(fresh.session_state["builder_stages"], name="mine",
                                    defaults=fresh.session_state["builder_defaults"])
    assert spec.model_dump() == load_pipeline_file(path).model_dump()
    assert fresh.text_input(key="pipeline-name").value == "mine"
    fresh.session_state["defaults-open"] = True
    fresh.run()
    assert fresh.checkbox(key="pd-stream_reasoning").value is False


def test_loading_a_broken_pipeline_file_shows_its_file_and_line(ui_env: ConfigDir) -> None:
    folder = ui_env.path / "pipelines"
    folder.mkdir()
    (folder / "broken.yaml").write_text("name: broken\nstages:\n  - name: one\n    models: [gemma3-270m]\n"
                                        "    aggregation: {type: vote}\n")
    at = manual(app("run"))
    before = at.session_state["builder_stages"]
    at.selectbox(key="load-choice").set_value("broken").run()
    at.button(key="load").click().run()
    assert not at.exception
    assert any(str(folder / "broken.yaml") in plain(e.value) and "line 5" in plain(e.value) for e in at.error), \
        [e.value for e in at.error]
    assert at.session_state["builder_stages"] == before  # the builder is left as it was


def test_a_bad_pipeline_name_is_refused_and_nothing_is_written(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    at.text_input(key="pipeline-name").set_value("../../escape").run()
    at.button(key="save").click().run()
    assert any("not a valid pipeline name" in plain(e.value) for e in at.error)
    assert not (ui_env.path / "pipelines").exists() and not (ui_env.path.parent / "escape.yaml").exists()


def widget_keys(at: AppTest) -> set[str]:
    return {w.key for w in (*at.number_input, *at.selectbox, *at.text_area)}


def open_settings_tab(at: AppTest, tab: str) -> None:
    """Open "Generation settings for this run" on `tab` ("All stages" or a stage's name), as a user clicks."""
    at.session_state["gen-open"] = True
    at.session_state["gen-tab"] = tab
    at.run()


def test_base_mode_offers_every_generation_parameter_for_the_run_and_each_stage(ui_env: ConfigDir) -> None:
    at = app("run")
    names = GenerationParams.keys()
    stages = [s["name"] for s in ui_env.pipeline()["stages"]]
    assert not any(k.startswith("gen-") for k in widget_keys(at))  # folded: built only when opened
    for tab, scope in [("All stages", "defaults"), *((s, s) for s in stages)]:
        open_settings_tab(at, tab)
        assert {f"gen-{scope}-{n}" for n in names} <= widget_keys(at), scope
        assert not any(k.startswith("gen-") and not k.startswith(f"gen-{scope}-") for k in widget_keys(at))
    open_settings_tab(at, "All stages")
    assert at.number_input(key="gen-defaults-max_tokens").value is None  # blank: the pipeline's own value
    shipped = ui_env.pipeline()["defaults"]["max_tokens"]
    assert at.number_input(key="gen-defaults-max_tokens").placeholder == f"keep: {shipped}"


def test_base_mode_settings_hold_on_other_tabs_and_with_the_box_folded(ui_env: ConfigDir,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.app import Chorus

    given: list[list[str]] = []
    original = Chorus.pipeline

    def recorded(self: Chorus, *args: Any, **kwargs: Any) -> Any:
        given.append(list(kwargs.get("overrides") or []))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Chorus, "pipeline", recorded)
    first = ui_env.pipeline()["stages"][0]["name"]
    at = app("run")
    open_settings_tab(at, "All stages")
    at.number_input(key="gen-defaults-max_tokens").set_value(4).run()
    open_settings_tab(at, first)
    at.number_input(key=f"gen-{first}-seed").set_value(99).run()
    at.text_area(key=f"gen-{first}-logit_bias").set_value("{1: 2}").run()  # not JSON
    assert any("not valid JSON" in plain(e.value) for e in at.error)
    open_settings_tab(at, "All stages")  # the stage's values are kept on the other tab
    assert at.number_input(key="gen-defaults-max_tokens").value == 4
    assert any("not valid JSON" in plain(e.value) for e in at.error) and at.button(key="run").disabled
    open_settings_tab(at, first)
    at.text_area(key=f"gen-{first}-logit_bias").set_value("").run()
    at.session_state["gen-open"] = False  # folded: the run still gets every value filled in
    given.clear()
    at.run()
    assert not at.exception and not at.error and not at.button(key="run").disabled
    assert given[-1] == ["defaults.max_tokens=4", f"{first}.seed=99"]


@pytest.mark.integration  # a real run: the demo models, not the fast tier's synthetic files
def test_base_mode_settings_apply_to_that_run_only(ui_env: ConfigDir) -> None:
    pipeline_text = (ui_env.path / "pipeline.yaml").read_text()
    at = app("run")
    first = ui_env.pipeline()["stages"][0]["name"]
    open_settings_tab(at, first)
    at.number_input(key=f"gen-{first}-seed").set_value(99).run()
    open_settings_tab(at, "All stages")
    at.number_input(key="gen-defaults-max_tokens").set_value(4).run()
    at.number_input(key="gen-defaults-repeat_penalty").set_value(1.3).run()
    at.number_input(key="gen-defaults-top_p").set_value(0.0).run()  # out of the schema's range: refused
    assert any("top_p" in plain(e.value) for e in at.error) and at.button(key="run").disabled
    at.number_input(key="gen-defaults-top_p").set_value(None).run()
    at.text_area(key="question").set_value("Why is the sky blue?").run()
    at.button(key="run").click().run()
    live = at.session_state["live_run"]
    assert live.wait(240) and live.outcome is not None, live.error
    snapshot = json.loads((live.outcome.session_dir / "config_snapshot.json").read_text())["pipeline"]
    assert snapshot["defaults"]["max_tokens"] == 4 and snapshot["defaults"]["repeat_penalty"] == 1.3
    assert snapshot["stages"][0]["seed"] == 99
    assert all(r.completion_tokens <= 4 for s in live.outcome.run.stages for r in s.responses)
    assert (ui_env.path / "pipeline.yaml").read_text() == pipeline_text  # only that run


def test_the_run_button_is_enabled_while_the_question_is_typed(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    assert not at.button(key="run").disabled  # the text area has not sent its text yet: still clickable
    at.button(key="run").click().run()
    assert "live_run" not in at.session_state
    assert any("Type a question first" in w.value for w in at.warning)


def test_the_rerun_form_offers_every_parameter_per_stage_and_applies_them(ui_env: ConfigDir,
                                                                        llama_server_bin: Path) -> None:
    rt = Runtime(load_config(ui_env.path))
    try:  # the parent session on the scripted backend; the rerun is real
        spec = PipelineSpec.model_validate({"stages": [
            {"name": "one", "models": ["gemma3-270m"], "max_tokens": 4, "n_ctx": 512},
            {"name": "two", "models": ["gemma3-270m"], "max_tokens": 4, "n_ctx": 512}]})
        parent = asyncio.run(Runner(rt).arun(spec, "Name a colour.", backend=FakeBackend()))
    finally:
        rt.close()
    at = app("history")
    keys, names = {w.key for w in (*at.number_input, *at.selectbox, *at.text_area)}, GenerationParams.keys()
    for scope in ("defaults", "s-one", "s-two"):
        assert {f"rerun-history-{scope}-{n}" for n in names} <= keys, scope
    at.selectbox(key="rerun-stage-history").set_value("2: two").run()
    assert not any(w.key.startswith("rerun-history-s-one-") for w in at.number_input)  # copied, not rerun
    at.number_input(key="rerun-history-s-two-max_tokens").set_value(2)  # a form: sent with its submit
    at.number_input(key="rerun-history-s-two-seed").set_value(7)
    at.text_area(key="rerun-history-s-two-stop").set_value("\\n")
    at.button[-1].click().run()  # the form's submit button
    live = at.session_state["live_run"]
    assert live.wait(120) and live.outcome is not None, live.error
    child = json.loads((live.outcome.session_dir / "config_snapshot.json").read_text())["pipeline"]["stages"][1]
    assert (child["max_tokens"], child["seed"], child["stop"]) == (2, 7, ["\n"])
    assert live.outcome.run.parent_session == parent.session_id


@pytest.mark.parametrize("page", [None, "run", "results", "history", "models"])
def test_pages_log_no_deprecation_warning(ui_env: ConfigDir, page: str | None,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import streamlit.deprecation_util as deprecation

    rt = Runtime(load_config(ui_env.path))  # a saved session, so History and Results render their tables
    try:
        spec = PipelineSpec.model_validate({"stages": [{"name": "a", "models": ["gemma3-270m", "gemma3-270m"],
                                                        "aggregation": {"type": "majority_vote"}}]})
        asyncio.run(Runner(rt).arun(spec, "Hi", backend=FakeBackend()))
    finally:
        rt.close()
    deprecation._shown_warnings.clear()  # Streamlit logs each message once per process
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at = app(page)
        if page == "run":
            manual(at)
    assert not at.exception
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("streamlit.deprecation")
              or "deprecat" in r.getMessage().lower()]
    assert not logged and not [w for w in caught if issubclass(w.category, DeprecationWarning)], logged


def test_the_ui_command_hides_the_deploy_button() -> None:
    from cli.ui import streamlit_command

    argv = streamlit_command("127.0.0.1", 8501)
    assert argv[argv.index("--client.toolbarMode") + 1] == "minimal"


# ---------------------------------------------------------------- judge, retrieve stages and embedding models

def with_judge_and_embedder(config: ConfigDir) -> None:
    """'judge' (the demo file under another name, so the fake backend scripts it apart) and an embedding model."""
    models = config.models()
    models["models"]["judge"] = {**models["models"]["gemma3-270m"]}
    models["models"]["embedder"] = {**models["models"]["gemma3-270m"], "role": "embedding"}
    config.write_models(models)


def test_a_judge_stage_is_built_with_a_judge_model_and_no_embedding_model_is_offered(ui_env: ConfigDir) -> None:
    with_judge_and_embedder(ui_env)
    at = manual(app("run"))
    sid = at.session_state["builder_stages"][0]["id"]
    at.button(key=f"s{sid}-add-call").click().run()
    assert "embedder" not in str(at.selectbox(key=f"c{at.session_state['builder_stages'][0]['models'][0]['id']}"
                                              "-model").options)
    at.selectbox(key=f"s{sid}-agg").set_value("judge").run()
    judge = at.selectbox(key=f"s{sid}-judge")
    assert judge.label == "Judge model" and "embedder" not in str(judge.options) and "judge" in judge.options
    assert any("judge_model" in plain(e.value) for e in at.error) and at.button(key="run").disabled  # none chosen
    judge.set_value("judge").run()
    at.selectbox(key=f"s{sid}-judge-mode").set_value("pairwise").run()
    at.text_area(key=f"s{sid}-judge-prompt").set_value("A: {{ answer_a }} B: {{ answer_b }} Winner:").run()
    assert not at.exception and not at.error and not at.button(key="run").disabled
    agg = stage_builder.build_spec(at.session_state["builder_stages"]).stages[0].aggregation
    assert (agg.type, agg.judge_model, agg.judge_mode) == ("judge", "judge", "pairwise")
    assert agg.judge_prompt == "A: {{ answer_a }} B: {{ answer_b }} Winner:"


def _judge_reply(request: GenerationRequest) -> str:
    """The judge: Paris is right. Its reasons carry a Markdown image, which the page must show as text."""
    prompt = request.prompt
    if "Answer A:" in prompt:  # the built-in pairwise prompt
        first_is_paris = prompt.find("Paris") < prompt.find("Lyon")
        return json.dumps({"winner": "A" if first_is_paris else "B", "reason": "![x](http://evil.example/p) Paris"})
    good = "Paris" in prompt
    return json.dumps({"score": 9 if good else 3, "reason": "![x](http://evil.example/s) right" if good
                       else "Wrong city."})


@pytest.mark.parametrize("mode", ["score", "pairwise"])
def test_history_shows_the_judges_scores_or_pairs_and_the_winner_as_text(ui_env: ConfigDir, mode: str) -> None:
    with_judge_and_embedder(ui_env)
    rt = Runtime(load_config(ui_env.path))
    try:
        spec = PipelineSpec.model_validate({"stages": [{
            "name": "answer", "models": [{"model": "gemma3-270m", "label": "lyon"},
                                         {"model": "smollm2-135m", "label": "paris"}],
            "aggregation": {"type": "judge", "judge_model": "judge", "judge_mode": mode}}]})
        backend = FakeBackend().script("gemma3-270m", "Lyon").script("smollm2-135m", "Paris")
        backend.script("judge", _judge_reply)
        outcome = asyncio.run(Runner(rt).arun(spec, "What is the capital of France?", backend=backend))
    finally:
        rt.close()
    assert outcome.run.status == "completed" and outcome.run.final == "Paris", outcome.run.error
    at = app("history")
    assert not at.exception
    shown = [plain(m.value) for m in at.markdown] + [plain(c.value) for c in at.caption]
    texts = [t.value for t in at.text]
    assert "Judged by judge (" + mode + ")" in shown
    assert "Winner: paris (" + ("9" if mode == "score" else "1") + ")" in shown
    if mode == "score":
        assert "lyon (gemma3-270m): score 3/10" in shown and "paris (smollm2-135m): score 9/10" in shown
        assert "Wrong city." in texts and "![x](http://evil.example/s) right" in texts
    else:
        assert "lyon loses to paris: 0 point(s) of 1" in shown
        assert "A = lyon, B = paris: paris" in shown and "A = paris, B = lyon: paris" in shown
        assert texts.count("![x](http://evil.example/p) Paris") == 2
    assert not any("](http://evil" in m.value for m in [*at.markdown, *at.caption])  # never a live image


def test_manual_mode_builds_a_retrieve_stage_then_a_generate_stage(ui_env: ConfigDir) -> None:
    from orchestrator.rag.store import DocStore

    (ui_env.path.parent / "guide.md").write_text("# Install\n\nThe daemon listens on port 8125.\n")
    DocStore.beside(ui_env.sessions_dir).add("kb", [ui_env.path.parent / "guide.md"])
    at = manual(app("run"))
    at.button(key="add-stage").click().run()
    first = at.session_state["builder_stages"][0]["id"]
    at.text_input(key=f"s{first}-name").set_value("sources").run()
    at.radio(key=f"s{first}-kind").set_value("retrieve").run()
    assert not any(s.key == f"s{first}-agg" for s in at.selectbox)  # no aggregation, model call or parameter
    assert not any(n.key == f"s{first}-temperature" for n in at.number_input)
    assert not any(b.key == f"s{first}-add-call" for b in at.button)
    assert at.selectbox(key=f"s{first}-collection").options == ["kb"]
    at.selectbox(key=f"s{first}-collection").set_value("kb").run()
    at.number_input(key=f"s{first}-retrieve-top_k").set_value(3).run()
    at.radio(key=f"s{first}-query_from").set_value("question").run()
    assert not at.exception and not at.error and not at.button(key="run").disabled
    spec = stage_builder.build_spec(at.session_state["builder_stages"])
    retrieve, answer = spec.stages
    assert (retrieve.kind, retrieve.collection, retrieve.top_k, retrieve.query_from, retrieve.models) == (
        "retrieve", "kb", 3, "question", [])
    assert answer.kind == "generate" and [m.model for m in answer.models] == ["gemma3-270m"]
    again, _ = stage_builder.from_spec(spec)  # loaded back, the builder shows the same retrieve stage
    assert stage_builder.build_spec(again) == spec


# ---------------------------------------------------------------- QA: forms match the schema, refusals up front

def test_the_load_controls_take_the_schemas_bounds() -> None:
    from launcher.process.server import MAX_N_CTX, MIN_N_CTX
    from ui import params_form

    load = params_form.load_fields()
    assert params_form.int_bounds(load["n_ctx"]) == (MIN_N_CTX, MAX_N_CTX)
    assert params_form.int_bounds(load["n_gpu_layers"]) == (-1, None)  # a large number is "every layer"


def test_a_saved_pipeline_with_large_schema_valid_values_loads_and_shows_them(ui_env: ConfigDir) -> None:
    from launcher.process.server import MAX_N_CTX
    from tests import yamlfile

    big = {"n_gpu_layers": 9999, "top_k": 1_000_000, "seed": 2**32 - 1, "repeat_last_n": -1,
           "max_tokens": 1_000_000, "temperature": 5.0, "presence_penalty": -2.0}
    folder = ui_env.path / "pipelines"
    folder.mkdir()
    (folder / "big.yaml").write_text(yamlfile.dump({"name": "big", "defaults": {**big, "n_ctx": MAX_N_CTX},
                                                    "stages": [{"name": "one", "models": ["gemma3-270m"],
                                                                **big, "n_ctx": 512}]}))
    at = manual(app("run"))
    at.selectbox(key="load-choice").set_value("big").run()
    at.button(key="load").click().run()
    sid = at.session_state["builder_stages"][0]["id"]
    at.session_state["defaults-open"] = True  # every box open: each control shows the file's value
    at.session_state[f"s{sid}-more"] = True
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.number_input(key=f"s{sid}-ngl").value == 9999 and at.number_input(key="pd-n_gpu_layers").value == 9999
    assert at.number_input(key="pd-n_ctx").value == MAX_N_CTX
    assert at.number_input(key=f"s{sid}-top_k").value == 1_000_000 and at.number_input(key="pd-seed").value == 2**32 - 1
    spec = stage_builder.build_spec(at.session_state["builder_stages"], name="big",
                                    defaults=at.session_state["builder_defaults"])
    assert spec.model_dump() == load_pipeline_file(folder / "big.yaml").model_dump()


def test_a_malformed_label_format_is_refused_in_the_builder_naming_the_field(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    sid = at.session_state["builder_stages"][0]["id"]
    at.text_input(key=f"s{sid}-label-format").set_value("{nolabel} {").run()
    assert not at.exception
    assert any("label_format" in plain(e.value) and "malformed" in plain(e.value) for e in at.error), \
        [e.value for e in at.error]
    assert at.button(key="run").disabled  # refused before any model answers


def grammar_and_schema_refused(at: AppTest) -> bool:
    return any("grammar" in plain(e.value) and "json_schema" in plain(e.value) and "not both" in plain(e.value)
               for e in at.error)


def test_grammar_and_json_schema_together_are_refused_in_base_modes_settings(ui_env: ConfigDir) -> None:
    at = app("run")
    first = ui_env.pipeline()["stages"][0]["name"]
    for tab, scope in (("All stages", "defaults"), (first, first)):
        open_settings_tab(at, tab)
        at.text_area(key=f"gen-{scope}-grammar").set_value('root ::= "yes" | "no"').run()
        at.text_area(key=f"gen-{scope}-json_schema").set_value('{"type": "object"}').run()
        assert not at.exception and grammar_and_schema_refused(at) and at.button(key="run").disabled, scope
        at.session_state["gen-open"] = False  # folded, still refused
        at.run()
        assert grammar_and_schema_refused(at) and at.button(key="run").disabled, scope
        open_settings_tab(at, tab)
        at.text_area(key=f"gen-{scope}-json_schema").set_value("").run()
        assert not grammar_and_schema_refused(at) and not at.button(key="run").disabled, scope
        at.text_area(key=f"gen-{scope}-grammar").set_value("").run()


def _fake_session(config: ConfigDir, spec: PipelineSpec | None = None, *, mode: RunMode = "manual") -> Any:
    """A saved session made on the scripted backend (no llama-server), before the page opens."""
    rt = Runtime(load_config(config.path))
    try:
        spec = spec or rt.config.load_pipeline()
        return asyncio.run(Runner(rt).arun(spec, "Name a colour.", mode=mode, backend=FakeBackend()))
    finally:
        rt.close()


def rerun_button(at: AppTest) -> Any:
    return next(b for b in at.button if b.label == "Rerun from this stage")


def test_grammar_and_json_schema_together_are_refused_in_the_rerun_form(ui_env: ConfigDir) -> None:
    _fake_session(ui_env, PipelineSpec.model_validate({"stages": [
        {"name": "one", "models": ["gemma3-270m"]}, {"name": "two", "models": ["gemma3-270m"]}]}))
    at = app("history")
    at.text_area(key="rerun-history-s-two-grammar").set_value('root ::= "yes"')
    at.text_area(key="rerun-history-s-two-json_schema").set_value('{"type": "object"}')
    rerun_button(at).click().run()
    assert not at.exception and grammar_and_schema_refused(at) and "live_run" not in at.session_state
    assert any("stage 'two'" in plain(e.value) for e in at.error)


def test_rerunning_a_base_session_whose_pipeline_is_now_blocked_is_refused_in_the_form(ui_env: ConfigDir) -> None:
    parent = _fake_session(ui_env, mode="base")
    assert parent.run.status == "completed"
    (ui_env.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    sessions = sorted(p.name for p in ui_env.sessions_dir.iterdir())
    at = app("history")
    rerun_button(at).click().run()
    assert not at.exception
    assert any("the base pipeline is blocked" in plain(e.value) and "gemma3-270m" in plain(e.value)
               for e in at.error), [e.value for e in at.error]
    assert "live_run" not in at.session_state  # the page stays, no run starts
    assert sorted(p.name for p in ui_env.sessions_dir.iterdir()) == sessions  # and no failed session is saved


def test_a_failed_sessions_error_is_shown_on_history_and_results(ui_env: ConfigDir) -> None:
    (ui_env.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    failed = _fake_session(ui_env, mode="base")  # let through unchecked: the run fails and is saved
    assert failed.run.status == "failed" and failed.session_id
    for page in ("history", "results"):
        at = app(page)
        assert not at.exception, page
        assert any("Run failed" in plain(e.value) and "the base pipeline is blocked" in plain(e.value)
                   for e in at.error), (page, [e.value for e in at.error])


def test_moving_a_stage_that_reads_previous_to_the_top_is_warned_not_refused(ui_env: ConfigDir) -> None:
    at = manual(app("run"))
    at.button(key="add-stage").click().run()
    second = at.session_state["builder_stages"][1]
    assert second["prompt"] == "{{ previous }}"
    assert not any("runs first" in plain(w.value) for w in at.warning)
    at.button(key=f"s{second['id']}-up").click().run()
    assert not at.exception
    assert any("'stage2' runs first" in plain(w.value) and "previous" in plain(w.value) for w in at.warning), \
        [w.value for w in at.warning]
    assert not at.button(key="run").disabled  # a warning: the run is still the user's to start


def test_a_model_that_fits_nowhere_disables_run_with_no_sequential_offer(ui_env: ConfigDir) -> None:
    from launcher.process.server import MAX_N_CTX

    server = yamlfile_load(ui_env.path / "app.yaml")["server"]
    ui_env.write_app(server={**server, "memory_budget_mib": 4096})  # the same on every machine
    at = manual(app("run"))
    sid = at.session_state["builder_stages"][0]["id"]
    at.number_input(key=f"s{sid}-n_ctx").set_value(512).run()
    assert not at.button(key="run").disabled
    at.number_input(key=f"s{sid}-n_ctx").set_value(MAX_N_CTX).run()
    assert not at.exception
    assert any("even one model at a time" in plain(e.value) and "does not fit even alone" in plain(e.value)
               for e in at.error), [e.value for e in at.error]
    assert at.button(key="run").disabled
    assert not any(c.key == "allow_sequential" for c in at.checkbox)  # waves cannot help


def yamlfile_load(path: Path) -> Any:
    from tests import yamlfile

    return yamlfile.load(path.read_text())
