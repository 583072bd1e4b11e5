"""The admission ledger: what every chorus process of this user has admitted, per device, on disk.

RAM and VRAM are shared with every process on the machine, and the probe sees what the others use.
A budget (app.yaml's ``server.memory_budget_mib``) is a cap that only chorus knows about, so the
processes tell each other through this ledger: one JSON file of entries (owner pid, spec, bytes per
device, state), changed only under an exclusive ``fcntl`` lock on a lock file beside it. An admission
reads the entries, decides and records itself in one locked transaction, so two processes can never
both take the last free megabytes.

Entries die with their process: an entry whose owner (pid and start time, so a reused pid does not
count) or server is gone, or a start admitted but never seen running after a while, is dropped the
next time anyone reads the ledger. Without a path the ledger lives in memory (one process only).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from launcher.fileio import atomic_writer

log = logging.getLogger("chorus.ledger")

LEDGER_ENV = "CHORUS_ADMISSION_LEDGER"
FORMAT_VERSION = 1
PENDING_TTL_S = 180.0  # an admitted start not seen running is counted for at most this long
SETTLE_S = 10.0        # a start that is over but whose server was not reported yet (or failed)


def default_ledger_path() -> Path:
    """$CHORUS_ADMISSION_LEDGER, else $XDG_RUNTIME_DIR/chorus/admission.json, else ~/.cache/chorus/."""
    env = os.environ.get(LEDGER_ENV)
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "chorus" / "admission.json"
    return Path("~/.cache/chorus/admission.json").expanduser()


@dataclass
class LedgerEntry:
    """One admitted server: 'pending' (admitted, loading), 'settling' (start over, not seen yet), 'running'."""

    owner_pid: int
    owner_started: float       # the owner's start time: a reused pid is another process
    key: str                   # the server spec's pool key, as text
    model: str
    need: dict[str, int]       # bytes per device: 'ram', 'gpu0', 'budget'...
    state: str = "pending"
    since: float = field(default_factory=time.time)
    server_pid: int | None = None


def _started(pid: int) -> float | None:
    """A live process's start time; None when it is gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.Error, ValueError, TypeError, OverflowError):  # gone, or a damaged entry's pid
        return None


def this_process() -> tuple[int, float]:
    pid = os.getpid()
    return pid, _started(pid) or 0.0


class AdmissionLedger:
    """The shared record of admissions; `transaction()` is the only way in, and it nests in one thread."""

    def __init__(self, path: Path | str | None = None, *, pending_ttl_s: float = PENDING_TTL_S,
                 settle_s: float = SETTLE_S) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self.pending_ttl_s = pending_ttl_s
        self.settle_s = settle_s
        self._rlock = threading.RLock()
        self._depth = 0
        self._entries: list[LedgerEntry] = []   # the whole ledger while a transaction is open; ours otherwise
        self._lock_fd: int | None = None
        self._before: str | None = None

    @property
    def shared(self) -> bool:
        return self.path is not None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[list[LedgerEntry]]:
        """The live entries of every process, under the lock; changes to the list are written back."""
        with self._rlock:
            if self._depth == 0:
                self._open()
            self._depth += 1
            try:
                yield self._entries
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._close()

    def entries(self) -> list[LedgerEntry]:
        """A copy of the live entries (every process)."""
        with self.transaction() as entries:
            return [LedgerEntry(**asdict(e)) for e in entries]

    def held(self, device: str, *, others_only: bool = True) -> int:
        """Bytes of `device` the live entries hold (of other processes only, by default)."""
        me = os.getpid()
        with self.transaction() as entries:
            return sum(e.need.get(device, 0) for e in entries if not (others_only and e.owner_pid == me))

    def replace_own(self, entries: list[LedgerEntry], own: list[LedgerEntry]) -> None:
        """Inside a transaction: this process's entries become `own`."""
        me = os.getpid()
        entries[:] = [e for e in entries if e.owner_pid != me] + own

    # ---------------------------------------------------------------- the file

    def _open(self) -> None:
        if self.path is None:
            self._entries[:] = self._live(self._entries)
            self._before = None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        raw = self._read()
        self._entries = self._live(raw)
        self._before = json.dumps([asdict(e) for e in raw], sort_keys=True)

    def _close(self) -> None:
        if self.path is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            text = json.dumps([asdict(e) for e in self._entries], sort_keys=True)
            if text != self._before:
                self._write()
        except OSError as exc:  # the ledger must never stop a run; admission falls back to this process
            log.warning("could not write the admission ledger %s: %s", self.path, exc)
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            self._entries = []

    def _read(self) -> list[LedgerEntry]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable admission ledger %s: %s", self.path, exc)
            return []
        out = []
        raws = data.get("entries") if isinstance(data, dict) and data.get("version") == FORMAT_VERSION else None
        for raw in raws if isinstance(raws, list) else []:
            try:
                entry = LedgerEntry(**raw)
            except TypeError:
                continue
            if (isinstance(entry.owner_pid, int) and isinstance(entry.owner_started, int | float)
                    and isinstance(entry.since, int | float) and isinstance(entry.need, dict)
                    and all(isinstance(n, int) for n in entry.need.values())):
                out.append(entry)
        return out

    def _write(self) -> None:
        assert self.path is not None
        with atomic_writer(self.path) as f:
            json.dump({"version": FORMAT_VERSION, "entries": [asdict(e) for e in self._entries]}, f, indent=1)

    def _live(self, entries: list[LedgerEntry]) -> list[LedgerEntry]:
        """Entries whose owner and server still run, and starts not older than their time-outs."""
        now = time.time()
        owners: dict[int, float | None] = {}
        out = []
        for e in entries:
            if e.owner_pid not in owners:
                owners[e.owner_pid] = _started(e.owner_pid)
            started = owners[e.owner_pid]
            if started is None or abs(started - e.owner_started) > 1.0:
                continue
            if e.server_pid is not None and _started(e.server_pid) is None:
                continue
            ttl = {"pending": self.pending_ttl_s, "settling": self.settle_s}.get(e.state)
            if ttl is not None and now - e.since > ttl:
                continue
            out.append(e)
        return out
