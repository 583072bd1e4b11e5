"""Run history on disk: sessions/session_NNN/ JSON files (the truth) written as the run goes.

Layout (the seed's): config_snapshot.json, stepN.json, stepN_<model>.json (stages with several
models), aggregation.json, final.txt, plus session.json with id, mode, question and status.
Every file is written to a temp file and renamed, so a crash never leaves half a JSON file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import ChorusError
from launcher.fileio import write_text_atomic
from orchestrator.records import RunRecord, StageRecord, stage_from_dict, to_dict

log = logging.getLogger("chorus.sessions")

SESSION_RE = re.compile(r"^session_(\d{3,})$")


class SessionError(ChorusError):
    """History could not be read or written; carries the path."""

    def __init__(self, path: str | Path, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}", hint=hint)
        self.path = str(path)


class SessionNotFound(SessionError):
    def __init__(self, session_id: str, sessions_dir: Path) -> None:
        super().__init__(sessions_dir, f"no session '{session_id}'", hint="`chorus history list` shows the sessions.")
        self.session_id = session_id


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    write_text_atomic(path, text)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise SessionError(path, f"unreadable JSON ({exc})") from None


def normalise_id(session_id: str | int) -> str:
    """'7', '007', 'session_007' all name session_007."""
    text = str(session_id).strip()
    m = SESSION_RE.match(text)
    digits = m.group(1) if m else text
    if not digits.isdigit():
        raise SessionError(text, "not a session id", hint="Use a number such as 7 or session_007.")
    return f"session_{int(digits):03d}"


# ---------------------------------------------------------------- writing


class SessionWriter:
    """A RunSink that mirrors one run into its session folder (and the index) as it goes."""

    def __init__(self, store: SessionStore, session_dir: Path, snapshot: dict[str, Any]) -> None:
        self.store = store
        self.dir = session_dir
        self.id = session_dir.name
        self.snapshot = snapshot
        self.created_at = time.time()

    def _meta(self, run: RunRecord) -> dict[str, Any]:
        return {
            "id": self.id, "created_at": self.created_at, "finished_at": run.finished_at,
            "mode": run.mode, "question": run.question, "status": run.status,
            "parent_session": run.parent_session, "rerun_from_stage": run.rerun_from_stage,
            "stages": [s.name for s in run.stages], "error": run.error,
            "warnings": run.warnings,
        }

    def run_started(self, run: RunRecord) -> None:
        write_json_atomic(self.dir / "config_snapshot.json", self.snapshot)
        write_json_atomic(self.dir / "session.json", self._meta(run))
        self.store.index_session(self.id)

    def stage_finished(self, run: RunRecord, stage: StageRecord) -> None:
        data = to_dict(stage)
        responses = data.pop("responses")
        if len(responses) == 1:
            data["response"] = responses[0]
        else:
            data["responses"] = [r["label"] for r in responses]
            for resp in responses:
                write_json_atomic(self.dir / f"step{stage.index}_{resp['label']}.json",
                                  {"step": stage.index, "stage": stage.name, **resp})
        write_json_atomic(self.dir / f"step{stage.index}.json", data)
        aggregations = [{"step": s.index, "stage": s.name, **to_dict(s.aggregation)}
                        for s in run.stages if s.aggregation is not None]
        write_json_atomic(self.dir / "aggregation.json", aggregations)
        write_json_atomic(self.dir / "session.json", self._meta(run))
        self.store.index_session(self.id)

    def run_finished(self, run: RunRecord) -> None:
        if run.status == "completed":
            write_text_atomic(self.dir / "final.txt", run.final)
        write_json_atomic(self.dir / "session.json", self._meta(run))
        self.store.index_session(self.id)


# ---------------------------------------------------------------- reading


@dataclass
class Session:
    id: str
    dir: Path
    meta: dict[str, Any]
    snapshot: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    final: str | None = None
    aggregations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "dir": str(self.dir), **self.meta, "final": self.final,
                "config_snapshot": self.snapshot, "steps": [to_dict(s) for s in self.stages],
                "aggregation": self.aggregations}


def load_stage(session_dir: Path, index: int) -> StageRecord:
    data = read_json(session_dir / f"step{index}.json")
    if "response" in data:
        data["responses"] = [data.pop("response")]
    else:
        data["responses"] = [read_json(session_dir / f"step{index}_{label}.json")
                             for label in data.get("responses", [])]
    return stage_from_dict(data)


# ---------------------------------------------------------------- the store


class SessionStore:
    """All sessions under one sessions dir, with their SQLite search index."""

    def __init__(self, sessions_dir: Path) -> None:
        self.dir = Path(sessions_dir)

    def create(self, snapshot: dict[str, Any]) -> SessionWriter:
        """Allocate the next session_NNN atomically (mkdir either creates it or fails)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(self.dir, f"cannot create the sessions dir ({exc.strerror})",
                               hint="Check sessions_dir in app.yaml and its permissions.") from None
        number = self._highest() + 1
        for _ in range(10_000):
            path = self.dir / f"session_{number:03d}"
            try:
                path.mkdir()
            except FileExistsError:
                number += 1
                continue
            except OSError as exc:
                raise SessionError(path, f"cannot create session folder ({exc.strerror})",
                                   hint="Check free disk space and permissions of sessions_dir.") from None
            return SessionWriter(self, path, snapshot)
        raise SessionError(self.dir, "could not allocate a session id")

    def _highest(self) -> int:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return 0
        numbers = [int(m.group(1)) for n in names if (m := SESSION_RE.match(n))]
        return max(numbers, default=0)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return sorted((n for n in names if SESSION_RE.match(n) and (self.dir / n / "session.json").exists()),
                      key=lambda n: int(n.split("_")[1]))

    def path(self, session_id: str | int) -> Path:
        sid = normalise_id(session_id)
        path = self.dir / sid
        if not (path / "session.json").exists():
            raise SessionNotFound(sid, self.dir)
        return path

    def load(self, session_id: str | int) -> Session:
        path = self.path(session_id)
        meta = read_json(path / "session.json")
        snapshot = read_json(path / "config_snapshot.json") if (path / "config_snapshot.json").exists() else {}
        stages = []
        index = 1
        while (path / f"step{index}.json").exists():
            stages.append(load_stage(path, index))
            index += 1
        final = (path / "final.txt").read_text(encoding="utf-8") if (path / "final.txt").exists() else None
        aggs = read_json(path / "aggregation.json") if (path / "aggregation.json").exists() else []
        return Session(path.name, path, meta, snapshot, stages, final, aggs)

    # -- the index (sqlite-utils); JSON stays the truth, so every failure here is only logged
    @property
    def index(self):
        from orchestrator.history.index import HistoryIndex

        return HistoryIndex(self.dir / "index.db", self)

    def index_session(self, session_id: str) -> None:
        try:
            self.index.upsert(self.load(session_id))
        except Exception as exc:
            log.warning("history index not updated for %s: %s", session_id, exc)
