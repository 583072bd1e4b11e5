"""Fault 13.10: Markdown injection in the UI.

A question or a model's output containing `![x](http://host/...)` was rendered by st.markdown (and by
captions, alerts and expander labels, which render Markdown too), so every browser that opened Results or
History fetched that URL: a data-leak channel. User and model text is now rendered as text (st.text,
st.code) or escaped; these tests walk every element the pages produce and fail if any Markdown-rendering
element carries the injected syntax unescaped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from orchestrator.history.store import SessionStore
from orchestrator.records import AggregationRecord, ErrorInfo, ResponseRecord, StageRecord
from tests.conftest import REPO, ConfigDir
from tests.test_sessions import record_run

INJECTED = "![x](http://leak.example/q.png)"
LINK = "[click](http://leak.example/)"
PLAIN = {"Text", "Code", "Dataframe"}  # elements that show their text as it is (text, code, a data grid)
UNESCAPED = re.compile(r"\]\(http|(?<!\\)<img")  # a Markdown link/image, raw HTML; escaped forms differ


def hostile_stages() -> list[StageRecord]:
    bad = f"see {INJECTED} and {LINK} <img src=http://leak.example/i.png>"
    one = StageRecord(1, "analyse", prompt=f"Question: {bad}", status="ok", output=f"answer {bad}",
                      responses=[ResponseRecord("gemma", f"gemma {INJECTED}", text=f"answer {bad}", status="ok",
                                                completion_tokens=3, total_s=0.1)])
    two = StageRecord(2, "review", prompt=bad, status="partial", output=f"merged {bad}",
                      error=ErrorInfo("AggregationError", f"stage error {bad}"),
                      responses=[ResponseRecord("a", "gemma", text=f"a {bad}", status="ok"),
                                 ResponseRecord("b", "gemma", status="failed",
                                                error=ErrorInfo("ServerError", f"died {bad}",
                                                                hint=f"hint {INJECTED}"))],
                      aggregation=AggregationRecord("synthesis", output=f"merged {bad}",
                                                    details={"synthesis_prompt": f"prompt {bad}",
                                                             "synthesis_model": f"gemma {INJECTED}"}))
    return [one, two]


def unescaped(at: AppTest) -> list[str]:
    """The Markdown-rendering elements (markdown, captions, alerts, labels...) that carry the injection."""
    found: list[str] = []

    def walk(node: Any) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None and type(proto).__name__ not in PLAIN:
            text = str(proto)
            if UNESCAPED.search(text):
                found.append(f"{type(proto).__name__}: {text[:200]}")
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return found


def shown_as_text(at: AppTest) -> str:
    return "\n".join(t.value for t in at.text) + "\n".join(c.value for c in at.code)


@pytest.fixture
def hostile_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    models = tmp_path / "models"
    models.mkdir()
    cfg = ConfigDir(tmp_path, models)
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(cfg.path))
    store = SessionStore(cfg.sessions_dir)
    recorder = store.create({"mode": "manual", "question": "q", "pipeline": {"stages": []}})
    record_run(recorder, hostile_stages(), question=f"What is {INJECTED} {LINK}?")
    yield recorder.id
    from ui.common import _chorus

    _chorus.clear()


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("page", ["history", "results"])
def test_a_saved_session_with_markdown_in_its_text_renders_it_as_text(hostile_session: str, page: str) -> None:
    at = open_page(page)
    if page == "history":
        at.selectbox(key="history-open").set_value(hostile_session).run()
        assert not at.exception
    assert unescaped(at) == []
    text = shown_as_text(at)
    assert f"What is {INJECTED}" in text and f"answer see {INJECTED}" in text  # shown, as text
    assert f"prompt see {INJECTED}" in text
    assert any("died see" in e.value for e in at.error)  # the error is there, escaped


def _live_page() -> None:
    """A live run whose every text field carries the injection (run by AppTest.from_function)."""
    from types import SimpleNamespace

    from orchestrator.records import ErrorInfo
    from ui.common import render_live
    from ui.live import ModelView, StageView

    bad = "![x](http://leak.example/q.png)"
    stage = StageView(1, "s", status="failed", merged_by=f"concat {bad}", output=f"merged {bad}",
                      error=f"stage {bad}",
                      models={"a": ModelView("a", f"m {bad}", text=f"t {bad}", status="failed", error=f"e {bad}"),
                              "b": ModelView("b", "m", text=f"u {bad}", status="ok")})
    run = SimpleNamespace(status="completed", final=f"final {bad}\nsecond line", error=None)
    outcome = SimpleNamespace(history_error=f"h {bad}", run=run, session_id="session_001")
    live = SimpleNamespace(notices=[f"note {bad}"], snapshot=lambda: [stage],
                           error=ErrorInfo("RunFailed", f"start {bad}"), outcome=outcome)
    render_live(live)


def test_a_live_run_with_markdown_in_its_text_renders_it_as_text() -> None:
    at = AppTest.from_function(_live_page, default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert unescaped(at) == []
    assert f"t {INJECTED}" in shown_as_text(at)
    final = next(m.value for m in at.markdown if "chorus-final-answer" in m.value)
    assert "final" in final and "<br>" in final and "](" not in final  # the answer, as characters
