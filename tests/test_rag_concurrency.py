"""docs.db used by several processes and threads at once: searches (a retrieve stage per eval item, `docs
search`) while `docs add` writes, on a real SQLite file.

Before: every new DocStore ran the whole schema script on its first connection, and that script wrote FTS5's
rank setting again; a search running meanwhile in another process failed with "SQL logic error" (QA also saw
"vtable constructor failed: chunks_fts" and "disk I/O error"), 1-5 items in 60 of two concurrent evals. Two
adds of one collection failed with a raw "UNIQUE constraint failed: files.collection, files.path": each
deleted the row it had read before the other's insert, then inserted its own. Now the schema is made once per
file under a write lock, readers run no DDL and write nothing, the file is in WAL mode, every write
transaction takes the lock first (BEGIN IMMEDIATE) and re-reads the file's row, and busy or locked moments are
tried again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.rag.retrieval import search
from orchestrator.rag.store import CollectionNotFound, DocStore
from tests.conftest import REPO

QUESTION = "how long are backups kept"
STABLE = "Backups are kept for fourteen days, then deleted.\n"  # backups.txt: never changed, always found

# One process: searches with a new DocStore each time (as each retrieve stage does), or adds the folder again
# after changing its own files, until the deadline. Prints what went wrong as JSON.
WORKER = r"""
import json, sys, time
from pathlib import Path
from orchestrator.rag.retrieval import search
from orchestrator.rag.store import CollectionNotFound, DocStore

role, db, root, until = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
errors, done, seen = [], 0, False
while time.time() < until or done < 3:
    try:
        if role == "search":
            passages = search(DocStore(db), "kb", "how long are backups kept", 3)
            if passages:
                seen = True
            elif seen:
                errors.append("no passage after the collection had them")
        else:
            for i in range(3):  # both writers change files the other also indexes: the same paths, racing
                (root / f"{role}-{i}.txt").write_text(f"{role} round {done} file {i}. Restores take an hour.\n" * 20)
            (root / f"shared-{done % 4}.md").write_text(f"# Shared\n\n{role} wrote this in round {done}.\n")
            DocStore(db).add("kb", [root], chunk_chars=300, overlap_chars=50)
    except CollectionNotFound as exc:
        if seen or role != "search":
            errors.append(f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    done += 1
print(json.dumps({"role": role, "errors": errors, "done": done}))
"""


def _docs(root: Path) -> Path:
    root.mkdir()
    (root / "backups.txt").write_text(STABLE)
    (root / "guide.md").write_text("# Install\n\nThe daemon listens on port 8125.\n")
    return root


def _hammer(db: Path, root: Path, seconds: float, *, readers: int, writers: int, threads: int) -> list[str]:
    """Reader and writer processes and reader threads here, all until one deadline; every error they met."""
    until = time.time() + seconds
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, role, str(db), str(root), str(until)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ["search"] * readers + [f"w{i}" for i in range(writers)]]
    errors: list[str] = []
    shared = DocStore(db)  # one instance used by every thread, as the UI's would be

    def read(store_of: str) -> None:
        seen, done = False, 0
        while time.time() < until or done < 3:
            store = shared if store_of == "shared" else DocStore(db)
            try:
                passages = search(store, "kb", QUESTION, 3)
                seen = seen or bool(passages)
                if seen and not passages:
                    errors.append("thread: no passage after the collection had them")
            except CollectionNotFound as exc:
                if seen:
                    errors.append(f"thread: {exc}")
            except Exception as exc:  # DocsError above all: the failures QA saw
                errors.append(f"thread: {type(exc).__name__}: {exc}")
            done += 1

    pool = [threading.Thread(target=read, args=("shared" if i % 2 else "own",)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=seconds + 120)
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        assert proc.returncode == 0, err[-2000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["done"] >= 3, report
        errors += [f"{report['role']}: {e}" for e in report["errors"]]
    return errors


@pytest.mark.timeout(240)
def test_searches_in_processes_and_threads_never_fail_while_adds_write(tmp_path: Path) -> None:
    root = _docs(tmp_path / "docs")
    db = tmp_path / "sessions" / "docs.db"
    DocStore(db).add("kb", [root], chunk_chars=300, overlap_chars=50)
    errors = _hammer(db, root, 6, readers=3, writers=2, threads=3)
    assert errors == [], errors[:10]
    store = DocStore(db)
    assert search(store, "kb", QUESTION, 1)[0].text == STABLE.strip()
    paths = [f["path"] for f in store.files("kb")]
    assert len(paths) == len(set(paths)) == len(list(root.iterdir()))  # each file once, none lost


@pytest.mark.timeout(240)
def test_a_new_docs_db_made_while_others_read_and_write_it(tmp_path: Path) -> None:
    """No docs.db at the start: the first writers race to make the schema while readers look for it. A reader
    sees no collection (never an error) until one is there, and nothing read makes a file or a table."""
    root = _docs(tmp_path / "docs")
    db = tmp_path / "sessions" / "docs.db"
    with pytest.raises(CollectionNotFound):
        search(DocStore(db), "kb", QUESTION)
    assert DocStore(db).collections() == [] and not db.exists()  # a reader creates nothing
    errors = _hammer(db, root, 5, readers=2, writers=3, threads=2)
    assert errors == [], errors[:10]
    assert search(DocStore(db), "kb", QUESTION, 1)[0].text == STABLE.strip()


def test_the_file_is_in_wal_mode_with_its_schema_made_once(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "docs.db"
    store = DocStore(db)
    store.add("kb", [_docs(tmp_path / "docs")])
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        rank = conn.execute("SELECT v FROM chunks_fts_config WHERE k = 'rank'").fetchone()[0]
        assert rank == "bm25(1.0, 0.5)"
        # a search by a new instance writes nothing (it wrote FTS5's rank setting each time): data_version
        # changes when another connection commits
        before = conn.execute("PRAGMA data_version").fetchone()[0]
        assert search(DocStore(db), "kb", QUESTION, 1) and DocStore(db).collections()
        assert conn.execute("PRAGMA data_version").fetchone()[0] == before
    finally:
        conn.close()


ADD_AT = r"""
import json, sys, time
from pathlib import Path
from orchestrator.rag.store import DocStore

db, root, at = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, at - time.time()))
try:
    print(json.dumps(DocStore(db).add("kb", [root], chunk_chars=200, overlap_chars=20).to_dict()))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


@pytest.mark.timeout(240)
def test_adds_of_one_collection_at_once_all_succeed(tmp_path: Path) -> None:
    """`docs add` of one folder by three processes at the same moment (a new collection, then again after
    every file changed): all finish, each file is indexed once, each file's chunks are its current text."""
    root = tmp_path / "docs"
    root.mkdir()
    db = tmp_path / "docs.db"

    def add_at_once(text: str) -> list[dict[str, object]]:
        for i in range(80):
            (root / f"f{i:02}.txt").write_text(f"File {i} {text}: backups are kept for {i} days. " * 12)
        at = time.time() + 3  # the processes' imports take about a second: then they start together
        procs = [subprocess.Popen([sys.executable, "-c", ADD_AT, str(db), str(root), str(at)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-2000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
        assert not [r["error"] for r in reports if "error" in r]  # was: UNIQUE constraint failed: files....
        return reports

    first = add_at_once("first")
    assert sum(int(r["added"]) for r in first) == 80  # type: ignore[call-overload]
    second = add_at_once("second")
    assert sum(int(r["updated"]) for r in second) == 80  # type: ignore[call-overload]
    store = DocStore(db)
    files = store.files("kb")
    assert len(files) == 80 and store.collection("kb")["n_chunks"] == sum(f["chunks"] for f in files)
    assert store.bm25("kb", "first", 5) == []  # no chunk of the old text is left, none is there twice
    assert len(store.bm25("kb", "second", 10_000)) == store.collection("kb")["n_chunks"]
