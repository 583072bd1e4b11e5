"""`chorus ui`: start the Streamlit app, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
            "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def cmd_ui(args: argparse.Namespace) -> int:
    config_dir = Path(args.config_dir or default_config_dir()).expanduser().resolve()
    env = {**os.environ, "CHORUS_CONFIG_DIR": str(config_dir)}
    print(f"chorus UI on http://{args.host}:{args.port} (config: {config_dir}); Ctrl-C stops it.", file=sys.stderr)
    try:
        return subprocess.call(streamlit_command(args.host, args.port), env=env)
    except KeyboardInterrupt:
        return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ui", parents=[common], help="start the Streamlit UI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_ui)
