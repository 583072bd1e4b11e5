"""The recorder: an observer of a run's events that writes its session folder as the run goes.

On the engine's event loop it only takes a copy of what changed (records -> JSON-ready data) and queues
it; one writer thread per recorder writes the files in order, each atomically (temp file + rename), then
updates the SQLite index from that same in-memory data (never by re-reading the files). So the loop
never waits for a disk, and a crash leaves the files of every stage that finished, whole.

Writes are in order and stop at the first failure: a session never has step 3 without step 2. After a
failure only session.json is still attempted, with the stages that were written and a 'history_error',
so the session lists as damaged rather than silently short. `close()` returns that first failure.

While it writes, the recorder holds an flock on the session's `.lock` file, and session.json carries its
pid, process start time and host: a session left 'running' by a process that died (SIGKILL, a second
Ctrl-C, a crash) or by a recorder that could not write its end (a full disk) is marked 'interrupted' the
next time history is read (SessionStore.load / list).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from launcher.fileio import write_text_atomic
from orchestrator.engine.events import Event, RunFinished, RunStarted, StageFinished
from orchestrator.history.index import HistoryIndex
from orchestrator.history.serialize import (
    AGGREGATION_FILE,
    FINAL_FILE,
    SESSION_FILE,
    SNAPSHOT_FILE,
    Session,
    SessionError,
    aggregation_list,
    dumps,
    first_meta,
    plain_text,
    session_meta,
    stage_files,
)
from orchestrator.records import StageRecord, stage_from_dict, to_dict

log = logging.getLogger("chorus.history")

CLOSE_TIMEOUT_S = 120.0  # a disk that hangs longer than this is reported, not waited for
LOCK_FILE = ".lock"  # held (flock) by the recorder while it writes; the kernel releases it if the process dies


def writer_identity() -> dict[str, Any]:
    """Who writes a session: enough to tell later whether that process is still alive."""
    pid = os.getpid()
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None
    return {"pid": pid, "started": started, "host": socket.gethostname()}


def writer_alive(writer: Any, session_dir: Path | None = None) -> bool | None:
    """Whether a recorder still writes a session: None when it cannot be told (no record of the writer, an
    older session, or another host sharing the sessions dir).

    The session's lock file says it best (held while a recorder writes, released when it closes or its
    process dies, whatever the pid); without one, the writer's pid and process start time (a reused pid
    is another process)."""
    if not isinstance(writer, dict) or not isinstance(writer.get("pid"), int):
        return None
    if writer.get("host") != socket.gethostname():
        return None
    held = _lock_held(session_dir / LOCK_FILE) if session_dir is not None else None
    if held is not None:
        return held
    try:
        proc = psutil.Process(writer["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = writer.get("started")
        return not (isinstance(started, int | float) and abs(proc.create_time() - started) > 1.0)  # pid reused
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # access denied: it exists
        return True


def _lock_held(path: Path) -> bool | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # releases our shared lock, if we got it
    return False


def _take_lock(path: Path) -> int | None:
    """An exclusive lock on the session's lock file, or None where locks are not available."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@dataclass
class _Batch:
    """What one event changed, in writing order: data files, then session.json."""

    files: list[tuple[str, Any]] = field(default_factory=list)  # (name, JSON data or text for final.txt)
    stage: dict[str, Any] | None = None  # the stage these files hold, for the index
    final: str | None = None
    meta: dict[str, Any] | None = None
    failure: SessionError | None = None  # the loop could not take a copy of the event's data
    interrupted: bool = False  # closed without RunFinished: session.json says so
    last: bool = False


class Recorder:
    """Observer (`recorder(event)`) that mirrors one run into `dir` (session `id`).

    API for the caller that starts the run:
    - pass it among the engine's observers; it handles RunStarted, StageFinished and RunFinished;
    - `flush(timeout)` waits until everything queued so far is written; returns the first write error;
    - `close(timeout)` waits for the remaining writes and stops the writer thread; returns the first write
      error (a SessionError with the path, the OS's reason and a hint) or None. If no RunFinished came
      (the run was aborted), the session is marked 'interrupted' with what was finished. Call it once the
      run is over, off the event loop (it blocks); calling it again returns the same result.
    The session folder, config_snapshot.json and a first session.json exist when the Recorder is made
    (SessionStore.create), so a session is never an empty or invisible folder.
    """

    def __init__(self, session_dir: Path, snapshot: dict[str, Any], index: HistoryIndex) -> None:
        self.dir = session_dir
        self.id = session_dir.name
        self.index = index
        self.created_at = time.time()
        self.writer = writer_identity()
        self._meta = first_meta(self.id, snapshot, created_at=self.created_at, writer=self.writer)  # as on disk
        self._last_meta = self._meta  # as the run last told (the writer thread's)
        self._lock_guard = threading.Lock()
        self._lock_fd = _take_lock(self.dir / LOCK_FILE)
        try:
            self._write(SNAPSHOT_FILE, snapshot)  # raises SessionError: the store removes the folder
            self._write(SESSION_FILE, self._meta)
        except SessionError:
            self._release()
            raise
        self._queue: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._ended = False  # RunFinished or close() queued the last batch
        self._error: SessionError | None = None
        self._stages: list[StageRecord] = []  # written, for the index
        self._final: str | None = None
        self._aggregations: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._work, name=f"chorus-recorder-{self.id}", daemon=True)
        self._thread.start()
        self._put(_Batch())  # index the session as running

    # ------------------------------------------------------------ on the event loop: copy and queue

    def __call__(self, event: Event) -> None:
        if not isinstance(event, RunStarted | StageFinished | RunFinished):
            return
        try:
            batch = self._batch(event)
        except Exception as exc:  # a record that cannot be copied: the writes stop here, in order
            batch = _Batch(failure=SessionError(self.dir, f"cannot record {type(event).__name__} "
                                                          f"({type(exc).__name__}: {exc})"))
        self._put(batch)

    def _batch(self, event: RunStarted | StageFinished | RunFinished) -> _Batch:
        meta = session_meta(self.id, event.run, created_at=self.created_at, writer=self.writer)
        if isinstance(event, RunStarted):
            return _Batch(meta=meta)
        if isinstance(event, StageFinished):
            stage = to_dict(event.record)
            return _Batch(files=[*stage_files(stage), (AGGREGATION_FILE, aggregation_list(event.run.stages))],
                          stage=stage, meta=meta)
        final = event.run.final if event.run.status in ("completed", "partial") else None
        return _Batch(files=[(FINAL_FILE, final)] if final is not None else [], final=final, meta=meta, last=True)

    def _put(self, batch: _Batch) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = batch.last
            self._pending += 1
        self._queue.put(batch)

    # ------------------------------------------------------------ the caller, after the run

    def flush(self, timeout: float | None = CLOSE_TIMEOUT_S) -> SessionError | None:
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout):
                return self._error or SessionError(self.dir, f"history writes did not finish within {timeout:.0f}s",
                                                   hint="Is the disk of the sessions dir hanging?")
        return self._error

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> SessionError | None:
        with self._lock:
            ended = self._ended
        if not ended:  # no RunFinished: the run was aborted
            self._put(_Batch(interrupted=True, last=True))
        error = self.flush(timeout)
        with self._lock:
            drained = self._pending == 0
        if drained:
            self._thread.join(timeout)
            # from now on readers know nobody writes this session; if its end could not be written (a full
            # disk), the released lock file stays, so it is seen as interrupted, whoever holds this pid
            self._release(remove=self._meta.get("status") != "running")
        return error

    def _release(self, *, remove: bool = True) -> None:
        with self._lock_guard:
            fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    (self.dir / LOCK_FILE).unlink()
            os.close(fd)

    @property
    def error(self) -> SessionError | None:
        return self._error

    # ------------------------------------------------------------ the writer thread

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                self._write_batch(batch)
                if self._queue.empty() or batch.last:
                    self._update_index()
            except Exception:  # never lose the thread: the caller waits on it
                log.exception("history writer for %s", self.id)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
            if batch.last:
                return

    def _write_batch(self, batch: _Batch) -> None:
        if batch.failure is not None and self._error is None:
            self._error = batch.failure
        if self._error is None:
            for name, data in batch.files:
                if not self._try_write(name, data):
                    break
            else:
                if batch.stage is not None:
                    self._stages.append(stage_from_dict(batch.stage, where=self.id))
                    self._aggregations = next((d for n, d in batch.files if n == AGGREGATION_FILE), [])
                if batch.final is not None:
                    self._final = batch.final
        if batch.interrupted:
            batch.meta = {**self._last_meta, "status": "interrupted", "finished_at": time.time(),
                          "error": self._last_meta.get("error") or {
                              "type": "Interrupted", "message": "the run stopped before it finished"}}
        if batch.meta is not None:
            self._last_meta = batch.meta
            meta = {**batch.meta, "stages": [s.name for s in self._stages]}  # only what is on disk
            if self._error is not None:
                meta["history_error"] = self._error.detail
            if self._try_write(SESSION_FILE, meta):
                self._meta = meta  # the index shows what the files say

    def _try_write(self, name: str, data: Any) -> bool:
        try:
            self._write(name, data)
            return True
        except SessionError as exc:
            if self._error is None:
                self._error = exc
            log.info("%s", exc)  # close() returns the first one: the caller reports it once
            return False

    def _write(self, name: str, data: Any) -> None:
        path = self.dir / name
        try:
            write_text_atomic(path, plain_text(data) if isinstance(data, str) else dumps(data))
        except Exception as exc:
            reason = f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SessionError(path, f"cannot write {name}: {type(exc).__name__}: {reason}",
                               hint="Free disk space or fix the permissions of the sessions dir; the run's "
                                    "answer is kept and the session is listed as incomplete.") from None

    def _update_index(self) -> None:
        problems = [f"history incomplete: {self._error.detail}"] if self._error else []
        session = Session(self.id, self.dir, dict(self._meta), {}, list(self._stages), self._final,
                          list(self._aggregations), problems)
        try:
            self.index.upsert(session)
        except Exception as exc:  # the JSON files are the truth; `chorus history reindex` rebuilds this
            log.warning("history index not updated for %s: %s", self.id, exc)
