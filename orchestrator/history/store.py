"""Run history on disk: sessions/session_NNN/ folders (the truth), read back defensively.

The Recorder (recorder.py) writes a session as its run goes; the layout and the JSON of each file are in
serialize.py. Reading never fails because of one damaged session: what cannot be read is a problem on
the Session ("damaged: ..."), the rest of it and every other session still load. A session left
'running' by a process that is gone becomes 'interrupted' when history is read.

Everything here is owner-only: folders 0700, files 0600 (index.db and its -wal/-shm included).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from launcher.fileio import write_text_atomic
from orchestrator.history.index import HistoryIndex, ReindexReport, Rows
from orchestrator.history.recorder import Recorder, writer_alive
from orchestrator.history.serialize import (
    AGGREGATION_FILE,
    FINAL_FILE,
    SESSION_FILE,
    SNAPSHOT_FILE,
    Session,
    SessionError,
    SessionNotFound,
    check_aggregations,
    check_meta,
    check_snapshot,
    dumps,
    stage_from_files,
    step_file,
)
from orchestrator.records import RecordError

log = logging.getLogger("chorus.sessions")

MAX_ID_DIGITS = 9
SESSION_RE = re.compile(rf"^session_([0-9]{{3,{MAX_ID_DIGITS}}})$")
_ID_RE = re.compile(rf"^(?:session_)?([0-9]{{1,{MAX_ID_DIGITS}}})$")
LAST_ID_FILE = ".last_id"  # the highest session id ever allocated, kept when sessions are removed
Ids = list[str]  # (a name: `list` is a method of SessionStore)

__all__ = ["Recorder", "ReindexReport", "Session", "SessionError", "SessionNotFound", "SessionStore",
           "normalise_id", "read_json", "write_json_atomic"]


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, dumps(data))


def read_json(path: Path) -> Any:
    """A JSON file's data; FileNotFoundError as is, any other failure as a SessionError naming the file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise SessionError(path, f"unreadable JSON ({_short(str(exc) or type(exc).__name__, 80)})") from None


def normalise_id(session_id: str | int) -> str:
    """'7', '007', 'session_007' all name session_007. Only ASCII digits, at most 9 of them."""
    text = str(session_id).strip()
    m = _ID_RE.match(text)
    if m is None:
        raise SessionError(_short(text), "not a session id",
                           hint=f"Use a number of 1 to {MAX_ID_DIGITS} digits (0-9) such as 7, or session_007.")
    return f"session_{int(m.group(1)):03d}"


_STEP_RE = re.compile(r"^step([0-9]{1,6})\.json$")


def _step_numbers(path: Path) -> set[int]:
    """N of every stepN.json in a session folder."""
    try:
        names = os.listdir(path)
    except OSError:
        return set()
    return {int(m.group(1)) for m in map(_STEP_RE.match, names) if m and int(m.group(1)) > 0}


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class SessionStore:
    """All sessions under one sessions dir, with their SQLite search index."""

    def __init__(self, sessions_dir: Path) -> None:
        self.dir = Path(sessions_dir)

    # ------------------------------------------------------------ writing

    def create(self, snapshot: dict[str, Any]) -> Recorder:
        """Allocate the next session_NNN (mkdir either creates it or fails) and return its Recorder.

        The folder, its config_snapshot.json and a first session.json ('running') are written before this
        returns; if they cannot be, the folder is removed and SessionError raised: no empty, invisible session.
        """
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(self.dir, f"cannot create the sessions dir ({exc.strerror})",
                               hint="Check sessions_dir in app.yaml and its permissions.") from None
        number = self._highest() + 1
        for _ in range(10_000):
            path = self.dir / f"session_{number:03d}"
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                number += 1
                continue
            except OSError as exc:
                raise SessionError(path, f"cannot create session folder ({exc.strerror})",
                                   hint="Check free disk space and permissions of sessions_dir.") from None
            try:
                return Recorder(path, snapshot, self.index)
            except SessionError:
                shutil.rmtree(path, ignore_errors=True)
                raise
        raise SessionError(self.dir, "could not allocate a session id")

    def _highest(self) -> int:
        """The highest id in use, or ever used before sessions were removed (ids are never reused: a rerun
        names its parent by id)."""
        return max([int(n.split("_")[1]) for n in self.folders()] + [self._last_removed_id()])

    def _last_removed_id(self) -> int:
        try:
            text = (self.dir / LAST_ID_FILE).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text) if text.isdigit() and len(text) <= MAX_ID_DIGITS else 0

    def remember_highest(self) -> None:
        """Keep the highest id so far in LAST_ID_FILE, before sessions are removed."""
        try:
            write_text_atomic(self.dir / LAST_ID_FILE, f"{self._highest()}\n")
        except OSError as exc:
            raise SessionError(self.dir / LAST_ID_FILE, f"cannot write ({exc.strerror})",
                               hint="Check the permissions of the sessions dir.") from None

    # ------------------------------------------------------------ reading

    def folders(self) -> list[str]:
        """Every session_NNN folder, in order, whether or not it holds a session."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return sorted((n for n in names if SESSION_RE.match(n)), key=lambda n: int(n.split("_")[1]))

    def ids(self) -> list[str]:
        """The sessions (folders with a session.json), oldest first."""
        return [n for n in self.folders() if (self.dir / n / SESSION_FILE).exists()]

    def path(self, session_id: str | int) -> Path:
        sid = normalise_id(session_id)
        path = self.dir / sid
        if not (path / SESSION_FILE).exists():
            raise SessionNotFound(sid, self.dir)
        return path

    def load(self, session_id: str | int) -> Session:
        """The session, as much of it as can be read: damage is in `Session.problems`, never raised."""
        path = self.path(session_id)
        problems: list[str] = []

        def read(name: str, default: Any = None, *, required: bool = True) -> Any:
            try:
                return read_json(path / name)
            except FileNotFoundError:
                if required:
                    problems.append(f"{name} is missing")
                return default
            except SessionError as exc:
                problems.append(f"{name}: {exc.detail}")
                return default

        raw_meta = read(SESSION_FILE)
        unreadable = bool(problems)  # said already: not "is null" on top
        meta, meta_problems = check_meta(raw_meta, path.name)
        problems.extend(meta_problems if not unreadable else [])
        meta = self._recover(path, raw_meta, meta)
        snapshot = check_snapshot(read(SNAPSHOT_FILE, {}), problems)
        recovered = [k for k in ("question", "mode") if meta.get(k) is None and isinstance(snapshot.get(k), str)]
        if recovered:  # session.json damaged: what the snapshot, written before the run, says too
            meta.update({k: snapshot[k] for k in recovered})
        explained = bool(meta.get("history_error"))  # the recorder said what it could not write
        on_disk = _step_numbers(path)
        stages = []
        unread = 0  # every step is read on its own: one missing or damaged step hides none after it
        for index in range(1, max([len(meta["stages"]), *on_disk], default=0) + 1):
            if index not in on_disk:
                if not (explained and index > max(on_disk, default=0)):
                    problems.append(f"{step_file(index)} is missing")
                    unread += 1
                continue
            try:
                step = read_json(path / step_file(index))
                stages.append(stage_from_files(index, step, lambda name: read_json(path / name), problems))
            except (RecordError, SessionError, FileNotFoundError) as exc:
                detail = exc.message if isinstance(exc, RecordError) else getattr(exc, "detail", "missing")
                problems.append(detail if isinstance(exc, RecordError) else f"{step_file(index)}: {detail}")
                unread += 1
        if unread and meta["stages"] and not explained:
            problems.append(f"{SESSION_FILE} lists {len(meta['stages'])} finished stage(s), {len(stages)} could "
                            "be read")
        aggregations = check_aggregations(read(AGGREGATION_FILE, [], required=bool(stages)), problems)
        final = self._final(path, problems)
        if meta.get("status") == "completed" and final is None and not explained:
            problems.append(f"{FINAL_FILE} is missing")
        return Session(path.name, path, meta, snapshot, stages, final, aggregations, problems, recovered)

    @staticmethod
    def _final(path: Path, problems: list[str]) -> str | None:
        try:
            data = (path / FINAL_FILE).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            problems.append(f"{FINAL_FILE}: unreadable ({exc.strerror})")
            return None
        text = data.decode("utf-8", errors="replace")
        if "\ufffd" in text and "\ufffd".encode() not in data:
            problems.append(f"{FINAL_FILE} is not valid UTF-8 (shown with U+FFFD)")
        return text

    def _recover(self, path: Path, raw: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """A 'running' session whose writer is gone becomes 'interrupted', on disk too (what was finished
        stays); returns the meta to show."""
        if meta.get("status") != "running" or writer_alive(meta.get("writer"), path) is not False:
            return meta
        pid = meta["writer"].get("pid")
        error = {"type": "Interrupted", "message": f"chorus (pid {pid}) stopped before the run finished; "
                                                   "the stages it finished are kept",
                 "hint": "`chorus history rerun` runs it again from a stage."}
        changed = {"status": "interrupted", "error": meta.get("error") or error}
        try:
            write_json_atomic(path / SESSION_FILE, {**raw, **changed})
        except (OSError, SessionError) as exc:
            log.warning("cannot mark %s as interrupted: %s", path.name, exc)
        return {**meta, **changed}

    # ------------------------------------------------------------ listing and search (the index)

    @property
    def index(self) -> HistoryIndex:
        return HistoryIndex(self.dir / "index.db", self)

    def list(self, limit: int = 100) -> Rows:
        """Index rows, newest first; 'running' sessions whose process is gone are marked interrupted first."""
        return self.list_page(limit)[0]

    def list_page(self, limit: int = 100) -> tuple[Rows, int]:
        """The newest `limit` index rows (as `list`) and how many sessions there are in all."""
        rows, total = self.index.page(limit=limit)
        for row in rows:
            if row["status"] == "running":
                self._refresh(row)
        return rows, total

    def search(self, text: str, limit: int = 20) -> Rows:
        rows = self.index.search(text, limit=limit)
        for row in rows:
            if row["status"] == "running":
                self._refresh(row)
        return rows

    def _refresh(self, row: dict[str, Any]) -> None:
        try:
            session = self.load(row["id"])
        except SessionError:
            return
        if session.meta.get("status") != row["status"]:
            row["status"] = session.meta.get("status")
            self._index_quietly(session)

    def reindex(self) -> ReindexReport:
        return self.index.rebuild()

    def index_ids(self) -> Ids:
        """Every session id the index has a row for."""
        return self.index.ids()

    def forget(self, session_ids: Ids) -> None:
        """Drop removed sessions' rows from the index (SessionError when the index cannot be written: the
        files are gone either way, and `chorus history reindex` brings it in step)."""
        if not session_ids:
            return
        try:
            self.index.remove(session_ids)
        except Exception as exc:
            raise SessionError(self.index.path, f"sessions removed, but the index still lists them ({exc})",
                               hint="`chorus history reindex` rebuilds the index from the session files.") from None

    def index_session(self, session_id: str) -> None:
        """Update the index from the session's files (recovery; a run's recorder updates it from memory)."""
        try:
            session = self.load(session_id)
        except Exception as exc:
            log.warning("history index not updated for %s: %s", session_id, exc)
            return
        self._index_quietly(session)

    def _index_quietly(self, session: Session) -> None:
        try:
            self.index.upsert(session)
        except Exception as exc:  # the files are the truth; the index is a cache
            log.warning("history index not updated for %s: %s", session.id, exc)
