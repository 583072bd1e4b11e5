"""Records of running servers on disk, so `chorus ps` in another terminal can list them."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

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
