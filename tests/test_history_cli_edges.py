"""`chorus history`: prune with an absurd duration, list --limit, show and rerun of damaged sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.engine.events import RunFinished, RunStarted, StageFinished
from orchestrator.history.store import SessionStore
from orchestrator.records import ResponseRecord, RunRecord, StageRecord
from orchestrator.runs import Runner
from tests.clirun import run_main
from tests.conftest import ConfigDir
from tests.test_sessions import make_stages, recorded_session


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    models = tmp_path / "models"
    models.mkdir()
    return ConfigDir(tmp_path, models)


def history(cfg: ConfigDir, *args: str):
    return run_main("history", *args, "--config-dir", cfg.path)


PIPELINE = {"stages": [{"name": "analyse", "models": ["gemma3-270m"]}, {"name": "review", "models": ["gemma3-270m"]},
                       {"name": "final", "models": ["gemma3-270m"]}]}


def three_stage_session(sessions_dir: Path, question: str = "Why is the sky blue?", mode: str = "base") -> str:
    """A completed session of three stages whose snapshot holds a valid pipeline, question and mode."""
    store = SessionStore(sessions_dir)
    recorder = store.create({"mode": mode, "question": question, "pipeline": PIPELINE})
    stages = make_stages()
    stages.append(StageRecord(3, "final", prompt="p", output="the end", status="ok", started_at=105.0,
                              finished_at=106.0, responses=[ResponseRecord("gemma3-270m", "gemma3-270m", text="the end",
                                                                           status="ok")]))
    run = RunRecord(question=question, mode=mode, pipeline=PIPELINE)  # type: ignore[arg-type]
    recorder(RunStarted(run, None))  # type: ignore[arg-type]
    for stage in stages:
        run.stages.append(stage)
        recorder(StageFinished(run, stage))
    run.status, run.final, run.finished_at = "completed", "the end", 107.0
    recorder(RunFinished(run))
    assert recorder.close() is None
    return recorder.id


# ---------------------------------------------------------------- bug 2: prune --older-than


@pytest.mark.parametrize("duration", ["100000000000000000000d", "99999999999d", "36501d"])
def test_prune_with_a_duration_past_any_calendar_is_a_usage_error(cfg: ConfigDir, duration: str) -> None:
    recorded_session(cfg.sessions_dir)
    for dry in (["--dry-run"], []):
        out = history(cfg, "prune", f"--older-than={duration}", *dry)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "too long" in out.stderr and out.stdout == ""
    assert SessionStore(cfg.sessions_dir).ids()  # nothing removed


def test_prune_still_takes_a_century(cfg: ConfigDir) -> None:
    recorded_session(cfg.sessions_dir)
    out = history(cfg, "prune", "--older-than", "36500d", "--dry-run")
    assert out.returncode == 0 and "no session created before 19" in out.stdout


# ---------------------------------------------------------------- bug 6: list --limit


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_list_limit_must_be_at_least_one(cfg: ConfigDir, limit: str) -> None:
    recorded_session(cfg.sessions_dir)
    out = history(cfg, "list", "--limit", limit)
    assert out.returncode == 2 and "must be at least 1" in out.stderr


def test_list_says_how_many_more_there_are(cfg: ConfigDir) -> None:
    ids = [recorded_session(cfg.sessions_dir, f"question {i}") for i in range(3)]
    out = history(cfg, "list", "--limit", "2")
    assert out.returncode == 0 and ids[2] in out.stdout and ids[0] not in out.stdout
    assert "1 older session(s) not shown: --limit 3 shows all" in out.stderr
    every = history(cfg, "list")
    assert every.returncode == 0 and "not shown" not in every.stderr and all(i in every.stdout for i in ids)


# ---------------------------------------------------------------- bug 9: show of a damaged session


def test_show_reads_every_intact_step_around_a_missing_one(cfg: ConfigDir) -> None:
    sid = three_stage_session(cfg.sessions_dir)
    (cfg.sessions_dir / sid / "step2.json").unlink()
    session = SessionStore(cfg.sessions_dir).load(sid)
    assert [s.index for s in session.stages] == [1, 3]
    assert "step2.json is missing" in session.problems
    assert "session.json lists 3 finished stage(s), 2 could be read" in session.problems
    out = history(cfg, "show", sid)
    assert out.returncode == 0 and "== step 1: analyse" in out.stdout and "== step 3: final" in out.stdout
    assert "== step 2" not in out.stdout and "2 could be read" in out.stderr
    # a rerun past the gap is refused: the copied steps would not line up
    with pytest.raises(Exception, match="damaged"):
        Runner(None, store=SessionStore(cfg.sessions_dir)).prepare_rerun(sid, 3)  # type: ignore[arg-type]


def test_show_of_a_broken_session_json_recovers_question_and_mode_from_the_snapshot(cfg: ConfigDir) -> None:
    sid = three_stage_session(cfg.sessions_dir, "What is 2+2?", mode="base")
    (cfg.sessions_dir / sid / "session.json").write_text("{broken")
    out = history(cfg, "show", sid)
    assert out.returncode == 0 and "None" not in out.stdout, out.stdout
    assert out.stdout.startswith(f"{sid}  base  damaged")
    assert "question: What is 2+2?" in out.stdout and "== step 3: final" in out.stdout
    assert "session.json: unreadable JSON" in out.stderr and "is null" not in out.stderr
    assert "(question and mode recovered from config_snapshot.json)" in out.stdout


# ---------------------------------------------------------------- bug 3: rerun of a broken session.json


def test_rerun_of_a_broken_session_json_takes_question_and_mode_from_the_snapshot(cfg: ConfigDir) -> None:
    sid = three_stage_session(cfg.sessions_dir, "What is 2+2?", mode="base")
    (cfg.sessions_dir / sid / "session.json").write_text("{broken")
    again = Runner(None, store=SessionStore(cfg.sessions_dir)).prepare_rerun(sid, 2)  # type: ignore[arg-type]
    assert again.question == "What is 2+2?" and again.mode == "base" and len(again.prior) == 1


def test_rerun_refuses_when_the_question_cannot_be_read_anywhere(cfg: ConfigDir) -> None:
    sid = three_stage_session(cfg.sessions_dir)
    (cfg.sessions_dir / sid / "session.json").write_text("{broken")
    snapshot = cfg.sessions_dir / sid / "config_snapshot.json"
    data = json.loads(snapshot.read_text())
    del data["question"]
    snapshot.write_text(json.dumps(data))
    out = history(cfg, "rerun", sid, "--stage", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "cannot be rerun: its question could not be read" in out.stderr
    assert [p.name for p in cfg.sessions_dir.glob("session_*")] == [sid]  # no new session
