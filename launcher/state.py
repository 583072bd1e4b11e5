"""Records of running servers on disk, so `chorus ps` and `chorus stop` in another terminal find them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psutil

from launcher.fileio import write_text_atomic


@dataclass
class ServerRecord:
    pid: int
    port: int
    model: str
    model_path: str
    n_ctx: int
    n_gpu_layers: int
    slots: int
    owner_pid: int
    started_at: float
    log_path: str | None = None

    def rss_bytes(self) -> int | None:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None


def record_path(state_dir: Path, pid: int) -> Path:
    return Path(state_dir) / f"server-{pid}.json"


def write_record(state_dir: Path, record: ServerRecord) -> None:
    """Owner-only: the folder 0700, the record 0600 (written whole through a mkstemp file, which is 0600)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_text_atomic(record_path(state_dir, record.pid), json.dumps(asdict(record)))


def remove_record(state_dir: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        record_path(state_dir, pid).unlink()


def _is_llama_server(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "llama-server" in " ".join(proc.cmdline()[:1])
    except psutil.Error:
        return False


def list_running(state_dir: Path) -> list[ServerRecord]:
    """Live servers; records of dead ones (a crash, a kill -9 of chorus) are cleaned up on the way."""
    out: list[ServerRecord] = []
    if not Path(state_dir).is_dir():
        return out
    for path in sorted(Path(state_dir).glob("server-*.json")):
        try:
            record = ServerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if _is_llama_server(record.pid):
            out.append(record)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return out


StopResult = Literal["stopped", "killed", "gone", "not ours"]
_START_SLACK_S = 5.0  # a process created later than its record (plus this) is another one on a reused pid


def _same_server(record: ServerRecord) -> psutil.Process | None:
    """The recorded server's process if it is still that llama-server, run by this user; else None."""
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "llama-server" not in " ".join(proc.cmdline()[:1]):
            return None
        if proc.create_time() > record.started_at + _START_SLACK_S:
            return None
        return proc
    except psutil.Error:
        return None


def _signal(record: ServerRecord, group: bool, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(record.pid, sig)
        else:
            os.kill(record.pid, sig)


def _group_alive(pid: int, group: bool) -> bool:
    try:
        if group:
            os.killpg(pid, 0)
        else:
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not group:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return False
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return bool(members)


def stop_recorded(state_dir: Path, record: ServerRecord, grace_s: float = 5.0) -> StopResult:
    """Stop a server another chorus process started (`chorus stop`): SIGTERM to its process group, SIGKILL
    to what is left after `grace_s`; its record is removed.

    Only the process the record names is touched, and only while it is still that llama-server of this user
    (a pid reused since is left alone). The group is signalled only when the server leads it, as chorus
    starts it, so a stray record can never signal the group of the shell or of chorus itself.
    """
    proc = _same_server(record)
    if proc is None:
        remove_record(state_dir, record.pid)
        return "gone"
    with contextlib.suppress(psutil.Error):
        if proc.uids().real != os.getuid():
            return "not ours"
    try:
        group = os.getpgid(record.pid) == record.pid
    except ProcessLookupError:
        remove_record(state_dir, record.pid)
        return "gone"
    _signal(record, group, signal.SIGTERM)
    _signal(record, group, signal.SIGCONT)  # a stopped (SIGSTOP) server holds SIGTERM until continued
    deadline = time.monotonic() + grace_s
    while _group_alive(record.pid, group) and time.monotonic() < deadline:
        time.sleep(0.05)
    result: StopResult = "stopped"
    if _group_alive(record.pid, group):
        _signal(record, group, signal.SIGKILL)
        result = "killed"
        deadline = time.monotonic() + 5
        while _group_alive(record.pid, group) and time.monotonic() < deadline:
            time.sleep(0.02)
    remove_record(state_dir, record.pid)
    return result
