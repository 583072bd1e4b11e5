"""Fault 13.6 and 13.11: damaged session files and bad session ids.

One hand-edited or half-written session used to break history for all: `"created_at": "yesterday"` crashed
`history list` and the UI History page, a deleted `stepN_<label>.json`, `null`/`{}` step files or a `[]`
session.json gave tracebacks in `show`, and `reindex` silently dropped the session. Now each session loads
on its own: a damaged one is listed as damaged with the reason, `show` prints what it could read plus the
reason, `reindex` says what it indexed as damaged or skipped. Session ids are ASCII digits of bounded length,
and a reindex on a full disk is one clear error.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from cli.main import main
from orchestrator.history.store import SessionStore
from tests.clirun import run_mains_in_child
from tests.conftest import REPO, ConfigDir
from tests.test_sessions import recorded_session

Damage = Callable[[Path], None]


def _edit_meta(**values: object) -> Damage:
    def damage(d: Path) -> None:
        meta = json.loads((d / "session.json").read_text())
        (d / "session.json").write_text(json.dumps({**meta, **values}))
    return damage


def _write(name: str, content: str | bytes) -> Damage:
    def damage(d: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def _truncate(name: str) -> Damage:
    def damage(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return damage


DAMAGES: dict[str, tuple[Damage, str]] = {  # how, and what the reason says
    "created_at-yesterday": (_edit_meta(created_at="yesterday"), "'created_at' is 'yesterday'"),
    "stages-not-a-list": (_edit_meta(stages="analyse"), "'stages' is 'analyse'"),
    "model-file-deleted": (lambda d: (d / "step2_clarity.json").unlink(), "step2_clarity.json is missing"),
    "step-file-deleted": (lambda d: (d / "step2.json").unlink(), "step2.json is missing"),
    "step-null": (_write("step1.json", "null"), "step1.json is null, not an object"),
    "step-empty-object": (_write("step2.json", "{}"), "step2.json has no 'index'"),
    "step-wrong-type": (_write("step1.json", '{"index": 1, "name": "analyse", "responses": 3}'),
                        "'responses' is 3, not a list"),
    "step-truncated": (_truncate("step1.json"), "step1.json: unreadable JSON"),
    "model-file-null": (_write("step2_facts.json", "null"), "step2_facts.json is null, not an object"),
    "session-json-list": (_write("session.json", "[]"), "session.json is a list, not an object"),
    "session-json-binary": (_write("session.json", b"\xff\xfe\x00garbage"), "session.json: unreadable JSON"),
    "step-nested-deep": (_write("step1.json", "[" * 100_000 + "]" * 100_000), "step1.json: unreadable JSON"),
    "final-not-utf8": (_write("final.txt", b"Caf\xe9"), "final.txt is not valid UTF-8"),
    "aggregation-not-a-list": (_write("aggregation.json", '"concat"'), "aggregation.json is 'concat'"),
}


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    """The shipped config with its own sessions dir; history commands need no model or server."""
    models = tmp_path / "models"
    models.mkdir()
    return ConfigDir(tmp_path, models)


@pytest.fixture
def history(cfg: ConfigDir, capsys: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`chorus history ARGS` in this process (a traceback would fail the test); the full-disk case and
    one damaged case also run in a process of their own."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(["history", *args, "--config-dir", str(cfg.path)])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def three_sessions(cfg: ConfigDir, damage: Damage) -> tuple[str, str, str]:
    good1 = recorded_session(cfg.sessions_dir, "first question")
    bad = recorded_session(cfg.sessions_dir, "damaged question")
    good2 = recorded_session(cfg.sessions_dir, "third question")
    damage(cfg.sessions_dir / bad)
    return good1, bad, good2


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_one_damaged_session_is_listed_as_damaged_and_the_others_still_load(cfg: ConfigDir, case: str,
                                                                             history: Callable[..., Any]) -> None:
    damage, reason = DAMAGES[case]
    good1, bad, good2 = three_sessions(cfg, damage)

    reindexed = history("reindex")  # the index is rebuilt from the files, the damaged one included
    assert reindexed.returncode == 0 and "Traceback" not in reindexed.stderr, reindexed.stderr
    assert "reindexed 3 session(s)" in reindexed.stdout and f"{bad}: damaged: " in reindexed.stdout
    assert reason in reindexed.stdout

    listed = history("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {good1, bad, good2}
    assert any(reason in p for p in rows[bad]["problems"]) and not rows[good1]["problems"] + rows[good2]["problems"]
    table = history("list")
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert f"{bad} is damaged" in table.stderr and reason in table.stderr

    shown = history("show", bad)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "is damaged, showing what could be read" in shown.stderr and reason in shown.stderr
    assert shown.stdout.startswith(bad)
    as_json = history("show", bad, "--json")
    assert as_json.returncode == 0 and any(reason in p for p in json.loads(as_json.stdout)["problems"])
    good = history("show", good2)
    assert good.returncode == 0 and "third question" in good.stdout and not good.stderr


def test_a_new_process_lists_and_shows_around_a_damaged_session(cfg: ConfigDir) -> None:
    """reindex, list and show one after another in a fresh process (tests/clirun.py), nothing of this one's."""
    _, bad, _ = three_sessions(cfg, _write("session.json", "[]"))
    calls = [["history", *args, "--config-dir", str(cfg.path)] for args in (["reindex"], ["list"], ["show", bad])]
    for out in run_mains_in_child(*calls):
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "session.json is a list, not an object" in out.stdout + out.stderr


def test_show_prints_every_stage_it_could_read_around_a_missing_model_file(cfg: ConfigDir,
                                                                          history: Callable[..., Any]) -> None:
    _, bad, _ = three_sessions(cfg, lambda d: (d / "step2_clarity.json").unlink())
    session = SessionStore(cfg.sessions_dir).load(bad)
    assert [s.name for s in session.stages] == ["analyse", "review"]
    assert [r.label for r in session.stages[1].responses] == ["facts", "skeptic"]
    assert session.final == "merged blue light scatters more"
    shown = history("show", bad)
    assert "facts says" in shown.stdout and "skeptic says" in shown.stdout and "== final" in shown.stdout


def test_reindex_reports_a_folder_without_session_json(cfg: ConfigDir, history: Callable[..., Any]) -> None:
    recorded_session(cfg.sessions_dir)
    (cfg.sessions_dir / "session_007").mkdir()  # what an old version left when its first write failed
    out = history("reindex")
    assert out.returncode == 0, out.stderr
    assert "reindexed 1 session(s)" in out.stdout and "session_007: skipped: no session.json" in out.stdout


def test_the_history_page_lists_every_session_around_a_damaged_one(cfg: ConfigDir,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    good1, bad, good2 = three_sessions(cfg, _edit_meta(created_at="yesterday"))
    SessionStore(cfg.sessions_dir).reindex()
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(cfg.path))
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/history.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="history-open").options == [good2, bad, good1]
    at.selectbox(key="history-open").set_value(bad).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("damaged" in w.value and "yesterday" in w.value for w in at.warning)


@pytest.mark.parametrize("bad_id", ["²", "٣", "1" * 5000, "session_" + "9" * 12, "-1", "1e3", "../session_001", ""])
def test_a_bad_session_id_is_one_short_error(cfg: ConfigDir, bad_id: str, history: Callable[..., Any]) -> None:
    recorded_session(cfg.sessions_dir)
    for action in ("show", "rerun"):
        args = [action, bad_id] + (["--stage", "1"] if action == "rerun" else [])
        out = history(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "not a session id" in out.stderr and "0-9" in out.stderr
        assert len(out.stderr) < 400 and out.stderr.strip().count("\n\n") == 0  # one short paragraph


def test_reindex_on_a_full_disk_is_one_error_with_the_path_and_a_hint(cfg: ConfigDir,
                                                                     history: Callable[..., Any]) -> None:
    recorded_session(cfg.sessions_dir)

    def no_file_may_grow() -> None:  # unprivileged disk-full: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    out = subprocess.run([sys.executable, "-m", "cli", "history", "reindex", "--config-dir",
                          str(cfg.path)], capture_output=True, text=True, cwd=REPO, timeout=120,
                         preexec_fn=no_file_may_grow)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    message = " ".join(out.stderr.split())  # wrapped at 100 columns, where the long tmp path falls
    assert "cannot rebuild the history index" in message and "index.db" in message
    assert "Free disk space" in message
    assert history("reindex").returncode == 0  # room again: it works
