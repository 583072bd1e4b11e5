"""Fault 13.8: sessions stuck at 'running', and a full disk mid-run.

chorus killed by SIGKILL, a second Ctrl-C or a crash used to leave session.json at 'running' for ever.
The recorder writes its pid, process start time and host into session.json; when history is read, a
'running' session whose writer is gone becomes 'interrupted', with the stages it finished. A full disk
mid-run used to leave step1/step2 missing while later files were written: writes are in order and stop at
the first failure, which `Recorder.close()` returns as the run's history failure.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.history import recorder as recorder_module
from orchestrator.history.store import SessionStore
from orchestrator.records import StageRecord
from tests.conftest import REPO
from tests.test_sessions import make_stages, record_run

SNAPSHOT = {"mode": "manual", "question": "Why is the sky blue?", "pipeline": {"stages": []}}


def three_stages() -> list[StageRecord]:
    one, two = make_stages()
    three = copy.deepcopy(one)
    three.index, three.name = 3, "answer"
    return [one, two, three]


def test_a_session_whose_process_was_killed_becomes_interrupted_with_its_finished_stages(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from orchestrator.history.store import SessionStore
        from tests.test_sessions import make_stages, record_run
        recorder = SessionStore(Path({str(tmp_path)!r})).create({SNAPSHOT!r})
        record_run(recorder, make_stages()[:1], finish=False, close=False)
        assert recorder.flush() is None
        os.kill(os.getpid(), signal.SIGKILL)  # no RunFinished, no close: as kill -9 mid-run
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == -9, done.stderr
    session_json = tmp_path / "session_001" / "session.json"
    on_disk = json.loads(session_json.read_text())
    assert on_disk["status"] == "running" and on_disk["writer"]["pid"] != os.getpid()

    store = SessionStore(tmp_path)
    assert [(r["id"], r["status"]) for r in store.list()] == [("session_001", "interrupted")]
    session = store.load("1")
    assert session.meta["status"] == "interrupted" and session.problems == []
    assert [s.name for s in session.stages] == ["analyse"] and session.final is None
    assert session.meta["error"]["type"] == "Interrupted"
    assert json.loads(session_json.read_text())["status"] == "interrupted"  # written back: it stays so
    assert [r["status"] for r in store.index.list()] == ["interrupted"]


def test_a_live_writer_keeps_its_session_running_and_a_reused_pid_does_not(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create(SNAPSHOT)
    record_run(recorder, make_stages()[:1], finish=False, close=False)
    assert recorder.flush() is None
    assert store.load(recorder.id).meta["status"] == "running"  # this process writes it

    meta_path = recorder.dir / "session.json"
    meta = json.loads(meta_path.read_text())
    (recorder.dir / ".lock").unlink()  # no lock file (an older session): the pid and its start time decide
    assert store.load(recorder.id).meta["status"] == "running"
    meta["writer"]["started"] -= 3600  # same pid, another process (the pid was reused)
    meta_path.write_text(json.dumps(meta))
    assert store.load(recorder.id).meta["status"] == "interrupted"

    meta["writer"] = {"pid": os.getpid(), "started": None, "host": socket.gethostname() + "-elsewhere"}
    meta["status"] = "running"
    meta_path.write_text(json.dumps(meta))
    assert store.load(recorder.id).meta["status"] == "running"  # another host's process: cannot tell
    recorder.close()


def test_a_run_that_ends_without_run_finished_is_recorded_as_interrupted(tmp_path: Path) -> None:
    """A second Ctrl-C (KeyboardInterrupt through the engine): no RunFinished, the caller closes the recorder."""
    store = SessionStore(tmp_path)
    recorder = store.create(SNAPSHOT)
    record_run(recorder, make_stages()[:1], finish=False, close=False)
    assert recorder.close() is None
    session = store.load(recorder.id)
    assert session.meta["status"] == "interrupted" and session.meta["finished_at"]
    assert [s.name for s in session.stages] == ["analyse"] and session.problems == []
    assert [r["status"] for r in store.list()] == ["interrupted"]


@pytest.fixture
def disk_full_from(monkeypatch: pytest.MonkeyPatch):
    """disk_full_from(n, until=None): the recorder's atomic writes fail with ENOSPC from the n-th call on."""
    calls: list[str] = []
    real = recorder_module.write_text_atomic

    def arm(n: int, until: int | None = None) -> list[str]:
        def write(path: Path, text: str) -> None:
            calls.append(path.name)
            if len(calls) >= n and (until is None or len(calls) < until):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, text)

        monkeypatch.setattr(recorder_module, "write_text_atomic", write)
        return calls

    yield arm
    monkeypatch.undo()


def test_a_disk_that_fills_up_mid_run_keeps_the_stages_before_it_in_order(tmp_path: Path, disk_full_from) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create(SNAPSHOT)  # config_snapshot.json, session.json: written before the run
    # 1: session.json (RunStarted), 2-4: step1.json, aggregation.json, session.json; 5: step2_facts.json fails
    calls = disk_full_from(5)
    record_run(recorder, three_stages(), close=False)
    error = recorder.close()
    assert error is not None and "No space left on device" in str(error) and "step2_facts.json" in str(error)
    assert calls[4] == "step2_facts.json"
    assert not [c for c in calls[5:] if c.startswith("step")]  # nothing after the gap was even tried
    names = sorted(p.name for p in recorder.dir.iterdir())
    # .lock: released but kept, since session.json still says running (its last write failed)
    assert names == [".lock", "aggregation.json", "config_snapshot.json", "session.json", "step1.json"]

    disk_full_from(10**9)  # room again
    session = store.load(recorder.id)
    assert [s.name for s in session.stages] == ["analyse"]
    assert session.meta["status"] == "interrupted"  # its last session.json could not be written
    assert [r["status"] for r in store.list()] == ["interrupted"]


def test_a_failed_write_stops_later_stages_and_the_session_says_why(tmp_path: Path, disk_full_from) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create(SNAPSHOT)
    disk_full_from(5, until=6)  # only step2_facts.json fails; the disk has room again afterwards
    record_run(recorder, three_stages(), close=False)
    error = recorder.close()
    assert error is not None and "step2_facts.json" in str(error) and "No space left on device" in str(error)
    assert not (recorder.dir / "step3.json").exists() and not (recorder.dir / "step2.json").exists()
    assert not (recorder.dir / "final.txt").exists()
    meta = json.loads((recorder.dir / "session.json").read_text())
    assert meta["status"] == "completed" and meta["stages"] == ["analyse"]
    assert "No space left on device" in meta["history_error"]
    session = store.load(recorder.id)
    assert [s.name for s in session.stages] == ["analyse"]
    assert session.damaged and "history incomplete" in session.problems[0]
    assert store.list()[0]["problems"] == session.problems  # the index says so too
