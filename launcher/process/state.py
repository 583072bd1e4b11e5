"""Records of running servers on disk, so `chorus ps` and `chorus stop` in another terminal find them, and the
next start stops the servers a killed chorus left behind.

A record names the process that listens on the server's port, which behind a `llama_server:` wrapper script
that does not `exec` is the wrapper's child, not the process chorus started; plus the process group chorus made
for it (the wrapper's children stay in it) and the start times that tell these processes, and the chorus that
owns them, from later processes that reuse their pids. PR_SET_PDEATHSIG reaches only the wrapper when chorus is
killed with SIGKILL: its child lives on with parent 1, and `sweep_orphans` (run before every start) stops it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psutil

from launcher.fileio import write_text_atomic

_START_SLACK_S = 5.0     # a process created later than its record (plus this) is another one on a reused pid
_SAME_START_S = 1.0      # psutil start times of one process agree to the clock tick


@dataclass
class ServerRecord:
    pid: int                 # the process listening on `port`: the real llama-server, also behind a wrapper
    port: int
    model: str
    model_path: str
    n_ctx: int
    n_gpu_layers: int
    slots: int
    owner_pid: int
    started_at: float
    log_path: str | None = None
    pgid: int | None = None                 # the group chorus made for it; None in records of older versions
    create_time: float | None = None        # psutil's start time of `pid`
    owner_create_time: float | None = None  # and of `owner_pid`

    def rss_bytes(self) -> int | None:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def owner_alive(self) -> bool:
        """Whether the chorus process that started the server still runs (not another one on its pid)."""
        return _alive_as(self.owner_pid, self.owner_create_time)


def record_path(state_dir: Path, pid: int) -> Path:
    return Path(state_dir) / f"server-{pid}.json"


def write_record(state_dir: Path, record: ServerRecord) -> None:
    """Owner-only: the folder 0700, the record 0600 (written whole through a mkstemp file, which is 0600)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_text_atomic(record_path(state_dir, record.pid), json.dumps(asdict(record)))


def remove_record(state_dir: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        record_path(state_dir, pid).unlink()


# ---------------------------------------------------------------- processes

def start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


@functools.cache
def own_start_time() -> float | None:
    return start_time(os.getpid())


def _alive_as(pid: int, created: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return created is None or abs(proc.create_time() - created) < _SAME_START_S
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`: a wrapper's children stay in it."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


def _listens(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def listener(port: int, near: Iterable[int] = ()) -> int | None:
    """The pid that listens on TCP `port`: looked for among `near` first (the server's group), then among every
    process this user may inspect (a wrapper's child that left the group). None if none is found."""
    for pid in near:
        if _listens(pid, port):
            return pid
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="inet"):
            if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                return int(c.pid)
    return None


def _is_llama_server(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "llama-server" in " ".join(proc.cmdline()[:1])
    except psutil.Error:
        return False


SERVER_NAMES = frozenset({"llama-server", "rpc-server"})


def _runs_server(proc: psutil.Process, record: ServerRecord) -> bool:
    """Whether `proc` is a server such as the record names: its executable or argv[0] is llama-server (or
    rpc-server), or its command line loads the recorded model file (a server behind a wrapper script). A
    process that is neither is not ours, whatever group or start time it has (a pid and group reused since)."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
        with contextlib.suppress(psutil.Error, OSError):
            if Path(proc.exe()).name in SERVER_NAMES:
                return True
    except psutil.Error:
        return False
    if cmdline and Path(cmdline[0]).name in SERVER_NAMES:
        return True
    return bool(record.model_path) and record.model_path in cmdline[1:]


def process_of(record: ServerRecord) -> psutil.Process | None:
    """The live server `record` names, or None. Its pid counts while it is the recorded process (same start
    time; records of older versions: a llama-server started before the record). Else, when that process is
    gone (a wrapper killed before its server was ready), a member of the recorded group started since that is
    a server (`_runs_server`): the one listening on the port, or the oldest. A group whose members are not
    servers is another program's on a reused pgid: None, the record is stale."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(record.pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            if record.create_time is not None and abs(proc.create_time() - record.create_time) < _SAME_START_S:
                return proc
            if (record.create_time is None and _is_llama_server(record.pid)
                    and proc.create_time() <= record.started_at + _START_SLACK_S):
                return proc
    if record.pgid is None:
        return None
    members: list[psutil.Process] = []
    for pid in group_members(record.pgid):
        with contextlib.suppress(psutil.Error):
            member = psutil.Process(pid)
            if member.create_time() >= record.started_at - _START_SLACK_S and _runs_server(member, record):
                members.append(member)
    listening = [m for m in members if _listens(m.pid, record.port)]
    if listening:
        return listening[0]
    return min(members, key=lambda m: m.create_time(), default=None)


def list_running(state_dir: Path) -> list[ServerRecord]:
    """Live servers; records of dead ones (a crash, a kill -9 of chorus) are cleaned up on the way, and a record
    whose process has gone while its group's server lives on is rewritten to name that server."""
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
        proc = process_of(record)
        if proc is None:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if proc.pid != record.pid:
            record.pid, record.create_time = proc.pid, start_time(proc.pid)
            with contextlib.suppress(OSError):
                write_record(Path(state_dir), record)
                path.unlink()
        out.append(record)
    return out


StopResult = Literal["stopped", "killed", "gone", "not ours"]


def _signal(target: int, group: bool, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(target, sig)
        else:
            os.kill(target, sig)


def _group_alive(target: int, group: bool) -> bool:
    if group:
        return bool(group_members(target))
    return _alive_as(target, None)


def stop_recorded(state_dir: Path, record: ServerRecord, grace_s: float = 5.0) -> StopResult:
    """Stop a server another chorus process started (`chorus stop`, the orphan sweep): SIGTERM to its process
    group, SIGKILL to what is left after `grace_s`; its record is removed.

    Only the process the record names is touched, and only while it is still that server of this user (a pid
    reused since is left alone). Its group is signalled only when it is still in the group recorded for it
    (records of older versions: when it leads its group, as chorus starts it) and that is not our own group,
    so a stray record can never signal the group of the shell or of chorus itself.
    """
    proc = process_of(record)
    if proc is None:
        remove_record(state_dir, record.pid)
        return "gone"
    with contextlib.suppress(psutil.Error):
        if proc.uids().real != os.getuid():
            return "not ours"
    pgid = record.pgid if record.pgid is not None else proc.pid
    try:
        group = os.getpgid(proc.pid) == pgid and pgid != os.getpgrp()
    except ProcessLookupError:
        remove_record(state_dir, record.pid)
        return "gone"
    target = pgid if group else proc.pid
    _signal(target, group, signal.SIGTERM)
    _signal(target, group, signal.SIGCONT)  # a stopped (SIGSTOP) server holds SIGTERM until continued
    deadline = time.monotonic() + grace_s
    while _group_alive(target, group) and time.monotonic() < deadline:
        time.sleep(0.05)
    result: StopResult = "stopped"
    if _group_alive(target, group):
        _signal(target, group, signal.SIGKILL)
        result = "killed"
        deadline = time.monotonic() + 5
        while _group_alive(target, group) and time.monotonic() < deadline:
            time.sleep(0.02)
    remove_record(state_dir, record.pid)
    remove_record(state_dir, proc.pid)
    return result


def sweep_orphans(state_dir: Path, grace_s: float = 5.0) -> list[tuple[ServerRecord, StopResult]]:
    """Stop every recorded server whose chorus is gone (killed with SIGKILL: no cleanup of ours ran, and a
    wrapper's child outlives PR_SET_PDEATHSIG). Returns what was stopped, and how."""
    return [(record, stop_recorded(state_dir, record, grace_s))
            for record in list_running(state_dir) if not record.owner_alive()]
