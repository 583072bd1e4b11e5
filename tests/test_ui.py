"""The Streamlit pages under AppTest, on the real demo model and llama-server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from orchestrator.config import stage_builder
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.runs import Runner
from orchestrator.runtime import Runtime
from tests.conftest import REPO, ConfigDir

APP = str(REPO / "ui" / "app.py")


@pytest.fixture
def ui_env(config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config_dir.path))
    yield config_dir
    from launcher.server import stop_all_servers
    from ui.common import _runtime

    _runtime.clear()
    stop_all_servers()


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py")
        at.run()
    return at


@pytest.mark.parametrize("page", [None, "run", "results", "history", "models"])
def test_every_page_renders_without_exception(ui_env: ConfigDir, page: str | None) -> None:
    at = app(page)
    assert not at.exception, [e.value for e in at.exception]
    assert at.title


def test_base_mode_is_disabled_with_the_reason_when_a_model_is_missing(ui_env: ConfigDir) -> None:
    (ui_env.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    at = app("run")
    assert not at.exception
    radio = at.radio(key="mode_blocked")
    assert radio.disabled and radio.value == "Manual"
    assert any("Base mode is unavailable" in w.value and "gemma3-270m" in w.value for w in at.warning)


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
    at.multiselect(key=f"s{b}-models").set_value(["gemma3-270m"]).run()
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


def test_stop_button_cancels_the_run_in_flight(ui_env: ConfigDir) -> None:
    at = app("run")
    at.radio(key="mode").set_value("Manual").run()
    sid = at.session_state["builder_stages"][0]["id"]
    at.number_input(key=f"s{sid}-max_tokens").set_value(3000).run()
    at.text_input(key=f"s{sid}-prompt").set_value("Count: 1, 2, 3,").run()
    at.text_area(key="question").set_value("count").run()
    at.button(key="run").click().run()
    live = at.session_state["live_run"]
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(m.text for s in live.snapshot() for m in s.models.values()):
        time.sleep(0.05)  # wait until it is really generating
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
    errors = [e.value for e in at.error]
    assert any(f"'{function}' is not an allowed aggregator" in e and "stages.answer.aggregation.function" in e
               and "allowed: none" in e for e in errors), errors
    assert at.button(key="run").disabled
    assert DOOR_SENTINEL not in sys.modules and not door_sentinel.exists()
