"""Secrets for `chorus api` and `chorus ui` (an API key, the UI's token): from a file, the environment or a
prompt, never from the command line, where every local user reads them with `ps -ef` for the process's life.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ChorusError


class SecretOnCommandLine(ChorusError):
    """A secret was given in argv: refused, since `ps` shows it to every user of the machine."""

    def __init__(self, flag: str, file_flag: str, env: str) -> None:
        super().__init__(f"{flag} on the command line is refused: every user of this machine can read it with "
                         "`ps -ef` for as long as chorus runs",
                         hint=f"Put it in a file only you can read (umask 077; printf %s \"$KEY\" > FILE) and pass "
                              f"{file_flag} FILE, or set ${env}; on a terminal chorus asks for it when needed.")
        self.field = flag


class SecretUnreadable(ChorusError):
    """A secret file that cannot be used: missing, unreadable, empty, more than one line."""

    def __init__(self, flag: str, path: str, reason: str) -> None:
        super().__init__(f"{flag} {path}: {reason}",
                         hint="The file holds the secret alone, on one line (a trailing newline is fine).")
        self.field = flag
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Secret:
    value: str
    source: str  # where it came from, for messages: "--api-key-file FILE", "$CHORUS_API_KEY", "the prompt"

    def __repr__(self) -> str:  # never in a traceback or a log line
        return f"Secret(source={self.source!r})"


def read_secret(*, file: str | None, file_flag: str, env: str, prompt: str | None) -> Secret | None:
    """The secret from `file` (named by `file_flag`), else from `$env`, else typed at `prompt` when stdin is a
    terminal and `prompt` is given; None when there is none."""
    if file is not None:
        return Secret(_read_file(Path(file).expanduser(), file_flag), f"{file_flag} {file}")
    from_env = os.environ.get(env)
    if from_env:
        return Secret(from_env, f"${env}")
    if prompt is not None and sys.stdin is not None and sys.stdin.isatty():
        typed = getpass.getpass(prompt)
        if typed.strip():
            return Secret(typed.strip(), "the prompt")
    return None


def _read_file(path: Path, flag: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SecretUnreadable(flag, str(path), reason) from None
    value = text.strip()
    if not value:
        raise SecretUnreadable(flag, str(path), "the file is empty")
    if "\n" in value:
        raise SecretUnreadable(flag, str(path), "the file has more than one line")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"chorus: warning: {path} can be read by other users (mode {stat.S_IMODE(mode):o}); "
              f"chmod 600 {path}", file=sys.stderr, flush=True)
    return value
