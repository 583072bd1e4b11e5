"""`chorus models` and `chorus check`: their main() in this process (tests/clirun.py); the tests with a real
llama-server run chorus as a user does, a process of its own (serve, ps and stop across processes)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir


def chorus(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS` as a process of its own."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_models_json_lists_the_demo_model_as_available(config_dir: ConfigDir) -> None:
    out = run_main("models", "--json", "--config-dir", str(config_dir.path))
    assert out.returncode == 0, out.stderr
    demo = next(m for m in json.loads(out.stdout) if m["name"] == "gemma3-270m")
    assert demo["status"] == "available"
    assert demo["architecture"] == "gemma3"
    assert demo["context_length"] == 32768
    assert demo["block_count"] == 18
    assert demo["size_bytes"] > 200_000_000


def test_models_shows_missing_entry_and_logs_a_warning(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["ghost"] = {"file": "ghost.gguf"}
    config_dir.write_models(models)
    out = run_main("models", "--json", "--config-dir", str(config_dir.path))
    ghost = next(m for m in json.loads(out.stdout) if m["name"] == "ghost")
    assert ghost["status"] == "missing" and "not found" in ghost["reason"]
    assert "warning" in out.stderr.lower() and "ghost" in out.stderr
    table = run_main("models", "--config-dir", str(config_dir.path))
    assert "missing" in table.stdout and "gemma3" in table.stdout


def test_check_reports_blocked_base_pipeline_and_memory(config_dir: ConfigDir) -> None:
    (config_dir.models_dir / "gemma-3-270m-q4_k_m.gguf").unlink()
    out = run_main("check", "--config-dir", str(config_dir.path))
    assert out.returncode == 0
    assert "BLOCKED" in out.stdout and "gemma3-270m" in out.stdout
    assert "RAM:" in out.stdout and "VRAM:" in out.stdout
    assert "server:" in out.stdout


def test_check_names_the_build_command_when_the_configured_binary_is_missing(config_dir: ConfigDir) -> None:
    config_dir.write_app(llama_server=str(config_dir.path / "no-such-llama-server"))
    out = run_main("check", "--json", "--config-dir", str(config_dir.path))
    server = json.loads(out.stdout)["llama_server"]
    assert server["path"] is None and "scripts/build_llama_server.sh" in server["error"]


def test_malformed_models_yaml_is_one_short_paragraph_without_traceback(config_dir: ConfigDir) -> None:
    config_dir.write_models("models:\n  a: {file: x.gguf\n")
    out = run_main("models", "--config-dir", str(config_dir.path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "models.yaml" in out.stderr and "line" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 4


def test_serve_runs_a_server_that_ps_lists_and_ctrl_c_stops(config_dir: ConfigDir, llama_server_bin) -> None:
    import os
    import signal
    import time

    import httpx
    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "gemma3-270m", "--n-ctx", "512",
                             "--config-dir", str(config_dir.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "ready" in line, proc.stderr.read() if proc.poll() is not None else line  # type: ignore
        url = line.split(": ", 1)[1].split()[0]
        assert httpx.get(f"{url}/health").status_code == 200
        ps = json.loads(chorus("ps", "--json", "--config-dir", str(config_dir.path)).stdout)
        assert [r["model"] for r in ps] == ["gemma3-270m"] and ps[0]["rss_bytes"] > 0
        server_pid = ps[0]["pid"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.2)
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
        assert "no llama-server running" in chorus("ps", "--config-dir", str(config_dir.path)).stdout
    finally:
        proc.kill()


def test_history_before_any_run_is_empty_not_an_error(config_dir: ConfigDir) -> None:
    assert not config_dir.sessions_dir.exists()
    out = run_main("history", "list", "--config-dir", str(config_dir.path))
    assert out.returncode == 0 and "no sessions yet" in out.stdout
    found = run_main("history", "search", "anything", "--json", "--config-dir", str(config_dir.path))
    assert found.returncode == 0 and json.loads(found.stdout) == []


def test_stop_stops_the_server_chorus_serve_started_in_another_terminal(config_dir: ConfigDir,
                                                                        llama_server_bin) -> None:
    import os

    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve = subprocess.Popen([sys.executable, "-m", "cli", "--config-dir", str(config_dir.path), "serve",
                              "gemma3-270m", "--n-ctx", "512"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env=env)
    try:
        line = serve.stdout.readline()  # type: ignore[union-attr]
        assert "ready" in line, serve.stderr.read() if serve.poll() is not None else line  # type: ignore
        (record,) = json.loads(chorus("ps", "--json", "--config-dir", str(config_dir.path)).stdout)
        out = chorus("--config-dir", str(config_dir.path), "stop", "gemma3-270m")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().startswith(f"gemma3-270m (pid {record['pid']}, port {record['port']}")
        assert out.stdout.strip().endswith(": stopped")
        assert serve.wait(timeout=30) == 0  # `serve` sees its server stopped from outside and ends cleanly
        assert "stopped from outside" in serve.stderr.read()  # type: ignore[union-attr]
        assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
        assert "no llama-server running" in chorus("ps", "--config-dir", str(config_dir.path)).stdout
    finally:
        serve.kill()
        serve.wait(timeout=30)
