"""Concurrent runs under a memory budget (`chorus api`): a run whose model does not fit beside another run's
busy server waits for that server to go idle (then stops it and starts its own) instead of failing at once
with "does not fit even alone" — it fits alone, once the other run is done."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ConfigDir
from tests.test_api import ApiProcess, load_session
from tests.test_memory_waves import need_mib, set_budget

pytestmark = [pytest.mark.integration, pytest.mark.serial]  # a budget from the live calibration


def test_a_run_waits_for_another_runs_busy_server_instead_of_failing(config_dir: ConfigDir,
                                                                    llama_server_bin: Path) -> None:
    big, small = need_mib(config_dir, "gemma3-270m", 2048), need_mib(config_dir, "smollm2-135m", 2048)
    set_budget(config_dir, int(max(big, small) + min(big, small) / 2))  # either alone, not both
    pipelines = config_dir.path / "pipelines"
    pipelines.mkdir(exist_ok=True)
    (pipelines / "long.yaml").write_text(
        "name: long\ndefaults: {n_ctx: 2048, max_tokens: 120, temperature: 0.8, seed: 1}\n"
        "stages:\n  - name: story\n    models: [gemma3-270m]\n    prompt: 'Chapter 1. {{ question }}'\n")
    (pipelines / "short.yaml").write_text(
        "name: short\ndefaults: {n_ctx: 2048, max_tokens: 4, seed: 1}\n"
        "stages:\n  - name: answer\n    models: [smollm2-135m]\n")
    api = ApiProcess(config_dir)
    try:
        first: dict[str, Any] = {}
        going = threading.Event()

        def long_run() -> None:
            body = {"model": "chorus/long", "stream": True, "messages": [{"role": "user", "content": "a ship"}]}
            with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=300) as response:
                for line in response.iter_lines():
                    if '"content"' in line:
                        going.set()  # generating: its server is busy
                    if line.startswith("data: {") and '"run_finished"' in line:
                        first["done"] = line
        thread = threading.Thread(target=long_run)
        thread.start()
        assert going.wait(120), "the long run did not start generating"
        reply = httpx.post(f"{api.url}/v1/chat/completions", timeout=300,
                           json={"model": "chorus/short", "messages": [{"role": "user", "content": "Hi"}]})
        thread.join(300)
        assert reply.status_code == 200, reply.text  # was 503: "does not fit even alone"
        session = load_session(api, reply.json()["chorus"]["session_id"])
        assert session.meta["status"] == "completed"
        assert "completed" in first.get("done", "")  # the long run was not disturbed
    finally:
        assert api.stop() == 0


def test_a_model_refused_while_another_process_holds_the_budget_says_so(config_dir: ConfigDir,
                                                                       llama_server_bin: Path,
                                                                       tmp_path: Path) -> None:
    """"does not fit even alone (… usable with every idle server stopped)" while `chorus serve` in another
    process held the budget: it fits once that one stops, and the message now says who holds it."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_memory_waves import chorus

    small = need_mib(config_dir, "smollm2-135m", 1024)
    set_budget(config_dir, int(small * 1.4))  # one smollm2 server, not two
    serve = subprocess.Popen([sys.executable, "-m", "cli", "serve", "smollm2-135m", "--n-ctx", "1024",
                              "--config-dir", str(config_dir.path)], cwd=REPO, env=os.environ.copy(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        assert serve.stdout is not None and "ready" in serve.stdout.readline()
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text("name: p\ndefaults: {n_ctx: 1024, max_tokens: 4}\n"
                            "stages:\n  - name: a\n    models: [smollm2-135m]\n")
        plan = chorus(config_dir, "plan", "--manual", str(pipeline))
        text = " ".join((plan.stdout + plan.stderr).split())
        assert "does not fit even alone" in text and "other chorus processes hold" in text, text
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
