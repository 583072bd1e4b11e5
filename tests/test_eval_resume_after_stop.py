"""Issue #22 item 5, on the real server: `chorus stop --all` while an eval runs fails the runs in flight; the
eval still finishes, and `chorus eval resume` answers the failed items again (not only the interrupted ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir

pytestmark = pytest.mark.integration


def chorus(config_dir: ConfigDir, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, env=os.environ.copy())


def test_eval_resume_answers_again_what_a_stop_all_failed(config_dir: ConfigDir, llama_server_bin: Path,
                                                          tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Count from 1 to {20 + i}.",
                                             "answer": ["1"]}) + "\n" for i in range(4)))
    pipeline = tmp_path / "one.yaml"
    pipeline.write_text(json.dumps({"name": "one", "defaults": {"n_ctx": 512, "max_tokens": 48, "seed": 1},
                                    "stages": [{"name": "a", "models": ["gemma3-270m"],
                                                "prompt": "{{ question }}\n1, 2,"}]}))
    cmd = [sys.executable, "-m", "cli", "eval", str(questions), "--pipeline", str(pipeline), "--baselines", "none",
           "--json", "--config-dir", str(config_dir.path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # its server is up: a run is in flight
            ps = run_main("ps", "--json", "--config-dir", str(config_dir.path))  # in this process: polled often
            if ps.returncode == 0 and json.loads(ps.stdout or "[]"):
                break
            time.sleep(0.2)
        stopped = chorus(config_dir, "stop", "--all", timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = json.loads(out)
    eval_id = first["eval"]["id"]
    pipeline_row = next(s for s in first["systems"] if s["system"] == "pipeline")
    assert pipeline_row["failed"] >= 1, (pipeline_row, err[-1500:])  # the stop landed mid-eval
    resumed = chorus(config_dir, "eval", "resume", eval_id, "--json")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    report = json.loads(resumed.stdout)
    row = next(s for s in report["systems"] if s["system"] == "pipeline")
    assert row["failed"] == 0 and row["answered"] == 4, row
    assert all(it["systems"]["pipeline"]["status"] == "completed" for it in report["items"])
