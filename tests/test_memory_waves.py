"""Issue #22: memory waves that hold in real runs, on the real llama-server under a real budget.

Each run is `chorus run` in a fresh process (as a user starts it), on the live machine's memory with
`server.memory_budget_mib` set, and each meets a server left warm by an earlier stage. The budgets are
taken from the scheduler's own estimates of the demo models, so the tests hold on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.memory.fit import footprint
from orchestrator.config.schema import load_config
from orchestrator.runtime import Runtime
from tests.conftest import REPO, ConfigDir

pytestmark = [pytest.mark.integration,
              pytest.mark.serial]  # budgets from the live calibration: no other test's servers beside

MiB = 2**20


def chorus(config_dir: ConfigDir, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, env=os.environ.copy())


def set_budget(config_dir: ConfigDir, mib: int) -> None:
    app = load_config(config_dir.path).app
    config_dir.write_app(server={**app.server.model_dump(mode="json"), "memory_budget_mib": mib})


def need_mib(config_dir: ConfigDir, model: str, n_ctx: int, slots: int = 1) -> float:
    """The scheduler's own figure for one server on the budget (RAM + VRAM), in MiB."""
    rt = Runtime(load_config(config_dir.path))
    return footprint(rt.memory_guard.need(rt.server_spec(model, n_ctx=n_ctx, slots=slots))) / MiB


def server_starts(config_dir: ConfigDir) -> dict[str, int]:
    """llama-servers started, per model: each start writes its own log, <model>-<port>.log."""
    logs = config_dir.path.parent / "logs"
    counts: dict[str, int] = {}
    for log in logs.glob("*.log") if logs.is_dir() else []:
        if log.name == "chorus.log":
            continue
        model = log.stem.rsplit("-", 1)[0]
        counts[model] = counts.get(model, 0) + 1
    return counts


def step(config_dir: ConfigDir, session: str, index: int) -> dict[str, Any]:
    return json.loads((config_dir.sessions_dir / session / f"step{index}.json").read_text())


def response(config_dir: ConfigDir, session: str, index: int, label: str) -> dict[str, Any]:
    one = config_dir.sessions_dir / session / f"step{index}_{label}.json"
    data = json.loads(one.read_text()) if one.exists() else step(config_dir, session, index)["response"]
    assert isinstance(data, dict)
    return data


def test_the_shipped_pipeline_runs_its_three_reviewers_on_fewer_slots_when_three_do_not_fit(
        config_dir: ConfigDir, llama_server_bin: Path) -> None:
    """Shape 1 of the issue: three calls of one model on one server. The budget holds the 2-slot server,
    not the 3-slot one: the reviewers run as 2 calls then 1 on the same warm server, the analyse stage's
    server having been stopped for the draft, and the draft's for the review."""
    ctx = 8192
    two, three = need_mib(config_dir, "smollm2-135m", ctx, 2), need_mib(config_dir, "smollm2-135m", ctx, 3)
    budget = int((two + three) / 2)
    assert need_mib(config_dir, "gemma3-270m", ctx) < budget < three
    set_budget(config_dir, budget)
    sets = ["--set", f"defaults.n_ctx={ctx}", "--set", "defaults.max_tokens=8"]
    plan = chorus(config_dir, "plan", *sets)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"budget {budget} MiB" in plan.stdout and "stage 'review': runs in 2 waves" in plan.stdout
    out = chorus(config_dir, "run", "Why is the sky blue?", "--json", *sets)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["status"] == "completed"
    session = data["session_id"]
    review = step(config_dir, session, 3)
    assert review["execution"] == "sequential" and len(review["waves"]) == 2
    assert [len(w) for w in review["waves"]] == [2, 1]
    first, second = review["wave_servers"]
    assert [(s["model"], s["slots"], s["started"]) for s in first["servers"]] == [("smollm2-135m", 2, True)]
    assert [(s["model"], s["slots"], s["started"]) for s in second["servers"]] == [("smollm2-135m", 2, False)]
    assert first["stops"] == ["gemma3-270m"]  # the draft's warm server made room
    assert first["need"]["budget"] <= first["have"]["budget"]
    for label in ("reviewer-facts", "reviewer-clarity", "reviewer-skeptic"):
        answer = response(config_dir, session, 3, label)
        assert answer["status"] == "ok" and answer["completion_tokens"] > 0, answer
    assert "does not fit even alone" not in out.stderr
    # the review's second wave and the synthesis reuse the 2-slot server: no reload of a model in memory
    starts = server_starts(config_dir)
    assert starts.get("gemma3-270m") == 1 and starts.get("smollm2-135m", 0) <= 2, starts


@pytest.fixture
def three_models(config_dir: ConfigDir) -> ConfigDir:
    """smollm2-135m, a copy of it under another name (its own file, so its own server) and gemma3-270m."""
    real = (config_dir.models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    copy = config_dir.models_dir / "smollm2-copy.gguf"
    try:
        os.link(real, copy)
    except OSError:
        shutil.copy(real, copy)
    models = config_dir.models()
    models["models"]["smollm2-copy"] = {**models["models"]["smollm2-135m"], "file": copy.name}
    config_dir.write_models(models)
    return config_dir


def three_reviewers(path: Path) -> Path:
    """The issue's shape 2: analyse and draft leave two servers warm; three different reviewers follow."""
    spec = {"name": "three", "defaults": {"n_ctx": 1024, "max_tokens": 8, "temperature": 0.2, "seed": 3},
            "stages": [
                {"name": "analyse", "models": ["smollm2-135m"], "prompt": "Key facts: {{ question }}"},
                {"name": "draft", "models": ["gemma3-270m"], "prompt": "{{ previous }}\n{{ question }}\n"},
                {"name": "review", "models": ["smollm2-135m", "smollm2-copy", "gemma3-270m"],
                 "prompt": "{{ question }}\nDraft: {{ previous }}\nBetter:", "aggregation": {"type": "concat"}}]}
    path.write_text(json.dumps(spec))
    return path


def test_three_models_after_warm_stages_run_in_waves_when_two_fit(three_models: ConfigDir,
                                                                  llama_server_bin: Path, tmp_path: Path) -> None:
    """Shape 2: warm smollm2-135m and gemma3-270m from the earlier stages count once, as what they hold; the
    plan's waves are the waves that run, and every reviewer answers."""
    cfg = three_models
    small, big = need_mib(cfg, "smollm2-135m", 1024), need_mib(cfg, "gemma3-270m", 1024)
    budget = int(small + big + small / 2)  # the two warm ones fit together; all three do not
    set_budget(cfg, budget)
    pipeline = three_reviewers(tmp_path / "three.yaml")
    plan = chorus(cfg, "plan", "--manual", str(pipeline))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "stage 'review': runs in 2 waves" in plan.stdout
    out = chorus(cfg, "run", "Why is the sky blue?", "--manual", str(pipeline), "--allow-sequential", "--json")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["status"] == "completed", data.get("error")
    review = step(cfg, data["session_id"], 3)
    assert review["execution"] == "sequential" and len(review["waves"]) == 2
    assert sorted(label for w in review["waves"] for label in w) == ["gemma3-270m", "smollm2-135m", "smollm2-copy"]
    first = review["wave_servers"][0]
    assert {s["model"]: s["started"] for s in first["servers"]} == {"smollm2-135m": False, "gemma3-270m": False}
    for label in ("smollm2-135m", "smollm2-copy", "gemma3-270m"):
        assert response(cfg, data["session_id"], 3, label)["status"] == "ok"
    # each model loaded once: the warm servers were reused, the copy started once
    assert server_starts(cfg) == {"smollm2-135m": 1, "gemma3-270m": 1, "smollm2-copy": 1}


def test_a_budget_below_every_model_is_refused_before_any_server_starts(config_dir: ConfigDir,
                                                                       llama_server_bin: Path) -> None:
    smallest = need_mib(config_dir, "smollm2-135m", 2048)
    set_budget(config_dir, int(smallest / 2))
    out = chorus(config_dir, "run", "Why is the sky blue?", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    data = json.loads(out.stdout)
    error = data["error"]
    assert data["status"] == "failed" and error["type"] == "RunRefused"
    assert "does not fit even alone" in error["message"] and "budget: needs" in error["message"]
    assert f"{int(smallest / 2)} MiB usable" in error["message"] or "MiB usable" in error["message"]
    assert server_starts(config_dir) == {}
    shown = chorus(config_dir, "history", "show", data["session_id"])
    assert "why: the run does not fit in memory" in shown.stdout and "budget: needs" in shown.stdout
