"""`chorus ui`: start the Streamlit app, on 127.0.0.1 unless told otherwise.

Streamlit has no login, and whoever opens the UI can run every model, so the same policy as `chorus api`:
beyond loopback the UI needs `--allow-remote` and a token (from `--token-file`, `$CHORUS_UI_TOKEN` or a prompt,
never argv), which ui/auth.py asks each browser session for; and it says so loudly. Streamlit dies with us,
even on kill -9 (PR_SET_PDEATHSIG with SIGKILL: a supervisor's timeout must not leave it listening).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cli.secret_input import SecretOnCommandLine, read_secret
from orchestrator.config.hosts import is_loopback
from orchestrator.errors import ChorusError

TOKEN_ENV = "CHORUS_UI_TOKEN"  # what ui/auth.py reads
MIN_TOKEN_CHARS = 12


class RemoteUiRefused(ChorusError):
    """The UI would listen beyond this machine without --allow-remote or without a token."""

    def __init__(self, host: str, missing: str) -> None:
        super().__init__(f"the UI would listen on {host} without {missing}: anyone who reaches the port could run "
                         "your models, and Streamlit has no login of its own",
                         hint="Pass --allow-remote and a token: --token-file FILE (umask 077; openssl rand -hex 24 "
                              f"> FILE) or ${TOKEN_ENV}; on a terminal chorus asks for one. Or listen on 127.0.0.1 "
                              "(the default).")
        self.host = host
        self.field = "--allow-remote" if missing.startswith("--") else "--token-file"


class TokenTooShort(ChorusError):
    def __init__(self, source: str, length: int) -> None:
        super().__init__(f"the UI token from {source} has {length} characters; at least {MIN_TOKEN_CHARS} are "
                         "needed: anyone who reaches the port can try tokens",
                         hint="Use a random one: openssl rand -hex 24.")
        self.field = source
        self.length = length


REMOTE_WARNING = (
    "WARNING: the chorus UI listens on {host}, beyond this machine. Everyone who can reach port {port} and has the "
    "token can run your models, start and stop servers and read the history. The connection is plain HTTP: the "
    "token and every page travel unencrypted. Use it on a trusted network, or behind a TLS proxy.")


def app_path() -> Path:
    """The Streamlit entry file, wherever the `ui` package is installed (found, not imported)."""
    spec = importlib.util.find_spec("ui")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the chorus 'ui' package is not installed")
    return Path(spec.origin).parent / "app.py"


def streamlit_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app_path()), "--server.address", host,
            "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal"]  # no "Deploy" button or developer menu: this is an app


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0


def ui_token(args: argparse.Namespace) -> str | None:
    """The sign-in token: required (--allow-remote too) beyond loopback, optional on it; never from argv."""
    if args.token is not None:
        raise SecretOnCommandLine("--token", "--token-file", TOKEN_ENV)
    remote = not is_loopback(args.host)
    if remote and not args.allow_remote:
        raise RemoteUiRefused(args.host, "--allow-remote")
    secret = read_secret(file=args.token_file, file_flag="--token-file", env=TOKEN_ENV,
                         prompt=f"token for the chorus UI on {args.host}: " if remote else None)
    if secret is None:
        if remote:
            raise RemoteUiRefused(args.host, "a token")
        return None
    if len(secret.value) < MIN_TOKEN_CHARS:
        raise TokenTooShort(secret.source, len(secret.value))
    return secret.value


def cmd_ui(args: argparse.Namespace) -> int:
    # here, not at the top: `chorus --help` reads TOKEN_ENV (cli/commands.py) and loads no pydantic. No
    # orchestrator.app either: Streamlit's child imports the engine itself
    from orchestrator.children import own_group_dying_with_parent
    from orchestrator.config.schema import default_config_dir

    token = ui_token(args)
    config_dir = Path(args.config_dir or default_config_dir()).expanduser().resolve()
    env = {**os.environ, "CHORUS_CONFIG_DIR": str(config_dir)}
    env.pop(TOKEN_ENV, None)
    if token is not None:
        env[TOKEN_ENV] = token  # the environment: only this user (and root) can read it, unlike argv
    if not is_loopback(args.host):
        bar = "!" * 100
        print(f"{bar}\n{REMOTE_WARNING.format(host=args.host, port=args.port)}\n{bar}", file=sys.stderr, flush=True)
    signed = ", sign-in token required" if token else ""
    print(f"chorus UI on http://{args.host}:{args.port} (config: {config_dir}{signed}); Ctrl-C stops it.",
          file=sys.stderr, flush=True)
    # Streamlit gets its own process group (only we signal it, once) and dies with us even on kill -9: SIGKILL,
    # as its SIGTERM shutdown can take seconds; its llama-servers die with it (their own PR_SET_PDEATHSIG).
    parent = os.getpid()
    child = subprocess.Popen(streamlit_command(args.host, args.port), env=env,
                             preexec_fn=lambda: own_group_dying_with_parent(signal.SIGKILL, parent))
    return supervise(child)


def supervise(child: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int:
    """Wait for `child`; SIGTERM, SIGINT or SIGHUP to us is passed on to its group, and the group is
    SIGKILLed if it has not exited `grace_s` later. Streamlit's own exit stops its llama-servers (their
    atexit and PR_SET_PDEATHSIG cleanup). Returns the child's status, 0 after a Ctrl-C, 128+N after signal N.

    The wait blocks (a signal interrupts it, its handler runs, the wait goes on): a polling wait woke this
    process about 50 times a second, each wake taking a core from the busy llama-servers beside it.
    """
    received: list[int] = []
    killer: list[threading.Timer] = []

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if not killer:
            timer = threading.Timer(grace_s, kill_group)
            timer.daemon = True
            timer.start()
            killer.append(timer)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for timer in killer:
            timer.cancel()
        if child.poll() is None:  # an exception on the way out: never leave Streamlit behind
            kill_group()
            child.wait()
    if not received:
        return code
    return 0 if received[0] == signal.SIGINT else 128 + received[0]
