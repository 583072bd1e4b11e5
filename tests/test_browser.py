"""A real browser: `chorus ui` served locally, driven in headless Chromium through Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, real_config_dir, subprocess_env

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (scripts/setup.sh installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, second_model: Path,
              llama_server_bin: Path) -> Iterator[str]:
    """One `chorus ui` on a free port for the module's tests (each in a page of its own); stopped at the end
    as a service manager or `kill` does, with SIGTERM, and then nothing of it may be left: no Streamlit, no
    warm llama-server of any of the runs."""
    config_dir = real_config_dir(tmp_path_factory.mktemp("ui"), demo_model, second_model)
    pipeline = config_dir.pipeline()
    pipeline["defaults"].update({"max_tokens": 12, "n_ctx": 1024})
    config_dir.write_pipeline(pipeline)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "ui", "--port", str(port),
                             "--config-dir", str(config_dir.path)], cwd=REPO, env=subprocess_env(config_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("chorus ui did not start listening")
        yield f"http://127.0.0.1:{port}"
        tree = _children(proc.pid)  # Streamlit, and the llama-servers the runs left warm
        assert any("streamlit" in " ".join(p.cmdline()) for p in tree), "no Streamlit under chorus ui"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(tree):
            time.sleep(0.1)
        assert not _alive(tree), f"left behind after SIGTERM to chorus ui: {_alive(tree)}"
    finally:
        for p in _children(proc.pid):  # whatever a failure left behind
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module; each test opens its own page (its own browser context)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield chrome
        finally:
            chrome.close()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[str]:
    """Names of the processes (Streamlit, llama-server) still running, zombies excepted."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.name()} ({p.pid})")
        except psutil.NoSuchProcess:
            continue
    return alive


def test_base_pipeline_runs_in_a_real_browser_to_its_final_answer(ui_server: str, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        page.goto(ui_server, timeout=60_000)
        page.get_by_label("Question").fill("Why is the sky blue?", timeout=60_000)
        page.keyboard.press("Tab")  # commit the text area
        page.get_by_role("button", name="Run", exact=True).click(timeout=30_000)
        final = page.locator("#chorus-final-answer")
        final.wait_for(timeout=240_000)
        assert final.inner_text().strip()
        assert page.get_by_text("Step 3: review").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "ui-run.png"), full_page=True)
    finally:
        page.close()
    assert (ARTIFACTS / "ui-run.png").stat().st_size > 10_000


def test_a_built_two_stage_pipeline_with_one_model_twice_runs_in_a_real_browser(ui_server: str,
                                                                                 browser: Any) -> None:
    """Manual mode in Chromium: two calls of the same model in stage 1 (one with a parameter set in its folded
    box, which keeps it when folded), a second stage, short answers; the Run button is clicked straight from
    the question box (no Tab first) and there is no Deploy button."""
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(ui_server, timeout=60_000)
        page.get_by_text("Manual", exact=True).click(timeout=60_000)
        page.get_by_role("button", name="➕ Add model call").click(timeout=30_000)
        page.get_by_text("Model call 2").wait_for(timeout=30_000)
        more = page.get_by_text("Other parameters of this call").first  # a folded box, built when opened
        top_k = page.locator('[class*="st-key-c"][class*="-top_k"] input')
        expect(top_k).to_have_count(0)
        more.click()
        expect(top_k).to_have_count(1, timeout=30_000)  # that call's controls only
        top_k.fill("1")
        top_k.press("Enter")
        expect(top_k).to_have_value("1", timeout=30_000)
        more.click()  # folded again: its controls leave the page, the value stays with the call
        expect(top_k).to_have_count(0, timeout=30_000)
        more.click()
        expect(top_k).to_have_value("1", timeout=30_000)
        page.get_by_role("button", name="➕ Add stage").click()
        stage_max_tokens = page.locator('[class*="st-key-s"][class*="-max_tokens"] input')
        expect(stage_max_tokens).to_have_count(2, timeout=30_000)
        for i in range(2):
            stage_max_tokens.nth(i).fill("6")
            stage_max_tokens.nth(i).press("Enter")
            expect(stage_max_tokens.nth(i)).to_have_value("6", timeout=30_000)
        page.get_by_label("Question").fill("Name three colours.")
        page.get_by_role("button", name="Run", exact=True).click(timeout=30_000)  # straight from typing
        final = page.locator("#chorus-final-answer")
        final.wait_for(timeout=240_000)
        assert final.inner_text().strip()
        assert page.get_by_text("Step 2: stage2").count() >= 1
        for label in ("gemma3-270m-1", "gemma3-270m-2"):  # both calls of the one model answered
            assert page.get_by_text(f"{label} (gemma3-270m)", exact=False).count() >= 1, label
        assert page.get_by_role("button", name="Deploy").count() == 0
        page.screenshot(path=str(ARTIFACTS / "ui-builder-run.png"), full_page=True)
    finally:
        page.close()


def test_a_fresh_ui_opened_on_a_page_url_shows_its_own_navigation(tmp_path: Path, demo_model: Path,
                                                                  second_model: Path, browser: Any) -> None:
    """A tab left on /history across a restart: with the pages in ui/pages/, Streamlit ran that file as a v1
    multipage app, with file names for navigation ("app, documents, eval…"), until someone opened /."""
    config_dir = real_config_dir(tmp_path, demo_model, second_model)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "ui", "--port", str(port),
                             "--config-dir", str(config_dir.path)], cwd=REPO, env=subprocess_env(config_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.3)
        page.goto(f"http://127.0.0.1:{port}/history", timeout=60_000)
        nav = page.locator('[data-testid="stSidebarNav"]')
        nav.get_by_text("Documents", exact=True).wait_for(timeout=60_000)  # the titles app.py gives
        assert nav.get_by_text("app", exact=True).count() == 0  # no file names
        page.get_by_role("heading", name="History").wait_for(timeout=30_000)
    finally:
        page.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
