"""`chorus ui`: start the Streamlit app, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.server import own_group_dying_with_parent
from orchestrator.config.schema import default_config_dir


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


def cmd_ui(args: argparse.Namespace) -> int:
    config_dir = Path(args.config_dir or default_config_dir()).expanduser().resolve()
    env = {**os.environ, "CHORUS_CONFIG_DIR": str(config_dir)}
    print(f"chorus UI on http://{args.host}:{args.port} (config: {config_dir}); Ctrl-C stops it.", file=sys.stderr)
    # Streamlit gets its own process group (only we signal it, once) and dies with us even on kill -9.
    child = subprocess.Popen(streamlit_command(args.host, args.port), env=env,
                             preexec_fn=lambda: own_group_dying_with_parent(signal.SIGTERM))
    return supervise(child)


def supervise(child: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int:
    """Wait for `child`; SIGTERM, SIGINT or SIGHUP to us is passed on to its group, and the group is
    SIGKILLed if it has not exited `grace_s` later. Streamlit's own exit stops its llama-servers (their
    atexit and PR_SET_PDEATHSIG cleanup). Returns the child's status, 0 after a Ctrl-C, 128+N after signal N.
    """
    received: list[int] = []
    kill_at: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if not kill_at:
            kill_at.append(time.monotonic() + grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if kill_at and time.monotonic() > kill_at[0]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)
                code = child.wait()
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # an exception on the way out: never leave Streamlit behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if not received:
        return code
    return 0 if received[0] == signal.SIGINT else 128 + received[0]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ui", parents=[common], help="start the Streamlit UI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_ui)
