"""Fault 24.6: hostile files in a document folder.

Before: a symlink to /dev/zero named `zero.txt` gave a MemoryError traceback after 6.8 s at 1.9 GB; a FIFO
named `pipe.txt` hung `docs add` for ever; a symlink to a file outside the folder was indexed and its text
came back in search. Now only regular files are read: resolved first and kept inside the folder they were
found in, opened with O_NOFOLLOW | O_NONBLOCK, checked again on the open descriptor, read in bounded chunks
up to app.yaml `docs.max_file_mib`; every other file is skipped with its reason, listed by the CLI and the
Documents page, never a traceback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from orchestrator.rag.chunking import UnreadableFile
from orchestrator.rag.files import MiB, read_regular_file
from orchestrator.rag.retrieval import search
from orchestrator.rag.store import DocStore
from tests.conftest import REPO, ConfigDir
from tests.faults.conftest import chorus, chorus_main

SECRET = "PASSWORD=hunter2"


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    """The shipped config with its own sessions dir; `docs add` without an embedding model needs no model."""
    models = tmp_path / "models"
    models.mkdir()
    config = ConfigDir(tmp_path, models)
    config.write_app(docs={"max_file_mib": 1})
    return config


def hostile_folder(root: Path) -> Path:
    """A document folder with two good files and every kind of file that is not one, by a document's name."""
    docs = root / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("# Install\n\nThe daemon listens on port 8125.\n")
    (docs / "alias.md").symlink_to(docs / "guide.md")           # a link that stays inside: read
    (docs / "zero.txt").symlink_to("/dev/zero")
    os.mkfifo(docs / "pipe.txt")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET}\n")
    (docs / "escape.txt").symlink_to(outside / "secret.txt")
    (docs / "sub").mkdir()
    (docs / "sub" / "up.txt").symlink_to("../../outside/secret.txt")
    (docs / "linked-dir").symlink_to(outside)                   # a linked folder is not walked at all
    with open(docs / "big.txt", "wb") as f:                     # sparse: 2 MiB on paper, nothing on disk
        f.truncate(2 * MiB)
    (docs / "loop.txt").symlink_to(docs / "loop.txt")
    (docs / "dangling.txt").symlink_to(root / "nowhere.txt")
    return docs


REASONS = {  # file -> what its skip reason says
    "zero.txt": "leads to /dev/zero, outside",
    "pipe.txt": "a FIFO (named pipe), not a regular file",
    "escape.txt": "secret.txt, outside",
    "sub/up.txt": "secret.txt, outside",
    "big.txt": "2.0 MiB, over the 1.0 MiB limit (docs.max_file_mib in app.yaml)",
    "loop.txt": "cannot be resolved",
    "dangling.txt": "a symbolic link to nothing",
}


@pytest.mark.timeout(60)  # the FIFO used to block for ever
def test_only_regular_files_inside_the_folder_are_indexed_and_each_skip_says_why(tmp_path: Path) -> None:
    docs = hostile_folder(tmp_path)
    store = DocStore(tmp_path / "docs.db")
    started = time.monotonic()
    report = store.add("kb", [docs], max_file_bytes=1 * MiB)
    assert time.monotonic() - started < 10  # was 6.8 s and 1.9 GB before a MemoryError
    assert report.added == 2 and sorted(Path(f["path"]).name for f in store.files("kb")) == ["alias.md", "guide.md"]
    assert set(report.skipped) == {str(docs / name) for name in REASONS}
    for name, reason in REASONS.items():
        assert reason in report.skipped[str(docs / name)], (name, report.skipped[str(docs / name)])
    assert store.bm25("kb", "hunter2 PASSWORD", 5) == []  # nothing outside the folder is searchable
    assert sorted(Path(p.file).name for p in search(store, "kb", "daemon port", 2)) == ["alias.md", "guide.md"]


@pytest.mark.timeout(120)
def test_the_cli_lists_every_skipped_file_with_its_reason_and_no_traceback(cfg: ConfigDir, tmp_path: Path) -> None:
    docs = hostile_folder(tmp_path)
    out = chorus_main(cfg, "docs", "add", "kb", str(docs), "--no-embed")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "2 added" in out.stdout
    for name, reason in REASONS.items():
        assert f"skipped {docs / name}: " in out.stderr and reason in out.stderr, name
    as_json = chorus_main(cfg, "docs", "add", "kb", str(docs), "--no-embed", "--json")
    assert set(json.loads(as_json.stdout)["skipped"]) == {str(docs / name) for name in REASONS}
    found = chorus_main(cfg, "docs", "search", "kb", "hunter2", "--bm25", "--json")
    assert found.returncode == 0 and json.loads(found.stdout) == []


@pytest.mark.timeout(60)
def test_a_device_or_fifo_named_on_its_own_is_skipped_not_read(cfg: ConfigDir, tmp_path: Path) -> None:
    """The operator may name a file outside any folder, but it is still read only if it is a regular file.
    A process of its own: a FIFO that is read blocks, and the subprocess's timeout ends that."""
    docs = hostile_folder(tmp_path)
    out = chorus(cfg, "docs", "add", "kb", str(docs / "zero.txt"), str(docs / "pipe.txt"), "--no-embed", "--json",
                 timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    skipped = json.loads(out.stdout)["skipped"]
    assert "a character device, not a regular file" in skipped[str(docs / "zero.txt")]
    assert "a FIFO (named pipe), not a regular file" in skipped[str(docs / "pipe.txt")]


def test_a_file_that_became_a_link_outside_loses_its_old_chunks(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("Quarterly numbers are in the blue folder.\n")
    store = DocStore(tmp_path / "docs.db")
    assert store.add("kb", [docs]).added == 1
    (tmp_path / "secret.txt").write_text(f"{SECRET}\n")
    (docs / "notes.txt").unlink()
    (docs / "notes.txt").symlink_to(tmp_path / "secret.txt")
    again = store.add("kb", [docs])
    assert again.removed == 1 and "outside" in again.skipped[str(docs / "notes.txt")]
    assert store.bm25("kb", "quarterly hunter2", 5) == []


@pytest.mark.parametrize("limit", [10, 4096])
def test_the_reader_stops_at_the_size_cap_and_reads_a_file_under_it(tmp_path: Path, limit: int) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * 100)
    if limit < 100:
        with pytest.raises(UnreadableFile, match="100 bytes, over the 10 bytes limit"):
            read_regular_file(path, inside=[tmp_path], max_bytes=limit)
    else:
        assert read_regular_file(path, inside=[tmp_path], max_bytes=limit) == b"x" * 100


@pytest.mark.timeout(120)
def test_the_documents_page_lists_the_skipped_files_with_their_reasons(cfg: ConfigDir, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    docs = hostile_folder(tmp_path)
    cfg.write_app(docs={"max_file_mib": 1, "allowed_roots": [str(docs)]})
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(cfg.path))
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/documents.py")
    at.run()
    at.text_input(key="docs-add-name").set_value("kb")
    at.selectbox(key="docs-add-root").set_value(str(docs))
    at.button(key="docs-add-submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value.replace("\\", "") for w in at.warning]
    for name, reason in REASONS.items():
        assert any(f"skipped {docs / name}: " in w and reason in w for w in warnings), (name, warnings)
    assert any("2 added" in s.value for s in at.success)
