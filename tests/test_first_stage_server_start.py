"""The first stage's server is started ahead (while the session is written), and the run records it as what it
is: a server this run started, whose start its calls waited for. It was recorded `started: false` (the wave
found it warm) and the wait was left out of the calls' times, unlike every later stage's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ConfigDir

pytestmark = pytest.mark.integration


def test_the_first_stages_server_start_is_recorded_and_counted_in_its_calls_time(
        config_dir: ConfigDir, llama_server_bin: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "two.yaml"
    pipeline.write_text(json.dumps({"name": "two", "defaults": {"n_ctx": 512, "max_tokens": 4, "seed": 1},
                                    "stages": [{"name": "one", "models": ["gemma3-270m"]},
                                               {"name": "two", "models": ["gemma3-270m"]}]}))
    out = subprocess.run([sys.executable, "-m", "cli", "run", "The sky is", "--manual", str(pipeline), "--json",
                          "--config-dir", str(config_dir.path)],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    session = config_dir.sessions_dir / json.loads(out.stdout)["session_id"]
    one, two = (json.loads((session / f"step{i}.json").read_text()) for i in (1, 2))
    assert [s["started"] for s in one["wave_servers"][0]["servers"]] == [True]  # started by this run, ahead
    assert one["wave_servers"][0]["need"].get("ram", 0) > 100 * 2**20  # what it needed, not 0 once warm
    assert [s["started"] for s in two["wave_servers"][0]["servers"]] == [False]  # warm: reused
    first = one["responses"][0] if "responses" in one else one["response"]
    assert abs(first["started_at"] - one["started_at"]) < 0.05  # its time counts from the stage's start
    waited = (first["finished_at"] - first["started_at"]) - first["total_s"]
    assert waited > 0.1, f"the server's start is missing from the call's time ({waited:.3f}s)"
