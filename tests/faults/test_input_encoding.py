"""Fault 13.5: a question that is not valid UTF-8.

`chorus run $'Caf\\xe9 au lait?'` (a Latin-1 terminal) used to end in a raw UnicodeEncodeError and an empty
session folder that history never showed: argv's undecodable byte is a lone surrogate in Python, which
cannot be written as UTF-8. The question is now cleaned before any session exists (each undecodable byte
becomes U+FFFD, with a warning), an empty question is refused with a clear error, and a session folder is
never left empty when its first write fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.inputs import QuestionError, clean_question
from orchestrator.history import recorder as recorder_module
from orchestrator.history.store import SessionError, SessionStore
from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir
from tests.test_sessions import make_stages, record_run

LATIN1_ARGV = "Caf\udce9 au lait?"  # what Python makes of b"Caf\xe9 au lait?" in argv (surrogateescape)


@pytest.mark.parametrize(("given", "expected"), [
    (LATIN1_ARGV, "Caf\ufffd au lait?"),
    (b"Caf\xe9 au lait?", "Caf\ufffd au lait?"),
    ("JSON escape \ud800 alone", "JSON escape \ufffd alone"),  # from the UI or the API
    ("Café 🚀 \ufffd ok", "Café 🚀 \ufffd ok"),  # valid text is kept as it is
    ("Caf\udcc3\udca9", "Café"),  # valid UTF-8 bytes that were escaped come back whole
])
def test_the_question_becomes_valid_unicode(given: str | bytes, expected: str) -> None:
    cleaned = clean_question(given)
    assert cleaned == expected
    cleaned.encode("utf-8")  # never raises


@pytest.mark.parametrize("empty", ["", "   ", "\n\t", b""])
def test_an_empty_question_is_refused_with_a_clear_error(empty: str | bytes) -> None:
    with pytest.raises(QuestionError, match="the question is empty"):
        clean_question(empty)


def test_a_question_with_a_lone_surrogate_is_still_recorded(tmp_path: Path) -> None:
    """Defence in depth: text that was not cleaned (model output, an old caller) never fails a write."""
    store = SessionStore(tmp_path)
    recorder = store.create({"mode": "manual", "question": LATIN1_ARGV, "pipeline": {"stages": []}})
    record_run(recorder, make_stages(text="model says \udcff"), question=LATIN1_ARGV)
    session = store.load(recorder.id)
    assert session.problems == [] and session.meta["question"] == "Caf\ufffd au lait?"
    assert session.stages[0].output == "model says \ufffd"
    json.loads((recorder.dir / "session.json").read_bytes().decode("utf-8"))  # valid UTF-8 JSON


def test_a_session_whose_first_write_fails_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(path: Path, text: str) -> None:
        raise UnicodeEncodeError("utf-8", "\udce9", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(recorder_module, "write_text_atomic", failing)
    store = SessionStore(tmp_path)
    with pytest.raises(SessionError, match=r"cannot write config_snapshot\.json"):
        store.create({"question": "q"})
    assert store.folders() == []  # no empty, invisible session_001


def _chorus_run(cfg: ConfigDir, question: bytes, pipeline: Path) -> subprocess.CompletedProcess[bytes]:
    """A process of its own: Python decodes its argv bytes (surrogateescape), which is what is tested."""
    return subprocess.run([sys.executable.encode(), b"-m", b"cli", b"run", question, b"--manual",
                           str(pipeline).encode(), b"--config-dir", str(cfg.path).encode()],
                          capture_output=True, cwd=REPO, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    """The shipped config with an empty models dir: the run records its failure without any server."""
    models = tmp_path / "models"
    models.mkdir()
    return ConfigDir(tmp_path, models)


def test_chorus_run_with_a_latin1_question_records_the_session(cfg: ConfigDir, tmp_path: Path) -> None:
    pipeline = tmp_path / "manual.yaml"
    pipeline.write_text("stages:\n  - {name: answer, models: [gemma3-270m], max_tokens: 4}\n")
    out = _chorus_run(cfg, b"Caf\xe9 au lait?", pipeline)
    stderr = out.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in out.stderr and b"UnicodeEncodeError" not in out.stderr, stderr
    assert "not valid UTF-8" in stderr  # the user is told why the question changed
    store = SessionStore(cfg.sessions_dir)
    assert store.ids() == ["session_001"]
    session = store.load("1")
    assert session.meta["question"] == "Caf\ufffd au lait?" and session.problems == []
    assert session.snapshot["question"] == "Caf\ufffd au lait?"
    assert [r["question"] for r in store.list()] == ["Caf\ufffd au lait?"]


def test_chorus_run_with_an_empty_question_is_refused_before_any_session(cfg: ConfigDir, tmp_path: Path) -> None:
    pipeline = tmp_path / "manual.yaml"
    pipeline.write_text("stages:\n  - {name: answer, models: [gemma3-270m], max_tokens: 4}\n")
    out = run_main("run", "  ", "--manual", str(pipeline), "--config-dir", str(cfg.path))  # in this process
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "chorus: error: the question is empty" in out.stderr
    assert not cfg.sessions_dir.exists() or SessionStore(cfg.sessions_dir).folders() == []
