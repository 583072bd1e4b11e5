"""Find the llama-server binary: config path, then $LLAMA_SERVER, then bin/llama-server, then PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from launcher.errors import BinaryNotFound

REPO_BIN = Path(__file__).resolve().parent.parent / "bin" / "llama-server"


def find_llama_server(configured: Path | None = None) -> Path:
    searched: list[str] = []
    candidates: list[Path] = []
    if configured is not None:
        candidates.append(Path(configured))
    if os.environ.get("LLAMA_SERVER"):
        candidates.append(Path(os.environ["LLAMA_SERVER"]).expanduser())
    candidates.append(REPO_BIN)
    for path in candidates:
        searched.append(str(path))
        if path.is_file():
            if not os.access(path, os.X_OK):
                raise BinaryNotFound(searched, problem=f"at {path} is not executable")
            return path
        if configured is not None and path == Path(configured):
            raise BinaryNotFound(searched, problem=f"configured in app.yaml as {path} does not exist")
    on_path = shutil.which("llama-server")
    searched.append("PATH")
    if on_path:
        return Path(on_path)
    raise BinaryNotFound(searched)


def binary_version(binary: Path) -> str:
    """The first line of `llama-server --version` ('version: 0 (chorus-lcp0.3.36-cpu)'), or 'unknown'."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"
