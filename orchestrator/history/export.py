"""History a user manages: export a session (Markdown report or the run's JSON), remove sessions, prune old ones.

The session files are the truth: removal moves the folder out of sight first (one rename, so no reader
ever sees half a session), deletes it, then drops its rows from the SQLite index. A session that a live
process still writes is never removed. The highest id ever used is remembered (SessionStore), so a new
run never gets the id of a removed session that a rerun may still name as its parent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.history.recorder import writer_alive
from orchestrator.history.serialize import SESSION_FILE, Session, SessionError, check_meta, plain_text
from orchestrator.history.store import SessionStore, normalise_id, read_json

ExportFormat = Literal["md", "json"]
FORMATS: tuple[ExportFormat, ...] = ("md", "json")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_S = 36500 * 86400.0  # 100 years: a date before it has a meaning, and no session is older


class SessionBusy(SessionError):
    """A session that a live chorus process still writes (or may write): it is not removed."""

    def __init__(self, path: Path, pid: object, *, sure: bool) -> None:
        if sure:
            message = f"is still being written by a running chorus (pid {pid})"
            hint = "Wait for the run to finish, or cancel it, then remove it."
        else:
            message = "is marked running and its writer cannot be checked from here (another host?)"
            hint = "If that run is over, `chorus history rm --force` removes it anyway."
        super().__init__(path, message, hint=hint)
        self.pid = pid
        self.sure = sure


# ---------------------------------------------------------------- export


def export_session(session: Session, fmt: ExportFormat) -> str:
    """The session as a Markdown report or as JSON (`history show --json`'s data: the one serializer's)."""
    if fmt == "json":
        return session_json(session)
    if fmt == "md":
        return session_markdown(session)
    raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")


def session_json(session: Session) -> str:
    return plain_text(json.dumps(session.to_dict(), indent=2, ensure_ascii=False, default=str)) + "\n"


def session_markdown(session: Session) -> str:
    """A readable report: the question, each step with each model's answer and the merge, the final answer.

    Model and user text goes into fenced blocks (a fence longer than any backtick run inside), so a report
    never renders a link, image or HTML that a model wrote."""
    m = session.meta
    out = [f"# chorus {session.id}", ""]
    facts = [("status", m.get("status")), ("mode", m.get("mode")), ("created", _when(m.get("created_at"))),
             ("finished", _when(m.get("finished_at")))]
    if m.get("parent_session"):
        facts.append(("rerun of", f"{m['parent_session']} from step {m.get('rerun_from_stage')}"))
    pipeline = session.snapshot.get("pipeline")
    if isinstance(pipeline, dict) and pipeline.get("name"):
        facts.append(("pipeline", pipeline["name"]))
    out += [f"- **{k}:** {_inline(v)}" for k, v in facts if v not in (None, "")]
    if session.error:
        out.append(f"- **error:** {_inline(session.error.text())}")
    if session.problems:
        out.append(f"- **damaged:** {_inline('; '.join(session.problems))}")
    out += ["", "## Question", "", _block(m.get("question") or "")]
    for stage in session.stages:
        took = f", {stage.duration_s:.1f}s" if stage.duration_s is not None else ""
        out += ["", f"## Step {stage.index}: {_inline(stage.name)} ({_inline(stage.status)}{took})", ""]
        for r in stage.responses:
            out += [f"### {_inline(r.label)} ({_inline(r.model)}): {_inline(r.status)}", ""]
            figures = _figures(r.completion_tokens, r.total_s, r.tokens_per_s, r.params.get("n_gpu_layers"))
            if figures:
                out += [figures, ""]
            if r.error:
                out += [f"Error: {_inline(r.error.text())}", ""]
            if r.text:
                out += [_block(r.text), ""]
        agg = stage.aggregation
        if agg is not None and len(stage.responses) > 1:
            out += [f"### Aggregation: {_inline(agg.kind)}", ""]
            for call in agg.details.get("synthesis_calls") or []:
                if isinstance(call, dict):
                    figures = _figures(call.get("completion_tokens"), call.get("total_s"), call.get("tokens_per_s"),
                                       (call.get("params") or {}).get("n_gpu_layers"))
                    out += [f"Synthesis by {_inline(call.get('model'))}" + (f": {figures}" if figures else ""), ""]
            if "agreement" in agg.details and isinstance(agg.details["agreement"], int | float):
                out += [f"Agreement: {agg.details['agreement']:.0%}", ""]
            out += [_block(stage.output or agg.output), ""]
        if stage.error:
            out += [f"Error: {_inline(stage.error.text())}", ""]
    out += ["", "## Final answer", ""]
    out.append(_block(session.final) if session.final is not None else "_(no final answer)_")
    lines = [line for i, line in enumerate(out) if line or i == 0 or out[i - 1]]  # one blank line between parts
    return plain_text("\n".join(lines).rstrip() + "\n")


def _figures(tokens: Any, seconds: Any, speed: Any, ngl: Any) -> str:
    parts = []
    if isinstance(tokens, int) and tokens:
        parts.append(f"{tokens} tokens")
    if isinstance(seconds, int | float):
        parts.append(f"{seconds:.2f}s")
    if isinstance(speed, int | float) and speed:
        parts.append(f"{speed:.1f} tok/s")
    if isinstance(ngl, int):
        parts.append(f"n_gpu_layers {ngl}")
    return " · ".join(parts)


def _block(text: str) -> str:
    """`text` in a fenced block (blank lines around it dropped), fenced longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()
    return f"{fence}text\n{body}\n{fence}"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")


def _inline(value: object) -> str:
    """A short value on one Markdown line, shown as it is (no link, image, emphasis or HTML)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _when(ts: object) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) and ts else None


def default_export_name(session: Session, fmt: ExportFormat) -> str:
    return f"chorus-{session.id}.{fmt}"


# ---------------------------------------------------------------- remove


def check_removable(store: SessionStore, session_id: str | int, *, force: bool = False) -> Path:
    """The session's folder, if it may be removed: SessionNotFound when there is none, SessionBusy while a
    live process writes it (`force` only overrides a writer that cannot be checked, never a live one)."""
    path = store.path(session_id)
    meta, _ = check_meta(_read_meta(path), path.name)
    if meta.get("status") == "running":
        alive = writer_alive(meta.get("writer"), path)
        pid = (meta.get("writer") or {}).get("pid")
        if alive is True or (alive is None and not force):
            raise SessionBusy(path, pid, sure=alive is True)
    return path


def remove_sessions(store: SessionStore, session_ids: list[str | int], *, force: bool = False) -> list[str]:
    """Remove sessions (folders and index rows); all are checked before any is removed. Returns their ids."""
    paths = [check_removable(store, sid, force=force) for sid in dict.fromkeys(normalise_id(s) for s in session_ids)]
    return _remove(store, paths)


def _remove(store: SessionStore, paths: list[Path]) -> list[str]:
    if not paths:
        return []
    store.remember_highest()  # before anything goes: the next run never reuses a removed id
    removed: list[str] = []
    try:
        for path in paths:
            hidden = path.with_name(f".removing-{path.name}-{os.getpid()}")
            try:
                path.rename(hidden)  # one step: readers see the whole session or none of it
            except FileNotFoundError:
                continue  # removed meanwhile by someone else
            except OSError as exc:
                raise SessionError(path, f"cannot remove the session ({exc.strerror})",
                                   hint="Check the permissions of the sessions dir.") from None
            removed.append(path.name)
            shutil.rmtree(hidden, ignore_errors=True)
    finally:
        store.forget(removed)
    return removed


def _read_meta(path: Path) -> Any:
    try:
        return read_json(path / SESSION_FILE)
    except (FileNotFoundError, SessionError):
        return None


# ---------------------------------------------------------------- prune


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '2w', '1d12h' as seconds. ValueError with the accepted forms otherwise."""
    compact = "".join(text.split()).lower()
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"not a duration: {text!r} (use a number and a unit: s, m, h, d or w, e.g. 30d or 12h)")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"not a duration: {text!r} (it must be more than zero)")
    if not seconds <= MAX_DURATION_S:  # also inf and nan: digits enough overflow a float
        raise ValueError(f"too long: {text!r} (at most {MAX_DURATION_S // 86400:.0f}d, 100 years; every session is "
                         "younger than that)")
    return seconds


@dataclass
class PruneReport:
    """What `prune` removed (or would, with dry_run), what it kept and why, and stale index rows dropped."""

    cutoff: float
    removed: list[str] = field(default_factory=list)
    busy: dict[str, str] = field(default_factory=dict)        # old, but a live process writes it: kept
    stale_rows: list[str] = field(default_factory=list)       # index rows whose folder is gone
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "dry_run": self.dry_run, "removed": self.removed, "busy": self.busy,
                "stale_index_rows": self.stale_rows}


def prune_sessions(store: SessionStore, older_than_s: float, *, dry_run: bool = False,
                   now: float | None = None) -> PruneReport:
    """Remove every session created more than `older_than_s` ago (a session without a readable creation time
    is dated by its session.json's mtime). Sessions still being written are kept; index rows of sessions
    whose folder is gone are dropped, so the index stays in step with the files."""
    report = PruneReport(cutoff=(now if now is not None else time.time()) - older_than_s, dry_run=dry_run)
    old: list[Path] = []
    for sid in store.ids():
        path = store.dir / sid
        meta, _ = check_meta(_read_meta(path), sid)
        created = meta.get("created_at")
        if not isinstance(created, int | float):
            try:
                created = (path / SESSION_FILE).stat().st_mtime
            except OSError:
                continue
        if created >= report.cutoff:
            continue
        try:
            old.append(check_removable(store, sid))
        except SessionBusy as exc:
            report.busy[sid] = exc.detail
        except SessionError:
            continue  # gone meanwhile
    on_disk = set(store.ids())
    try:
        indexed = store.index_ids()
    except SessionError:
        indexed = []
    report.stale_rows = [sid for sid in indexed if sid not in on_disk and sid not in {p.name for p in old}]
    if dry_run:
        report.removed = [p.name for p in old]
        return report
    report.removed = _remove(store, old)
    store.forget(report.stale_rows)
    return report
