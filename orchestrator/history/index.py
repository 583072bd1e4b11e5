"""The SQLite mirror of the session files, for listing and full-text search (sqlite-utils + FTS5).

It can always be rebuilt from the JSON files, so a missing or corrupt database is rebuilt, not fatal.
Reading brings it in step first (freshness.py): each row keeps its folder's stamp, and sessions whose
folder changed, appeared or went away since are re-indexed or dropped; a deleted index.db is refilled
that way. Where the index cannot be written (a full disk, a read-only sessions dir), reading still works:
the rows come from an in-memory index built from the JSON files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.history.freshness import folder_stamp, folder_stamps
from orchestrator.history.serialize import SESSION_FILE, Session, SessionError

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger("chorus.history")

SCHEMA_VERSION = 3  # 2: sessions.problems (why a session is damaged); 3: sessions.stamp (freshness.py)
OWNER_ONLY = 0o600

# Schema creation in one write transaction (BEGIN IMMEDIATE), so concurrent writers, threads or processes,
# never race between "does it exist?" and "create it". Same tables and triggers as sqlite-utils' enable_fts.
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS "sessions" ("id" TEXT PRIMARY KEY, "number" INTEGER, "created_at" REAL,
       "finished_at" REAL, "mode" TEXT, "question" TEXT, "status" TEXT, "final" TEXT, "parent_session" TEXT,
       "rerun_from_stage" INTEGER, "stages" INTEGER, "problems" TEXT, "stamp" TEXT)""",
    'CREATE TABLE IF NOT EXISTS "documents" ("id" TEXT PRIMARY KEY, "session_id" TEXT, "field" TEXT, "content" TEXT)',
    'CREATE INDEX IF NOT EXISTS "idx_documents_session_id" ON "documents" ("session_id")',
    """CREATE VIRTUAL TABLE IF NOT EXISTS "documents_fts" USING FTS5 ("content", tokenize='porter',
       content="documents")""",
    """CREATE TRIGGER IF NOT EXISTS "documents_ai" AFTER INSERT ON "documents" BEGIN
         INSERT INTO "documents_fts" (rowid, "content") VALUES (new.rowid, new."content"); END""",
    """CREATE TRIGGER IF NOT EXISTS "documents_ad" AFTER DELETE ON "documents" BEGIN
         INSERT INTO "documents_fts" ("documents_fts", rowid, "content") VALUES('delete', old.rowid, old."content");
       END""",
    """CREATE TRIGGER IF NOT EXISTS "documents_au" AFTER UPDATE ON "documents" BEGIN
         INSERT INTO "documents_fts" ("documents_fts", rowid, "content") VALUES('delete', old.rowid, old."content");
         INSERT INTO "documents_fts" (rowid, "content") VALUES (new.rowid, new."content"); END""",
    f"PRAGMA user_version={SCHEMA_VERSION}",
]
_COLUMNS = ("id", "number", "created_at", "finished_at", "mode", "question", "status", "final", "parent_session",
            "rerun_from_stage", "stages", "problems", "stamp")
_UPSERT_SESSION = (f'INSERT INTO "sessions" ({", ".join(_COLUMNS)}) VALUES ({", ".join(":" + c for c in _COLUMNS)}) '
                   f'ON CONFLICT("id") DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])}')
Rows = list[dict[str, Any]]  # (a name: `list` is a method of the classes below)
Ids = list[str]
_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: Path) -> threading.RLock:
    """One lock per index file: this process's writers take turns instead of failing on SQLite's locks."""
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(str(Path(path).absolute()), threading.RLock())


class SessionSource(Protocol):
    """What a rebuild reads: the session folders and a loader (the SessionStore)."""

    dir: Path

    def folders(self) -> list[str]: ...

    def load(self, session_id: str) -> Session: ...


@dataclass
class ReindexReport:
    """What `rebuild` did: how many sessions it indexed, which of them are damaged, which it left out."""

    indexed: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)  # indexed, shown as damaged: id -> problems
    skipped: dict[str, str] = field(default_factory=dict)  # not indexed: id -> why


class HistoryIndex:
    def __init__(self, path: Path, store: SessionSource) -> None:
        self.path = Path(path)
        self.store = store

    # -- connection
    def _open(self) -> sqlite3.Connection:
        """A connection to the index file with its schema made; plain sqlite3, so the recorder's writer thread
        never imports sqlite-utils (readers wrap it: `db()`)."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # no session yet: an empty history
            _create_owner_only(self.path)
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        except (OSError, sqlite3.OperationalError) as exc:
            raise SessionError(self.path, f"cannot open the history index ({exc})",
                               hint="Check that sessions_dir exists and is writable.") from None
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            with contextlib.suppress(sqlite3.OperationalError):  # another connection is switching it: WAL anyway
                conn.execute("PRAGMA journal_mode=WAL")
            _owner_only(self.path)  # -wal and -shm exist now (SQLite gives them the database's mode)
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION and conn.execute(
                "select 1 from sqlite_master where name = 'documents_fts'").fetchone():
            return
        with _write_lock(self.path):
            conn.execute("BEGIN IMMEDIATE")  # other processes wait here, then find the schema made
            try:
                _create_schema(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def conn(self) -> sqlite3.Connection:
        """An open, healthy index; a corrupt file is moved aside and rebuilt from the JSON files.

        Only real corruption counts: a locked or busy database (OperationalError) is raised, not rebuilt,
        since moving its files aside would pull them from under the connections that hold them.
        """
        try:
            conn = self._open()
        except sqlite3.OperationalError as exc:
            raise self._busy(exc) from None
        except sqlite3.DatabaseError as exc:
            return self._rebuilt(exc)
        try:
            conn.execute("select count(*) from sessions").fetchone()
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            raise self._busy(exc) from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            return self._rebuilt(exc)

    def db(self) -> sqlite_utils.Database:
        """`conn()` for readers, with sqlite-utils' queries."""
        return _database(self.conn())

    def _busy(self, exc: sqlite3.OperationalError) -> SessionError:
        return SessionError(self.path, f"the history index is busy or unreadable ({exc})",
                            hint="Try again; `chorus history reindex` rebuilds it from the session files.")

    def _rebuilt(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        with _write_lock(self.path):
            log.warning("history index %s is unreadable (%s): rebuilding it from the session files", self.path, exc)
            self._move_aside()
            self.rebuild()
            return self._open()

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{self.path}{suffix}")
            if p.exists():
                p.replace(p.with_name(f"{p.name}.corrupt-{stamp}"))

    # -- writing
    def rebuild(self) -> ReindexReport:
        """A new index from the session files (the truth). A damaged session is indexed as damaged; what
        cannot be indexed at all is in the report with the reason. A full disk is a SessionError."""
        report = ReindexReport()
        with _write_lock(self.path):
            try:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                conn = self._open()
                try:
                    for sid in self.store.folders():
                        self._reindex_one(conn, sid, report)
                finally:
                    conn.close()
            except (OSError, sqlite3.Error) as exc:
                raise SessionError(self.path, f"cannot rebuild the history index ({exc})",
                                   hint="Free disk space and check the permissions of the sessions dir, then "
                                        "run `chorus history reindex` again; the session files are unchanged.",
                                   ) from None
        log.info("reindexed %d sessions (%d damaged, %d skipped)", report.indexed, len(report.damaged),
                 len(report.skipped))
        return report

    def _reindex_one(self, conn: sqlite3.Connection, sid: str, report: ReindexReport) -> None:
        if not (self.store.dir / sid / SESSION_FILE).is_file():
            report.skipped[sid] = f"no {SESSION_FILE} (nothing of this session was saved)"
            return
        stamp = folder_stamp(self.store.dir / sid)  # before reading: a change while it is read shows later
        try:
            session = self.store.load(sid)
        except SessionError as exc:
            report.skipped[sid] = exc.detail
            return
        self._upsert(conn, session, stamp)  # sqlite errors (a full disk) fail the whole rebuild
        report.indexed += 1
        if session.problems:
            report.damaged[sid] = list(session.problems)

    def upsert(self, session: Session) -> None:
        with _write_lock(self.path):
            conn = self.conn()
            try:
                self._upsert(conn, session)
            finally:
                conn.close()

    def _upsert(self, conn: sqlite3.Connection, session: Session, stamp: str | None = None) -> None:
        """The session's row and search documents; `stamp` is its folder's when it was read (else now's)."""
        m = session.meta  # checked by the loader: every value has its column's type
        docs = [("question", m.get("question") or ""), ("final", session.final or "")]
        for stage in session.stages:
            docs.append((f"step{stage.index}", stage.output or ""))
            docs.extend((f"step{stage.index}_{r.label}", r.text or "") for r in stage.responses if len(
                stage.responses) > 1)
        row = {"id": session.id, "number": int(session.id.split("_")[1]), "created_at": m.get("created_at"),
               "finished_at": m.get("finished_at"), "mode": m.get("mode"), "question": m.get("question"),
               "status": m.get("status"), "final": session.final or "", "parent_session": m.get("parent_session"),
               "rerun_from_stage": m.get("rerun_from_stage"), "stages": len(session.stages),
               "problems": "\n".join(session.problems) or None,
               "stamp": stamp if stamp is not None else folder_stamp(session.dir)}
        with conn:  # one transaction; the FTS table follows the documents through its triggers
            conn.execute(_UPSERT_SESSION, row)
            conn.execute("delete from documents where session_id = ?", [session.id])
            conn.executemany('INSERT OR REPLACE INTO "documents" ("id", "session_id", "field", "content") '
                             "VALUES (?, ?, ?, ?)", [(f"{session.id}:{f}", session.id, f, c) for f, c in docs if c])

    def remove(self, session_ids: Ids) -> None:
        """Drop sessions and their search documents (the FTS table follows through its trigger)."""
        with _write_lock(self.path):
            conn = self.conn()
            try:
                with conn:
                    for sid in session_ids:
                        conn.execute("delete from documents where session_id = ?", [sid])
                        conn.execute("delete from sessions where id = ?", [sid])
            finally:
                conn.close()

    # -- in step with the folders
    def sync(self, conn: sqlite3.Connection) -> int:
        """Re-index the sessions whose folder changed or is new since it was indexed, drop the rows of folders
        that are gone; returns how many rows changed. Cheap when nothing did: one stamp per folder."""
        indexed = {r[0]: r[1] for r in conn.execute('select id, stamp from "sessions"').fetchall()}
        on_disk = folder_stamps(self.store.dir, self.store.folders())  # after: a row read has its folder on disk
        stale = [sid for sid, stamp in on_disk.items() if indexed.get(sid) != stamp]
        gone = [sid for sid in indexed if sid not in on_disk]
        if not stale and not gone:
            return 0
        with _write_lock(self.path):
            for sid in stale:
                try:
                    session = self.store.load(sid)
                except SessionError:  # gone or emptied meanwhile: the next read drops its row
                    continue
                self._upsert(conn, session, on_disk[sid])
            with conn:
                for sid in gone:
                    if folder_stamp(self.store.dir / sid) is not None:  # back meanwhile
                        continue
                    conn.execute("delete from documents where session_id = ?", [sid])
                    conn.execute("delete from sessions where id = ?", [sid])
        log.info("history index brought in step: %d session(s) re-indexed, %d dropped", len(stale), len(gone))
        return len(stale) + len(gone)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite_utils.Database]:
        """The index in step with the folders; where it cannot be opened or written (a full disk, a read-only
        sessions dir, a database locked past the timeout), an in-memory one built from the session files."""
        db: sqlite_utils.Database | None = None
        try:
            db = self.db()
            self.sync(db.conn)
        except (SessionError, sqlite3.Error, OSError) as exc:
            if db is not None:
                db.conn.close()
            log.warning("the history index %s cannot be updated (%s): reading the session files instead",
                        self.path, getattr(exc, "detail", exc))
            db = self._in_memory()
        try:
            yield db
        finally:
            db.conn.close()

    def _in_memory(self) -> sqlite_utils.Database:
        """The same tables in memory, filled from the session files: nothing is written to disk."""
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn.execute("PRAGMA temp_store=MEMORY")
        _create_schema(conn)
        db = _database(conn)
        for sid, stamp in folder_stamps(self.store.dir, self.store.folders()).items():
            try:
                self._upsert(conn, self.store.load(sid), stamp)
            except SessionError:
                continue
        return db

    # -- reading
    def ids(self) -> Ids:
        """The ids the index has rows for, as it is (not brought in step: prune reports rows of vanished folders)."""
        db = self.db()
        try:
            return [r["id"] for r in db.query("select id from sessions order by number")]
        finally:
            db.conn.close()

    def list(self, limit: int = 100) -> Rows:
        return self.page(limit)[0]

    def page(self, limit: int = 100) -> tuple[Rows, int]:
        """The newest `limit` rows (a negative limit gives none, not SQLite's "no limit"), and how many there are."""
        with self._reading() as db:
            rows = [_row(r) for r in db.query("select * from sessions order by number desc limit ?",
                                              [max(0, limit)])]
            return rows, db["sessions"].count

    def count(self) -> int:
        with self._reading() as db:
            return db["sessions"].count

    def search(self, text: str, limit: int = 20) -> Rows:
        """Sessions matching every word of `text`, best first, each with a snippet of the best match."""
        query = fts_query(text)
        if not query:
            return []
        with self._reading() as db:
            rows = db.query(
                """
                select d.session_id, d.field, snippet(documents_fts, 0, '[', ']', '…', 12) as snippet,
                       documents_fts.rank as rank, s.question, s.status, s.created_at, s.mode, s.problems
                from documents_fts
                join documents d on d.rowid = documents_fts.rowid
                join sessions s on s.id = d.session_id
                where documents_fts match ?
                order by documents_fts.rank
                """, [query])
            best: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row["session_id"] not in best:
                    best[row["session_id"]] = _row({"id": row["session_id"], **{k: row[k] for k in (
                        "question", "status", "created_at", "mode", "field", "snippet", "rank", "problems")}})
                if len(best) >= limit:
                    break
            return list(best.values())


def _database(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """`conn` with sqlite-utils' queries. sqlite-utils imports pandas and numpy when they are installed
    (streamlit installs them), for the column types of DataFrames, which chorus never inserts: 0.5 s of CPU
    in every `chorus history` command. So it is imported without them where it can be: they are blocked (a
    None entry in sys.modules makes their import raise ImportError) only while no other thread runs, as
    one could be importing them at that moment, and they import normally afterwards."""
    if "sqlite_utils" not in sys.modules and threading.active_count() == 1:
        blocked = [name for name in ("pandas", "numpy") if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]  # the documented way to block an import
        try:
            import sqlite_utils
        finally:
            for name in blocked:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    import sqlite_utils

    return sqlite_utils.Database(conn)


def fts_query(text: str) -> str:
    """User words as an FTS5 query: every word must match (prefix match on the last), no syntax errors."""
    words = re.findall(r"\w+", text, flags=re.UNICODE)
    if not words:
        return ""
    quoted = [f'"{w}"' for w in words[:-1]] + [f'"{words[-1]}"*']
    return " ".join(quoted)


def _create_schema(conn: sqlite3.Connection) -> None:
    """The tables, the FTS mirror and its triggers; columns added since version 1 added to an older index."""
    for statement in _SCHEMA:
        conn.execute(statement)
    columns = {row[1] for row in conn.execute('PRAGMA table_info("sessions")')}
    for column in ("problems", "stamp"):  # an index made by version 1 or 2
        if column not in columns:
            conn.execute(f'ALTER TABLE "sessions" ADD COLUMN "{column}" TEXT')


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as callers use it: 'problems' as a list; a time that is not a number (an index written by an
    older version from a damaged file) as None."""
    row = dict(row)
    row.pop("stamp", None)  # the index's own bookkeeping
    row["problems"] = row["problems"].split("\n") if row.get("problems") else []
    for key in ("created_at", "finished_at"):
        if key in row and not isinstance(row[key], int | float):
            row[key] = None
    return row


def _create_owner_only(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would use 0644 minus the umask); its -wal and
    -shm files are then created with the same mode."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, OWNER_ONLY))


def _owner_only(path: Path) -> None:
    """Tighten an index made by an older version (0644) to owner-only."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        with contextlib.suppress(OSError):
            if p.stat().st_mode & 0o077:
                p.chmod(OWNER_ONLY)
