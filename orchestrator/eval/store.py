"""Evals in SQLite beside the history: `<sessions_dir>/eval.db` (owner-only, 0600).

Tables: evals (one row per eval: its spec as JSON, status), items (the questions as they were when the
eval started, so a resume does not need the file), answers (per item and system: the session id in
history, text, status, tokens, wall time), scores (per item, system and method: reference or judge) and
pairs (per item and baseline: the judge's two-order verdict). What is stored is done: a resume computes
only what is missing. The eval id -> session id mapping is answers.session_id.

An eval that runs names its owner: the process id and that process's start time (evals.pid, pid_started), so
a second process refuses to run it at the same time (`claim`), and one whose owner is gone (killed, crashed;
its pid possibly reused by another process) reads as `interrupted`: `chorus eval resume` continues it.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from launcher.errors import ChorusError
from launcher.process.state import start_time
from orchestrator.eval.items import EvalItem

DB_NAME = "eval.db"
OWNER_ONLY = 0o600
_ID_RE = re.compile(r"^(?:eval_)?([0-9]{1,9})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evals (id TEXT PRIMARY KEY, number INTEGER UNIQUE, created_at REAL, finished_at REAL,
    status TEXT, source TEXT, pipeline TEXT, spec TEXT, error TEXT, pid INTEGER, pid_started REAL);
CREATE TABLE IF NOT EXISTS items (eval_id TEXT, idx INTEGER, item_id TEXT, question TEXT, data TEXT,
    PRIMARY KEY (eval_id, idx));
CREATE TABLE IF NOT EXISTS answers (eval_id TEXT, idx INTEGER, system TEXT, session_id TEXT, status TEXT,
    answer TEXT, error TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, wall_s REAL, finished_at REAL,
    PRIMARY KEY (eval_id, idx, system));
CREATE INDEX IF NOT EXISTS answers_session ON answers (session_id);
CREATE TABLE IF NOT EXISTS scores (eval_id TEXT, idx INTEGER, system TEXT, method TEXT, value REAL, detail TEXT,
    PRIMARY KEY (eval_id, idx, system, method));
CREATE TABLE IF NOT EXISTS pairs (eval_id TEXT, idx INTEGER, baseline TEXT, points REAL, outcome TEXT,
    consistent INTEGER, detail TEXT, PRIMARY KEY (eval_id, idx, baseline));
"""


class EvalStoreError(ChorusError):
    """eval.db cannot be opened or written (permissions, disk, a damaged file)."""

    def __init__(self, path: Path, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}", hint=hint or "Check sessions_dir in app.yaml and its permissions.")
        self.path = str(path)
        self.detail = message


class EvalRunning(ChorusError):
    """The eval is being run by a live process: a second one would run its missing answers twice."""

    def __init__(self, eval_id: str, pid: int) -> None:
        here = pid == os.getpid()
        super().__init__(f"{eval_id} is running in {'this process' if here else f'process {pid}'}; "
                         "stop it first or wait",
                         hint=f"Ctrl-C (or the UI's Stop) stops it; then `chorus eval resume {eval_id}` continues "
                              "it. `chorus eval list` shows when it is no longer running.")
        self.eval_id = eval_id
        self.pid = pid


class EvalNotFound(ChorusError):
    def __init__(self, eval_id: str) -> None:
        super().__init__(f"no eval {eval_id}", hint="`chorus eval list` shows the evals there are.")
        self.eval_id = eval_id


def normalise_eval_id(eval_id: str | int) -> str:
    """'3', '003' and 'eval_003' all name eval_003."""
    m = _ID_RE.match(str(eval_id).strip())
    if m is None:
        raise EvalNotFound(str(eval_id)[:40])
    return f"eval_{int(m.group(1)):03d}"


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=str)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


class EvalStore:
    def __init__(self, sessions_dir: Path) -> None:
        self.path = Path(sessions_dir) / DB_NAME

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction; the file is created owner-only before SQLite opens it."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, OWNER_ONLY))
            if self.path.stat().st_mode & 0o777 != OWNER_ONLY:
                self.path.chmod(OWNER_ONLY)
            conn = sqlite3.connect(self.path, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise EvalStoreError(self.path, f"cannot open ({getattr(exc, 'strerror', None) or exc})") from None
        conn.row_factory = sqlite3.Row
        try:
            conn.executescript(_SCHEMA)
            _migrate(conn)
            with conn:
                yield conn
        except sqlite3.Error as exc:
            raise EvalStoreError(self.path, f"database error: {exc}") from None
        finally:
            conn.close()

    # ------------------------------------------------------------ writing

    def create(self, spec: dict[str, Any], items: list[EvalItem], *, source: str, pipeline: str) -> str:
        """A new eval with its items; returns its id (eval_NNN, allocated inside the insert's transaction)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            number = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM evals").fetchone()[0]
            eval_id = f"eval_{number:03d}"
            conn.execute("INSERT INTO evals (id, number, created_at, status, source, pipeline, spec, pid, "
                         "pid_started) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                         (eval_id, number, time.time(), source, pipeline, _dumps(spec), os.getpid(),
                          _own_start()))
            conn.executemany("INSERT INTO items (eval_id, idx, item_id, question, data) VALUES (?, ?, ?, ?, ?)",
                             [(eval_id, it.index, it.id, it.question, _dumps(it.to_dict())) for it in items])
        return eval_id

    def claim(self, eval_id: str) -> None:
        """Mark the eval running in this process; EvalRunning when a live process (another one, or this
        one: the same pid and start time) has it running. Checked and written in one transaction, so of two
        processes that resume it at once one runs it and the other is refused."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT status, pid, pid_started FROM evals WHERE id = ?", (eval_id,)).fetchone()
            if row is None:
                raise EvalNotFound(eval_id)
            pid = row["pid"]
            if row["status"] == "running" and pid and owner_alive(int(pid), row["pid_started"]) and not (
                    int(pid) == os.getpid() and _same_start(row["pid_started"], _own_start())):
                raise EvalRunning(eval_id, int(pid))
            conn.execute("UPDATE evals SET status = 'running', error = NULL, finished_at = NULL, pid = ?, "
                         "pid_started = ? WHERE id = ?", (os.getpid(), _own_start(), eval_id))

    def set_status(self, eval_id: str, status: str, *, error: str | None = None) -> None:
        finished = time.time() if status != "running" else None
        with self._connect() as conn:
            conn.execute("UPDATE evals SET status = ?, error = ?, finished_at = ?, pid = ?, pid_started = ? "
                         "WHERE id = ?", (status, error, finished, os.getpid(), _own_start(), eval_id))

    def put_answer(self, eval_id: str, idx: int, system: str, *, session_id: str | None, status: str, answer: str,
                   error: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                   wall_s: float | None) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (eval_id, idx, system, session_id, status, answer, error, prompt_tokens,
                          completion_tokens, wall_s, time.time()))

    def forget_judgement(self, eval_id: str, idx: int, system: str, *, pipeline: str) -> None:
        """A failed answer runs again: the judge's verdicts on the old one (a 0 given without asking, a
        pair decided by default) go with it, so the new answer is judged."""
        with self._connect() as conn:
            conn.execute("DELETE FROM scores WHERE eval_id = ? AND idx = ? AND system = ? AND method = 'judge'",
                         (eval_id, idx, system))
            if system == pipeline:
                conn.execute("DELETE FROM pairs WHERE eval_id = ? AND idx = ?", (eval_id, idx))
            else:
                conn.execute("DELETE FROM pairs WHERE eval_id = ? AND idx = ? AND baseline = ?", (eval_id, idx, system))

    def put_score(self, eval_id: str, idx: int, system: str, method: str, value: float | None,
                  detail: dict[str, Any]) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                         (eval_id, idx, system, method, value, _dumps(detail)))

    def put_pair(self, eval_id: str, idx: int, baseline: str, *, points: float, outcome: str, consistent: bool | None,
                 detail: dict[str, Any]) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (eval_id, idx, baseline, points, outcome, None if consistent is None else int(consistent),
                          _dumps(detail)))

    # ------------------------------------------------------------ reading

    def get(self, eval_id: str | int) -> dict[str, Any]:
        eid = normalise_eval_id(eval_id)
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM evals WHERE id = ?", (eid,)).fetchone()
        if row is None:
            raise EvalNotFound(eid)
        return self._eval_row(row)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """Evals, newest first, with how many items they have and how many answers are stored."""
        with self._connect() as conn:
            rows = conn.execute("SELECT e.*, (SELECT COUNT(*) FROM items i WHERE i.eval_id = e.id) AS n_items, "
                                "(SELECT COUNT(*) FROM answers a WHERE a.eval_id = e.id) AS n_answers "
                                "FROM evals e ORDER BY number DESC LIMIT ?", (limit,)).fetchall()
        return [{**self._eval_row(r), "n_items": r["n_items"], "n_answers": r["n_answers"]} for r in rows]

    @staticmethod
    def _eval_row(row: sqlite3.Row) -> dict[str, Any]:
        data = dict(row)
        data["spec"] = _loads(data["spec"]) or {}
        if data["status"] == "running" and not (data.get("pid") and owner_alive(int(data["pid"]),
                                                                                 data.get("pid_started"))):
            data["status"] = "interrupted"  # its process is gone: `chorus eval resume` continues it
        return data

    def items(self, eval_id: str) -> builtins.list[EvalItem]:  # `list` here is the method above
        with self._connect() as conn:
            rows = conn.execute("SELECT data FROM items WHERE eval_id = ? ORDER BY idx", (eval_id,)).fetchall()
        return [EvalItem.from_dict(_loads(r["data"])) for r in rows]

    def answers(self, eval_id: str) -> dict[tuple[int, str], dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM answers WHERE eval_id = ?", (eval_id,)).fetchall()
        return {(r["idx"], r["system"]): dict(r) for r in rows}

    def scores(self, eval_id: str) -> dict[tuple[int, str, str], dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM scores WHERE eval_id = ?", (eval_id,)).fetchall()
        return {(r["idx"], r["system"], r["method"]): {**dict(r), "detail": _loads(r["detail"])} for r in rows}

    def pairs(self, eval_id: str) -> dict[tuple[int, str], dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM pairs WHERE eval_id = ?", (eval_id,)).fetchall()
        return {(r["idx"], r["baseline"]): {**dict(r), "detail": _loads(r["detail"])} for r in rows}

    def eval_of_session(self, session_id: str) -> str | None:
        """Which eval a history session was run for, if any."""
        with self._connect() as conn:
            row = conn.execute("SELECT eval_id FROM answers WHERE session_id = ?", (session_id,)).fetchone()
        return row["eval_id"] if row else None


def _migrate(conn: sqlite3.Connection) -> None:
    """Columns added since the first eval.db: an older file gets them (empty) when it is opened."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(evals)")}
    if "pid_started" not in columns:
        try:
            conn.execute("ALTER TABLE evals ADD COLUMN pid_started REAL")
        except sqlite3.OperationalError as exc:  # another process added it between the two statements
            if "duplicate column" not in str(exc):
                raise


@functools.cache
def _start_of(pid: int) -> float | None:
    return start_time(pid)


def _own_start() -> float | None:
    """This process's start time (looked up by pid: a forked child is another process)."""
    return _start_of(os.getpid())


_SAME_START_S = 1.0  # psutil's start times of one process agree to the clock tick


def _same_start(recorded: float | None, actual: float | None) -> bool:
    """Unknown on either side (an eval.db written before start times were kept) counts as the same."""
    return recorded is None or actual is None or abs(recorded - actual) < _SAME_START_S


def owner_alive(pid: int, started: float | None) -> bool:
    """Whether the process that runs an eval still runs: `pid` exists, is not a zombie, and started when
    the record says (else the pid was reused by another process after the owner died)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return _same_start(started, proc.create_time())
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's process, not readable: it exists
        return True
