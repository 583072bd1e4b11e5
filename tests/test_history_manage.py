"""History a user manages: export (Markdown, JSON), rm, prune, downloads in the UI, and what each call records.

Sessions are real ones, recorded by the Runner from a run on the FakeBackend (no llama-server: milliseconds);
the CLI's main() runs in this process (tests/clirun.py), and as a process of its own where another process's
view is the point (a session's writer lock).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.fake import FakeBackend
from orchestrator.history.export import (
    SessionBusy,
    parse_duration,
    prune_sessions,
    remove_sessions,
    session_markdown,
)
from orchestrator.history.serialize import SESSION_FILE
from orchestrator.history.store import SessionStore
from orchestrator.plan.resolve import Machine
from orchestrator.runs import Runner, RunOutcome
from orchestrator.runtime import Runtime
from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir

REVIEW = PipelineSpec.model_validate({"name": "t", "stages": [
    {"name": "analyse", "models": ["gemma3-270m"]},
    {"name": "review", "models": [{"model": "gemma3-270m", "label": "facts"},
                                  {"model": "gemma3-270m", "label": "skeptic"}],
     "aggregation": {"type": "synthesis", "synthesis_model": "gemma3-270m"}},
]})


def fake_run(config_dir: ConfigDir, question: str = "Why is the sky blue?", *,
             reply: str = "Rayleigh scattering makes it blue.", machine: Machine | None = None) -> RunOutcome:
    """A two-stage run (one call, then two calls merged by a synthesis call) recorded as a real session."""
    rt = Runtime(load_config(config_dir.path))
    if machine is not None:
        rt.machine = lambda: machine  # type: ignore[method-assign]
    try:
        backend = FakeBackend().script("gemma3-270m", reply, delay_s=0.01)
        return asyncio.run(Runner(rt).arun(REVIEW, question, backend=backend))
    finally:
        rt.close()


def chorus(config_dir: ConfigDir, *args: str) -> subprocess.CompletedProcess[str]:
    return run_main("--config-dir", str(config_dir.path), *args)


def chorus_process(config_dir: ConfigDir, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`chorus` as a process of its own, as a user types it."""
    return subprocess.run([sys.executable, "-m", "cli", "--config-dir", str(config_dir.path),
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def said(text: str) -> str:
    """CLI output with its line wrapping undone (errors are filled to 100 columns)."""
    return " ".join(text.split())


def set_created(session_dir: Path, created_at: float) -> None:
    path = session_dir / SESSION_FILE
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "created_at": created_at}))


# ---------------------------------------------------------------- export


def test_markdown_export_is_a_readable_report_of_every_step_answer_and_the_final(config_dir: ConfigDir) -> None:
    outcome = fake_run(config_dir, reply="Blue light scatters more. ![x](http://evil.example/p.png) ```")
    session = SessionStore(config_dir.sessions_dir).load(outcome.session_id)
    md = session_markdown(session)
    assert md.startswith(f"# chorus {outcome.session_id}")
    assert "## Question\n\n```text\nWhy is the sky blue?\n```" in md
    assert "## Step 1: analyse (ok" in md and "## Step 2: review (ok" in md
    for label in ("facts", "skeptic"):
        assert f"### {label} (gemma3-270m): ok" in md
    assert "### Aggregation: synthesis" in md and "Synthesis by gemma3-270m" in md
    assert md.rstrip().endswith("````")  # the final answer, fenced longer than the ``` inside it
    assert "## Final answer" in md and outcome.run.final.strip() in md
    assert "n_gpu_layers 0" in md
    # the model's Markdown image stays inside a fenced block: shown as text, never fetched
    for line in md.splitlines():
        if "![x](" in line:
            assert line.startswith("Blue light scatters more.")
    fences = [line for line in md.splitlines() if line.startswith("````")]
    assert len(fences) % 2 == 0 and fences


def test_cli_export_writes_markdown_and_json_that_matches_history_show(config_dir: ConfigDir, tmp_path: Path) -> None:
    outcome = fake_run(config_dir)
    sid = outcome.session_id
    md_file = tmp_path / "report.md"
    done = chorus(config_dir, "history", "export", sid.split("_")[1], "--format", "md", "-o", str(md_file))
    assert done.returncode == 0, done.stderr
    assert f"{sid} exported to {md_file}" in said(done.stderr)
    assert "## Step 2: review" in md_file.read_text(encoding="utf-8")

    exported = chorus(config_dir, "history", "export", sid, "--format", "json")
    shown = chorus(config_dir, "history", "show", sid, "--json")
    assert exported.returncode == 0 and shown.returncode == 0, exported.stderr + shown.stderr
    data = json.loads(exported.stdout)
    assert data == json.loads(shown.stdout)
    assert data["question"] == "Why is the sky blue?" and [s["name"] for s in data["steps"]] == ["analyse", "review"]
    assert data["final"] == outcome.run.final

    done = chorus(config_dir, "history", "export", sid, "--format", "json", "-o", str(tmp_path))  # a folder
    assert done.returncode == 0 and json.loads((tmp_path / f"chorus-{sid}.json").read_text())["id"] == sid


def test_cli_export_has_help_and_refuses_an_unknown_format_or_session(config_dir: ConfigDir) -> None:
    helped = chorus(config_dir, "history", "export", "--help")
    assert helped.returncode == 0 and "--format {md,json}" in helped.stdout and "-o FILE" in helped.stdout
    bad = chorus(config_dir, "history", "export", "1", "--format", "pdf")
    assert bad.returncode == 2 and "invalid choice: 'pdf'" in said(bad.stderr)
    missing = chorus(config_dir, "history", "export", "42")
    assert missing.returncode == 2 and "no session 'session_042'" in said(missing.stderr)


# ---------------------------------------------------------------- rm


def test_cli_rm_removes_the_folder_and_its_index_rows_and_the_id_is_not_reused(config_dir: ConfigDir) -> None:
    first = fake_run(config_dir, "Why is the sky blue?")
    second = fake_run(config_dir, "Why is grass green?")
    store = SessionStore(config_dir.sessions_dir)
    assert [h["id"] for h in store.search("grass")] == [second.session_id]

    done = chorus(config_dir, "history", "rm", second.session_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"removed {second.session_id}"
    assert not second.session_dir.exists()
    assert [r["id"] for r in store.list()] == [first.session_id]
    assert store.search("grass") == []
    assert store.index_ids() == [first.session_id]
    assert not [p for p in config_dir.sessions_dir.iterdir() if p.name.startswith(".removing-")]

    third = fake_run(config_dir, "Why is the sea salty?")
    assert third.session_id == "session_003"  # session_002 may still be named as a rerun's parent


def test_rm_refuses_a_session_that_a_live_process_is_writing(config_dir: ConfigDir) -> None:
    store = SessionStore(config_dir.sessions_dir)
    recorder = store.create({"mode": "manual", "question": "still running", "pipeline": {"stages": []}})
    try:
        done = chorus_process(config_dir, "history", "rm", recorder.id)  # another process: sees our lock
        assert done.returncode == 2
        assert f"is still being written by a running chorus (pid {os.getpid()})" in said(done.stderr)
        assert recorder.dir.is_dir() and [r["id"] for r in store.list()] == [recorder.id]
        with pytest.raises(SessionBusy):
            remove_sessions(store, [recorder.id], force=True)  # --force never removes a live run
    finally:
        recorder.close()
    assert remove_sessions(store, [recorder.id]) == [recorder.id]  # closed: interrupted, removable


def test_rm_of_a_running_session_whose_writer_cannot_be_checked_needs_force(config_dir: ConfigDir) -> None:
    outcome = fake_run(config_dir)
    path = outcome.session_dir / SESSION_FILE
    meta = json.loads(path.read_text())
    other_host = socket.gethostname() + "-elsewhere"
    path.write_text(json.dumps({**meta, "status": "running", "writer": {"pid": 1, "started": 0, "host": other_host}}))
    refused = chorus(config_dir, "history", "rm", outcome.session_id)
    assert refused.returncode == 2 and "--force" in said(refused.stderr) and outcome.session_dir.is_dir()
    done = chorus(config_dir, "history", "rm", "--force", outcome.session_id)
    assert done.returncode == 0 and not outcome.session_dir.exists()


def test_rm_checks_every_id_before_removing_any(config_dir: ConfigDir) -> None:
    outcome = fake_run(config_dir)
    done = chorus(config_dir, "history", "rm", outcome.session_id, "99")
    assert done.returncode == 2 and "no session 'session_099'" in said(done.stderr)
    assert outcome.session_dir.is_dir()


# ---------------------------------------------------------------- prune


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 12 * 3600), ("90m", 5400),
                                               ("2w", 14 * 86400), ("1d12h", 36 * 3600), ("45s", 45)])
def test_durations_read_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "d", "30x", "0d", "-1d", "30 days", ""])
def test_a_duration_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_cli_prune_dry_run_lists_then_prune_removes_only_old_sessions(config_dir: ConfigDir) -> None:
    old = fake_run(config_dir, "an old question")
    recent = fake_run(config_dir, "a recent question")
    set_created(old.session_dir, time.time() - 40 * 86400)
    store = SessionStore(config_dir.sessions_dir)
    store.reindex()

    dry = chorus(config_dir, "history", "prune", "--older-than", "30d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 session(s) created before" in dry.stdout and old.session_id in dry.stdout
    assert old.session_dir.is_dir() and len(store.list()) == 2

    done = chorus(config_dir, "history", "prune", "--older-than", "30d", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == [old.session_id]
    assert not old.session_dir.exists() and recent.session_dir.is_dir()
    assert [r["id"] for r in store.list()] == [recent.session_id]
    assert store.search("old question") == []

    bad = chorus(config_dir, "history", "prune", "--older-than", "30x")
    assert bad.returncode == 2 and "not a duration" in said(bad.stderr)


def test_prune_keeps_a_live_session_and_drops_index_rows_of_vanished_ones(config_dir: ConfigDir) -> None:
    gone = fake_run(config_dir, "deleted by hand")
    store = SessionStore(config_dir.sessions_dir)
    recorder = store.create({"mode": "manual", "question": "still running", "pipeline": {"stages": []}})
    try:
        assert recorder.flush() is None
        set_created(recorder.dir, time.time() - 400 * 86400)
        for path in gone.session_dir.iterdir():
            path.unlink()
        gone.session_dir.rmdir()
        assert gone.session_id in store.index_ids()
        report = prune_sessions(store, parse_duration("30d"))
        assert report.removed == [] and list(report.busy) == [recorder.id]
        assert report.stale_rows == [gone.session_id]
        assert store.index_ids() == [recorder.id] and recorder.dir.is_dir()
    finally:
        recorder.close()


# ---------------------------------------------------------------- what each call records


def test_every_call_records_the_effective_n_gpu_layers_zero_when_forced_to_cpu(config_dir: ConfigDir) -> None:
    """models.yaml asks for 99 GPU layers; without a GPU the plan forces 0, and that is what every call of the
    session records (the synthesis call included), never null."""
    assert config_dir.models()["models"]["gemma3-270m"]["default_gpu_layers"] == 99
    outcome = fake_run(config_dir, machine=Machine(has_gpu=False))
    d = outcome.session_dir
    step1 = json.loads((d / "step1.json").read_text())
    calls = [step1["response"]] + [json.loads((d / f"step2_{label}.json").read_text())
                                   for label in ("facts", "skeptic")]
    aggregation = json.loads((d / "aggregation.json").read_text())
    calls += next(a for a in aggregation if a["step"] == 2)["details"]["synthesis_calls"]
    assert len(calls) == 4
    assert [c["params"]["n_gpu_layers"] for c in calls] == [0, 0, 0, 0]
    step2 = json.loads((d / "step2.json").read_text())
    assert [m["n_gpu_layers"] for m in step2["params"]["models"]] == [0, 0]

    with_gpu = fake_run(config_dir, machine=Machine(has_gpu=True))
    session = SessionStore(config_dir.sessions_dir).load(with_gpu.session_id)
    recorded = [r.params["n_gpu_layers"] for s in session.stages for r in s.responses]
    recorded += [c["params"]["n_gpu_layers"] for c in session.stages[1].aggregation.details["synthesis_calls"]]
    assert recorded == [99, 99, 99, 99]


# ---------------------------------------------------------------- the UI


@pytest.fixture
def ui_env(config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config_dir.path))
    yield config_dir
    from ui.common import _chorus

    _chorus.clear()


def _page(page: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page(f"views/{page}.py")
    at.run()
    return at


@pytest.mark.parametrize("page", ["history", "results"])
def test_the_session_view_offers_both_downloads_and_shows_the_timeline(ui_env: ConfigDir, page: str) -> None:
    outcome = fake_run(ui_env, "What colour is the sea?")
    at = _page(page)
    assert not at.exception, [e.value for e in at.exception]
    key = "history" if page == "history" else "results"
    buttons = {b.proto.label: b.proto for b in at.get("download_button")}
    assert set(buttons) == {"Download report (Markdown)", "Download JSON"}
    assert any(b.id and f"download-md-{key}" in b.id for b in buttons.values())
    assert any(h.value == "Timeline" for h in at.subheader)
    images = at.get("image")
    assert len(images) == 1
    (image,) = images[0].proto.imgs
    assert image.alt == f"Timeline of {outcome.session_id}: one bar per model call" and image.url.endswith(".png")
