"""The application log: one rotating file, `<logs_dir>/chorus.log`, owner-only, set up once per process.

stderr shows warnings (and with -v chorus's debug lines); the file keeps chorus's INFO lines of every
command too, so what happened in a run last week can still be read after the terminal is gone. The file
rotates at `max_bytes` and keeps `backups` old ones (chorus.log.1 ...), so it never grows without bound.
It is created 0600 in a 0700 folder: it may name questions, models and paths.

Two chorus processes (the UI and a CLI run) may append to the same file; a rotation by one while the other
writes can put a few lines into the rotated file. The llama-server logs beside it are pruned by
launcher/process/server.py (`prune_server_logs`).
"""

from __future__ import annotations

import io
import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path

from launcher.errors import ChorusError
from orchestrator.config.locations import find_config_dir
from orchestrator.config.schema import load_app_config

APP_LOG_NAME = "chorus.log"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
PRIVATE_FILE_MODE = 0o600

log = logging.getLogger("chorus")


class PrivateRotatingFileHandler(RotatingFileHandler):
    """A RotatingFileHandler whose files are created 0600 (not per the umask), an existing one set to 0600."""

    chorus_app_log = True

    def _open(self) -> io.TextIOWrapper:  # the base class's hook for (re)opening the file
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:
        """A full or read-only disk costs the file log, never a traceback on stderr: stop writing to it."""
        self.close()
        logging.getLogger().removeHandler(self)


def setup_app_log(logs_dir: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                  level: int = logging.INFO) -> Path | None:
    """Send chorus's log records at `level` and above to `<logs_dir>/chorus.log`; return its path.

    Called again in one process (tests, a second `main()`), the earlier file handler is replaced. A logs
    folder that cannot be created or written costs only the file log: a warning on stderr, no failure.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "chorus_app_log", False)]:
        root.removeHandler(old)
        old.close()
    path = Path(logs_dir) / APP_LOG_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    except OSError as exc:
        log.warning("no application log at %s: %s", path, exc.strerror or exc)
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(level)
    root.addHandler(handler)
    chorus = logging.getLogger("chorus")  # the root stays at WARNING: other libraries stay quiet
    if chorus.getEffectiveLevel() > level:
        chorus.setLevel(level)
    return path


def setup_app_log_for(config_dir: Path | str | None, command: str | None = None) -> Path | None:
    """The application log of the config folder the command will use; None when that config cannot be read.

    A broken app.yaml is the command's error to report (with file and line), not this function's.
    """
    try:
        logs_dir = load_app_config(find_config_dir(config_dir).path.resolve()).logs_dir
    except (ChorusError, OSError, ValueError):
        return None
    path = setup_app_log(logs_dir)
    if path is not None and command:
        log.info("chorus %s started", command)
    return path
