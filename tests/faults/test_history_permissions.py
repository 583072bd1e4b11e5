"""Fault 13.1 (history part): history readable by other local users.

Session files were 0600, but `sessions/index.db` (with every question and answer, for full-text search)
and its -wal/-shm were created 0644, and the folders 0755. Everything history creates is now owner-only
whatever the umask: folders 0700, files 0600; an index made 0644 by an older version is tightened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.history.store import SessionStore
from tests.test_sessions import make_stages, record_run


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: what was created 0644 / 0755 before
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_everything_history_creates_is_owner_only(tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    store = SessionStore(sessions)
    recorder = store.create({"mode": "manual", "question": "private question", "pipeline": {"stages": []}})
    record_run(recorder, make_stages())
    db = store.index.db()  # an open connection: the -wal and -shm files exist now
    try:
        db.execute("select count(*) from sessions").fetchone()
        index_files = [Path(f"{sessions / 'index.db'}{suffix}") for suffix in ("", "-wal", "-shm")]
        assert all(p.exists() for p in index_files)
        assert {p.name: mode(p) for p in index_files} == {p.name: 0o600 for p in index_files}
    finally:
        db.conn.close()
    assert mode(sessions) == 0o700 and mode(recorder.dir) == 0o700
    files = list(recorder.dir.iterdir())
    assert len(files) == 9 and {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    store.reindex()  # a rebuilt index too
    assert mode(sessions / "index.db") == 0o600


def test_an_index_left_world_readable_by_an_older_version_is_tightened(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create({"mode": "manual", "question": "q", "pipeline": {"stages": []}})
    record_run(recorder, make_stages(), question="q")
    (tmp_path / "index.db").chmod(0o644)
    assert [r["question"] for r in store.list()] == ["q"]
    assert mode(tmp_path / "index.db") == 0o600
