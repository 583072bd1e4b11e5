"""The SQLite mirror of the session files, for listing and full-text search (sqlite-utils + FTS5).

It can always be rebuilt from the JSON files, so a missing or corrupt database is rebuilt, not fatal.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils

if TYPE_CHECKING:
    from orchestrator.sessions import Session, SessionStore

log = logging.getLogger("chorus.history")

SCHEMA_VERSION = 1


class HistoryIndex:
    def __init__(self, path: Path, store: SessionStore) -> None:
        self.path = Path(path)
        self.store = store

    # -- connection
    def _connect(self) -> sqlite_utils.Database:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        except (OSError, sqlite3.OperationalError) as exc:
            from orchestrator.sessions import SessionError

            raise SessionError(self.path, f"cannot open the history index ({exc})",
                               hint="Check that sessions_dir exists and is writable.") from None
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        self._ensure_schema(db)
        return db

    def _ensure_schema(self, db: sqlite_utils.Database) -> None:
        if "sessions" in db.table_names() and "documents_fts" in db.table_names():
            return
        db["sessions"].create({"id": str, "number": int, "created_at": float, "finished_at": float, "mode": str,
                               "question": str, "status": str, "final": str, "parent_session": str,
                               "rerun_from_stage": int, "stages": int}, pk="id", if_not_exists=True)
        db["documents"].create({"id": str, "session_id": str, "field": str, "content": str}, pk="id",
                               if_not_exists=True)
        db["documents"].create_index(["session_id"], if_not_exists=True)
        if "documents_fts" not in db.table_names():
            db["documents"].enable_fts(["content"], create_triggers=True, tokenize="porter")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def db(self) -> sqlite_utils.Database:
        """An open, healthy database; a corrupt file is moved aside and rebuilt from the JSON files."""
        try:
            db = self._connect()
            db.execute("select count(*) from sessions").fetchone()
            return db
        except sqlite3.DatabaseError as exc:
            log.warning("history index %s is unreadable (%s): rebuilding it from the session files", self.path, exc)
            self._move_aside()
            return self.rebuild()

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{self.path}{suffix}")
            if p.exists():
                p.replace(p.with_name(f"{p.name}.corrupt-{stamp}"))

    # -- writing
    def rebuild(self) -> sqlite_utils.Database:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        db = self._connect()
        count = 0
        for sid in self.store.ids():
            try:
                self._upsert(db, self.store.load(sid))
                count += 1
            except Exception as exc:
                log.warning("skipping %s while reindexing: %s", sid, exc)
        log.info("reindexed %d sessions", count)
        return db

    def upsert(self, session: Session) -> None:
        db = self.db()
        try:
            self._upsert(db, session)
        finally:
            db.conn.close()

    def _upsert(self, db: sqlite_utils.Database, session: Session) -> None:
        m = session.meta
        docs = [("question", m.get("question") or ""), ("final", session.final or "")]
        for stage in session.stages:
            docs.append((f"step{stage.index}", stage.output or ""))
            docs.extend((f"step{stage.index}_{r.label}", r.text or "") for r in stage.responses if len(
                stage.responses) > 1)
        with db.conn:
            db["sessions"].upsert({
                "id": session.id, "number": int(session.id.split("_")[1]), "created_at": m.get("created_at"),
                "finished_at": m.get("finished_at"), "mode": m.get("mode"), "question": m.get("question"),
                "status": m.get("status"), "final": session.final or "", "parent_session": m.get("parent_session"),
                "rerun_from_stage": m.get("rerun_from_stage"), "stages": len(session.stages)}, pk="id")
            db.execute("delete from documents where session_id = ?", [session.id])
            db["documents"].insert_all(
                [{"id": f"{session.id}:{f}", "session_id": session.id, "field": f, "content": c}
                 for f, c in docs if c], pk="id", replace=True)

    # -- reading
    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        db = self.db()
        try:
            return list(db.query("select * from sessions order by number desc limit ?", [limit]))
        finally:
            db.conn.close()

    def count(self) -> int:
        db = self.db()
        try:
            return db["sessions"].count
        finally:
            db.conn.close()

    def search(self, text: str, limit: int = 20) -> list[dict[str, Any]]:
        """Sessions matching every word of `text`, best first, each with a snippet of the best match."""
        query = fts_query(text)
        if not query:
            return []
        db = self.db()
        try:
            rows = db.query(
                """
                select d.session_id, d.field, snippet(documents_fts, 0, '[', ']', '…', 12) as snippet,
                       documents_fts.rank as rank, s.question, s.status, s.created_at, s.mode
                from documents_fts
                join documents d on d.rowid = documents_fts.rowid
                join sessions s on s.id = d.session_id
                where documents_fts match ?
                order by documents_fts.rank
                """, [query])
            best: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row["session_id"] not in best:
                    best[row["session_id"]] = {"id": row["session_id"], **{k: row[k] for k in (
                        "question", "status", "created_at", "mode", "field", "snippet", "rank")}}
                if len(best) >= limit:
                    break
            return list(best.values())
        finally:
            db.conn.close()


def fts_query(text: str) -> str:
    """User words as an FTS5 query: every word must match (prefix match on the last), no syntax errors."""
    words = re.findall(r"\w+", text, flags=re.UNICODE)
    if not words:
        return ""
    quoted = [f'"{w}"' for w in words[:-1]] + [f'"{words[-1]}"*']
    return " ".join(quoted)
