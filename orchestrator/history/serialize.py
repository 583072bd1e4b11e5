"""The session layout <-> run records: what each file of sessions/session_NNN/ holds, and back.

Layout (the seed's): session.json (id, mode, question, status, ...), config_snapshot.json, stepN.json,
stepN_<label>.json for stages with several models, stepN_retrieve.json for a retrieve stage (its query and
passages; each later stepM.json's params.sources says which of them its prompt contained), aggregation.json,
final.txt. The recorder writes with
these functions, the store loads with them, and the index, the CLI and the UI read the `Session` they give,
so a run is turned into JSON in one place (records.py for each record, here for the files).

Loading never trusts a file: whatever does not have the expected shape becomes a problem on the Session
(shown as "damaged: ..."), and everything else is still read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import ChorusError
from orchestrator.records import (
    ErrorInfo,
    RecordError,
    RunRecord,
    StageRecord,
    response_from_dict,
    run_from_dict,
    stage_from_dict,
    to_dict,
)

SESSION_FILE = "session.json"
SNAPSHOT_FILE = "config_snapshot.json"
AGGREGATION_FILE = "aggregation.json"
FINAL_FILE = "final.txt"
RUN_STATUSES = ("running", "completed", "partial", "failed", "cancelled", "interrupted")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # config's NAME_PATTERN: a safe file name part


class SessionError(ChorusError):
    """History could not be read or written; carries the path."""

    def __init__(self, path: str | Path, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}", hint=hint)
        self.path = str(path)
        self.detail = message


class SessionNotFound(SessionError):
    def __init__(self, session_id: str, sessions_dir: Path) -> None:
        super().__init__(sessions_dir, f"no session '{session_id}'", hint="`chorus history list` shows the sessions.")
        self.session_id = session_id


def step_file(index: int, label: str | None = None) -> str:
    return f"step{index}.json" if label is None else f"step{index}_{label}.json"


# ---------------------------------------------------------------- writing: records -> file contents


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(data: Any) -> str:
    """JSON text that always encodes as UTF-8: a lone surrogate (undecodable input) becomes U+FFFD."""
    return plain_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def plain_text(text: str) -> str:
    """`text` as valid Unicode for a file: a lone surrogate becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def session_meta(session_id: str, run: RunRecord, *, created_at: float, writer: dict[str, Any]) -> dict[str, Any]:
    """session.json for `run` as it is now; the recorder sets 'stages' to the stages actually written."""
    return {"id": session_id, "created_at": created_at, "finished_at": run.finished_at, "mode": run.mode,
            "question": run.question, "status": run.status, "parent_session": run.parent_session,
            "rerun_from_stage": run.rerun_from_stage, "stages": [s.name for s in run.stages],
            "error": run.error.to_dict() if run.error else None, "warnings": list(run.warnings), "writer": writer}


def first_meta(session_id: str, snapshot: dict[str, Any], *, created_at: float,
               writer: dict[str, Any]) -> dict[str, Any]:
    """session.json before the run starts: the session is visible (as running) from its first moment."""
    return {"id": session_id, "created_at": created_at, "finished_at": None, "mode": snapshot.get("mode"),
            "question": snapshot.get("question"), "status": "running", "parent_session": None,
            "rerun_from_stage": None, "stages": [], "error": None, "warnings": [], "writer": writer}


def stage_files(stage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The files of one stage (its `to_dict` data), in writing order: each model's file, then stepN.json.

    A one-model stage keeps its response inside stepN.json; with several, stepN.json lists their labels.
    """
    data = dict(stage)
    responses = data.pop("responses")
    index = data["index"]
    if (data.get("params") or {}).get("kind") == "retrieve":  # the passages later prompts were given, on their own
        details = (data.get("aggregation") or {}).get("details") or {}
        passages = {"step": index, "stage": data["name"], **{k: v for k, v in details.items() if k != "context"}}
        return [(step_file(index, "retrieve"), passages), (step_file(index), {**data, "responses": []})]
    if len(responses) == 1:
        return [(step_file(index), {**data, "response": responses[0]})]
    files = [(step_file(index, r["label"]), {"step": index, "stage": data["name"], **r}) for r in responses]
    files.append((step_file(index), {**data, "responses": [r["label"] for r in responses]}))
    return files


def aggregation_list(stages: list[StageRecord]) -> list[dict[str, Any]]:
    """aggregation.json: every stage's aggregation so far, tagged with its step."""
    return [{"step": s.index, "stage": s.name, **to_dict(s.aggregation)} for s in stages if s.aggregation is not None]


# ---------------------------------------------------------------- reading: file contents -> records


def check_meta(raw: Any, session_id: str) -> tuple[dict[str, Any], list[str]]:
    """session.json's data with every field of the wrong type dropped, and why (as problems)."""
    if not isinstance(raw, dict):
        return {"id": session_id, "stages": [], "warnings": []}, [f"{SESSION_FILE} is {_kind(raw)}, not an object"]
    meta = dict(raw)
    problems = []
    checks: dict[str, tuple[tuple[type, ...], Any]] = {
        "created_at": ((int, float), None), "finished_at": ((int, float), None), "mode": ((str,), None),
        "question": ((str,), None), "status": ((str,), None), "parent_session": ((str,), None),
        "rerun_from_stage": ((int,), None), "stages": ((list,), []), "error": ((dict,), None),
        "warnings": ((list,), []), "writer": ((dict,), None)}
    for key, (types_, empty) in checks.items():
        value = meta.get(key)
        if value is None:
            meta[key] = empty
        elif not isinstance(value, types_) or isinstance(value, bool):
            problems.append(f"{SESSION_FILE}: '{key}' is {_kind(value)}")
            meta[key] = empty
    if meta["error"] is not None:
        try:
            ErrorInfo.from_dict(meta["error"], where=f"{SESSION_FILE}: 'error'")
        except RecordError as exc:
            problems.append(exc.message)
            meta["error"] = None
    if not all(isinstance(s, str) for s in meta["stages"]):
        problems.append(f"{SESSION_FILE}: 'stages' is not a list of names")
        meta["stages"] = []
    meta["warnings"] = [str(w) for w in meta["warnings"]]
    if meta["status"] is not None and meta["status"] not in RUN_STATUSES:
        problems.append(f"{SESSION_FILE}: unknown status {_kind(meta['status'])}")
    if meta.get("history_error"):
        problems.append(f"history incomplete: {meta['history_error']!s}")
    meta["id"] = session_id
    return meta, problems


def stage_from_files(index: int, step: Any, read: Callable[[str], Any], problems: list[str]) -> StageRecord:
    """One stage from stepN.json's data, reading its models' files with `read(name)`.

    A model file that is missing or damaged is a problem and is left out; a stepN.json without the shape of
    a stage raises RecordError (the stage cannot be shown).
    """
    name = step_file(index)
    if not isinstance(step, dict):
        raise RecordError(name, f"is {_kind(step)}, not an object")
    data = dict(step)
    if "response" in data:
        data["responses"] = [data.pop("response")]
    labels = data.pop("responses", [])
    if not isinstance(labels, list):
        raise RecordError(name, f"'responses' is {_kind(labels)}, not a list")
    stage = stage_from_dict({**data, "responses": []}, where=name)
    for item in labels:
        if isinstance(item, dict):  # one-model stage: the response itself
            stage.responses.append(response_from_dict(item, where=f"{name}, response"))
            continue
        if not isinstance(item, str) or not LABEL_RE.match(item):
            problems.append(f"{name}: {_kind(item)} is not a model label")
            continue
        file = step_file(index, item)
        try:
            stage.responses.append(response_from_dict(read(file), where=file))
        except FileNotFoundError:
            problems.append(f"{file} is missing")
        except ChorusError as exc:
            problems.append(exc.message)
    if stage.index != index:
        problems.append(f"{name}: 'index' is {stage.index}, read as step {index}")
        stage.index = index
    return stage


def check_aggregations(raw: Any, problems: list[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
        problems.append(f"{AGGREGATION_FILE} is {_kind(raw)}, not a list of objects")
        return []
    return raw


def check_snapshot(raw: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        problems.append(f"{SNAPSHOT_FILE} is {_kind(raw)}, not an object")
        return {}
    return raw


@dataclass
class Session:
    """A saved run as read back: its session.json data, config snapshot, stages and final answer.

    `problems` lists what could not be read and why; a session with problems is shown as damaged, with
    whatever could be read.
    """

    id: str
    dir: Path
    meta: dict[str, Any]
    snapshot: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    final: str | None = None
    aggregations: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # meta keys (question, mode) read from the snapshot

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    @property
    def error(self) -> ErrorInfo | None:
        """Why the run failed or was cancelled, read from session.json (checked by `check_meta`)."""
        error = self.meta.get("error")
        return ErrorInfo.from_dict(error, where=f"{self.id}: {SESSION_FILE}") if error else None

    def to_dict(self) -> dict[str, Any]:
        """The session as `history show --json` and the UI see it."""
        return {"id": self.id, "dir": str(self.dir), **self.meta, "final": self.final,
                "config_snapshot": self.snapshot, "steps": [to_dict(s) for s in self.stages],
                "aggregation": self.aggregations, "problems": list(self.problems)}

    def to_run(self) -> RunRecord:
        """The run record this session holds (for reruns and API views)."""
        m = self.meta
        return run_from_dict({
            "question": m.get("question") or "", "mode": m.get("mode") or "manual",
            "pipeline": self.snapshot.get("pipeline") or {}, "status": m.get("status") or "failed",
            "final": self.final or "", "error": m.get("error"), "started_at": m.get("created_at") or 0.0,
            "finished_at": m.get("finished_at"), "parent_session": m.get("parent_session"),
            "rerun_from_stage": m.get("rerun_from_stage"), "warnings": m.get("warnings") or [],
            "stages": [to_dict(s) for s in self.stages]}, where=self.id)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:39] + "…"
        return f"{shown!r}"
    if isinstance(value, bool | int | float):
        return repr(value)
    names: dict[type, str] = {list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
