"""`chorus run` and `chorus history` as a user runs them, on the demo model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, ConfigDir

pytestmark = pytest.mark.integration


def chorus(config_dir: ConfigDir, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL)


def test_run_json_then_history_list_show_search_rerun(config_dir: ConfigDir, llama_server_bin) -> None:
    out = chorus(config_dir, "run", "Why is the sky blue?", "--json", "--set", "defaults.max_tokens=10",
                 "--set", "defaults.n_ctx=1024")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"session_id", "session_dir", "status", "final", "stages"}
    assert data["status"] == "completed" and data["final"]
    assert [s["name"] for s in data["stages"]] == ["analyse", "draft", "review"]
    assert {"model", "text", "error"} <= set(data["stages"][2]["responses"][0])
    assert data["stages"][2]["aggregation"]["kind"] == "synthesis"
    assert "[1/3] analyse" in out.stderr and "tokens in" in out.stderr

    listed = json.loads(chorus(config_dir, "history", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [data["session_id"]]
    shown = chorus(config_dir, "history", "show", "1")
    assert "step 3: review" in shown.stdout and "== final" in shown.stdout
    found = json.loads(chorus(config_dir, "history", "search", "sky", "--json").stdout)
    assert found and found[0]["id"] == data["session_id"]

    rerun = chorus(config_dir, "history", "rerun", "1", "--stage", "3", "--json", "--set", "review.max_tokens=4")
    assert rerun.returncode == 0, rerun.stderr
    child = json.loads(rerun.stdout)
    assert child["session_id"] == "session_002" and child["stages"][0]["status"] == "copied"

    reindexed = chorus(config_dir, "history", "reindex")
    assert "reindexed 2 session(s)" in reindexed.stdout


def test_run_plain_prints_the_final_answer_on_stdout(config_dir: ConfigDir, llama_server_bin, tmp_path) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text("stages:\n  - {name: only, models: [gemma3-270m], max_tokens: 6, n_ctx: 512}\n")
    out = chorus(config_dir, "run", "The capital of France is", "--manual", str(spec))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "status: completed" in out.stderr and "session_001" in out.stderr


def test_run_in_base_mode_with_a_missing_model_is_refused_with_the_reason(config_dir: ConfigDir) -> None:
    (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    out = chorus(config_dir, "run", "hello")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "base pipeline is blocked" in out.stderr and "gemma3-270m" in out.stderr


def test_bad_set_value_names_the_field(config_dir: ConfigDir) -> None:
    out = chorus(config_dir, "run", "hello", "--set", "review.temperature=hot")
    assert out.returncode == 2 and "stages[2].temperature" in out.stderr and "Traceback" not in out.stderr


def test_history_show_of_an_unknown_session_is_a_clear_error(config_dir: ConfigDir) -> None:
    out = chorus(config_dir, "history", "show", "42")
    assert out.returncode == 2 and "no session 'session_042'" in " ".join(out.stderr.split())
