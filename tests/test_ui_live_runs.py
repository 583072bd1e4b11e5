"""A run started from the UI stays watchable and stoppable: after a reload (a new browser session), from another
tab, and while another action (a rerun) would take its place. On the real demo model and llama-server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.fake import FakeBackend
from orchestrator.engine.run import CancelToken
from orchestrator.runs import Runner
from orchestrator.runtime import Runtime
from tests.conftest import ConfigDir
from tests.test_ui import app, plain, start_long_run, ui_env  # noqa: F401  (the pages' fixture, used by name)
from ui.background import ACTIVE, Background
from ui.live import LiveRun


class Waiting(Background[str]):
    """Work that runs until it is cancelled or released."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__("test-waiting", "waiting")
        self._begin(lambda cancel: self._wait(cancel, release))

    @staticmethod
    def _wait(cancel: CancelToken, release: threading.Event) -> str:
        while not (cancel.cancelled or release.wait(0.01)):
            pass
        return "done"


def test_work_in_progress_is_listed_until_it_ends() -> None:
    release = threading.Event()
    first, second = Waiting(release), Waiting(release)
    assert [w for w in ACTIVE.running(Waiting) if w in (first, second)] == [first, second]
    assert not [w for w in ACTIVE.running(LiveRun) if w in (first, second)]  # listed by kind
    first.cancel()
    assert first.wait(5)
    assert [w for w in ACTIVE.running(Waiting) if w in (first, second)] == [second]
    release.set()
    assert second.wait(5) and second.result == "done"
    assert not [w for w in ACTIVE.running(Waiting) if w in (first, second)]


@pytest.mark.integration  # a real run: the demo models
@pytest.mark.usefixtures("ui_env")
def test_a_run_survives_a_reload_and_is_stopped_from_the_new_page() -> None:
    first_tab = app("run")
    live = start_long_run(first_tab, "count for the reload test")
    try:
        reloaded = app("run")  # a new browser session: its session_state is empty
        assert "live_run" not in reloaded.session_state
        assert any("is in progress: count for the reload test" in plain(i.value) for i in reloaded.info)
        assert not reloaded.exception
        results = app("results")  # the Results page points to it too
        assert any("count for the reload test" in plain(i.value) for i in results.info)
        reloaded.button(key="run-attach-0").click().run()
        assert reloaded.session_state["live_run"] is live
        reloaded.button(key="stop").click().run()
        assert live.wait(60) and live.outcome is not None
        assert live.outcome.run.status == "cancelled"
        reloaded.run()
        assert any(f"Run cancelled — session {live.outcome.session_id}" in plain(e.value) for e in reloaded.error)
        assert not [r for r in ACTIVE.running(LiveRun) if r is live]
    finally:
        live.cancel()
        live.wait(60)


@pytest.mark.integration  # a real run: the demo models
@pytest.mark.usefixtures("ui_env")
def test_a_rerun_is_refused_while_this_sessions_run_goes_on(config_dir: ConfigDir, llama_server_bin: Path) -> None:
    rt = Runtime(load_config(config_dir.path))
    try:  # a saved session to rerun (on the scripted backend)
        spec = PipelineSpec.model_validate({"stages": [{"name": "one", "models": ["gemma3-270m"], "max_tokens": 4}]})
        parent = asyncio.run(Runner(rt).arun(spec, "Name a colour.", backend=FakeBackend()))
    finally:
        rt.close()
    at = app("run")
    live = start_long_run(at)
    try:
        at.switch_page("views/history.py")
        at.run()
        at.selectbox(key="history-open").set_value(parent.session_id).run()
        submit = next(b for b in at.button if "Rerun from this stage" in b.label)
        assert submit.disabled  # a rerun would take the run's place: the first could no longer be stopped
        assert at.session_state["live_run"] is live
    finally:
        live.cancel()
        assert live.wait(60)
    at.run()
    assert not next(b for b in at.button if "Rerun from this stage" in b.label).disabled
