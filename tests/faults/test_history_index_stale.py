"""Fault 24.7: the history index out of step with the session folders, or impossible to write.

Before: with `index.db` deleted, `history list` said "no sessions yet" and search found nothing with 9
session folders on disk; a session damaged after it was indexed still listed as sound; folders removed or
copied in by hand were still listed or missing; on a full disk `history list` failed outright with "disk
I/O error". Now each index row keeps a stamp of its folder and reading brings the index in step first;
where the index cannot be written, list and search read the session files into an in-memory index.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.main import main
from orchestrator.history.store import SessionStore
from tests.clirun import run_mains_in_child
from tests.conftest import ConfigDir
from tests.test_sessions import recorded_session

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
History = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    """The shipped config with its own sessions dir; history commands need no model or server."""
    models = tmp_path / "models"
    models.mkdir()
    return ConfigDir(tmp_path, models)


@pytest.fixture
def history(cfg: ConfigDir, capsys: pytest.CaptureFixture[str]) -> History:
    """`chorus history ARGS` in this process (a traceback would fail the test)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(["history", *args, "--config-dir", str(cfg.path)])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def sessions(cfg: ConfigDir, n: int) -> list[str]:
    return [recorded_session(cfg.sessions_dir, f"What about {WORDS[i]}?") for i in range(n)]


def delete_index(cfg: ConfigDir) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cfg.sessions_dir / 'index.db'}{suffix}").unlink(missing_ok=True)


def listed(history: History) -> dict[str, dict[str, object]]:
    out = history("list", "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return {r["id"]: r for r in json.loads(out.stdout)}


def no_file_may_grow() -> None:
    """Unprivileged disk-full for a child: every write that grows a file fails with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))


def full_disk_chorus(cfg: ConfigDir, *calls: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """`chorus history CALL` for each call, in one process on a full disk (tests/clirun.py)."""
    return run_mains_in_child(*(["history", *args, "--config-dir", str(cfg.path)] for args in calls),
                              preexec_fn=no_file_may_grow)


def test_a_deleted_index_is_rebuilt_by_the_next_list_and_search(cfg: ConfigDir, history: History) -> None:
    ids = sessions(cfg, 9)
    delete_index(cfg)

    table = history("list")
    assert table.returncode == 0 and "no sessions yet" not in table.stdout, table.stdout
    assert all(sid in table.stdout for sid in ids)
    assert list(listed(history)) == ids[::-1]
    found = history("search", "foxtrot", "--json")
    assert found.returncode == 0 and [h["id"] for h in json.loads(found.stdout)] == [ids[5]]
    assert (cfg.sessions_dir / "index.db").is_file()  # refilled on disk, not only answered from the files
    assert SessionStore(cfg.sessions_dir).index_ids() == ids


def test_a_session_damaged_after_indexing_is_listed_as_damaged(cfg: ConfigDir, history: History) -> None:
    first, middle, last = sessions(cfg, 3)
    assert not any(r["problems"] for r in listed(history).values())  # indexed, sound

    step = cfg.sessions_dir / middle / "step1.json"  # truncated in place: the folder's own mtime stays
    step.write_bytes(step.read_bytes()[:20])
    rows = listed(history)
    assert any("step1.json: unreadable JSON" in p for p in rows[middle]["problems"])
    assert not rows[first]["problems"] and not rows[last]["problems"]
    table = history("list")
    assert f"{middle} is damaged" in table.stderr and "step1.json: unreadable JSON" in table.stderr


def test_folders_removed_or_copied_in_by_hand_are_listed_as_they_are(cfg: ConfigDir, history: History) -> None:
    first, middle, last = sessions(cfg, 3)
    assert set(listed(history)) == {first, middle, last}

    shutil.rmtree(cfg.sessions_dir / last)                                           # deleted by hand
    shutil.copytree(cfg.sessions_dir / first, cfg.sessions_dir / "session_050")    # restored from a backup
    assert list(listed(history)) == ["session_050", middle, first]
    found = history("search", "alpha", "--json")
    assert sorted(h["id"] for h in json.loads(found.stdout)) == [first, "session_050"]
    assert history("search", "charlie", "--json").stdout.strip() == "[]"  # the deleted one is not found


def test_list_and_search_work_on_a_full_disk_from_the_session_files(cfg: ConfigDir, history: History) -> None:
    ids = sessions(cfg, 3)
    listed(history)  # the index exists and is in step

    (fresh,) = full_disk_chorus(cfg, ["list", "--json"])  # was: "disk I/O error"
    assert fresh.returncode == 0 and "Traceback" not in fresh.stderr, fresh.stderr
    assert [r["id"] for r in json.loads(fresh.stdout)] == ids[::-1]

    delete_index(cfg)  # and a session damaged since: only the files can say
    (cfg.sessions_dir / ids[1] / "session.json").write_text("[]")
    stale, table, found = full_disk_chorus(cfg, ["list", "--json"], ["list"], ["search", "charlie", "--json"])
    assert stale.returncode == 0 and "Traceback" not in stale.stderr, stale.stderr
    rows = {r["id"]: r for r in json.loads(stale.stdout)}
    assert list(rows) == ids[::-1] and rows[ids[1]]["problems"] == ["session.json is a list, not an object"]
    assert "reading the session files instead" in stale.stderr
    assert table.returncode == 0 and all(sid in table.stdout for sid in ids), table.stderr
    assert found.returncode == 0 and [h["id"] for h in json.loads(found.stdout)] == [ids[2]], found.stderr

    assert list(listed(history)) == ids[::-1]  # room again: the index is refilled
    assert SessionStore(cfg.sessions_dir).index_ids() == ids
