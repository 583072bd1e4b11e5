"""Find the llama-server binary, for a checkout and for a package installed with pip alike.

Order: app.yaml `llama_server`, $LLAMA_SERVER, $CHORUS_HOME/bin/llama-server, the checkout's bin/ (only when
this code runs from a chorus checkout), the build cache that scripts/build_llama_server.sh fills
(~/.cache/chorus/bin/chorus-lcp<pin>-<variant><revision>/llama-server), then PATH.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from launcher.errors import BUILD_COMMAND, BinaryNotFound
from launcher.paths import cache_dir, chorus_home

# The build of scripts/build_llama_server.sh: its llama.cpp pin (PIN_VERSION) and the revision suffix of its
# version_tag (bumped when the build flags change, so a cached build with old flags is never used).
# tests/test_install.py checks that they agree with the script.
PINNED_LLAMA_CPP = "0.3.36"
BUILD_REVISION = "-b2"
BINARY = "llama-server"


def checkout_bin() -> Path | None:
    """bin/llama-server of the chorus checkout this code runs from; None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root / "bin" / BINARY if (root / BUILD_COMMAND).is_file() else None


def cached_builds(cache: Path | None = None) -> list[Path]:
    """Where the build cache keeps the pinned build, the variant this machine can run first.

    A CUDA build only starts where there is a driver, so it comes first only when nvidia-smi is on PATH.
    """
    variants = ["cuda", "cpu"] if shutil.which("nvidia-smi") else ["cpu", "cuda"]
    root = (cache or cache_dir()) / "bin"
    return [root / f"chorus-lcp{PINNED_LLAMA_CPP}-{v}{BUILD_REVISION}" / BINARY for v in variants]


def _not_found(searched: list[str], problem: str = "not found") -> BinaryNotFound:
    return BinaryNotFound(searched, problem=problem)


def find_llama_server(configured: Path | None = None) -> Path:
    searched: list[str] = []
    candidates: list[Path] = []
    if configured is not None:
        candidates.append(Path(configured))
    if os.environ.get("LLAMA_SERVER"):
        candidates.append(Path(os.environ["LLAMA_SERVER"]).expanduser())
    home = chorus_home()
    if home is not None:
        candidates.append(home / "bin" / BINARY)
    checkout = checkout_bin()
    if checkout is not None:
        candidates.append(checkout)
    candidates.extend(cached_builds())
    for path in candidates:
        searched.append(str(path))
        if path.is_file():
            if not os.access(path, os.X_OK):
                raise _not_found(searched, problem=f"at {path} is not executable")
            return path
        if configured is not None and path == Path(configured):
            raise _not_found(searched, problem=f"configured in app.yaml as {path} does not exist")
    on_path = shutil.which(BINARY)
    searched.append("PATH")
    if on_path:
        return Path(on_path)
    raise _not_found(searched)


def binary_version(binary: Path) -> str:
    """The first line of `llama-server --version` ('version: 0 (chorus-lcp0.3.36-cpu)'), or 'unknown'.

    Asked once per binary file (path, size, mtime): every session records it, and starting the binary
    just to ask (it initialises its backends) costs a run tens of milliseconds.
    """
    try:
        st = Path(binary).stat()
    except OSError:
        return "unknown"
    return _version_of(str(binary), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _version_of(binary: str, _size: int, _mtime_ns: int) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


RPC_BINARY = "rpc-server"


def find_rpc_server(configured_llama_server: Path | None = None) -> Path:
    """The rpc-server built beside llama-server (scripts/build_llama_server.sh copies both): first next to the
    llama-server that `find_llama_server` picks, then $RPC_SERVER, then PATH."""
    searched: list[str] = []
    candidates: list[Path] = []
    if os.environ.get("RPC_SERVER"):
        candidates.append(Path(os.environ["RPC_SERVER"]).expanduser())
    try:
        candidates.append(find_llama_server(configured_llama_server).parent / RPC_BINARY)
    except BinaryNotFound as exc:
        searched.extend(exc.searched)
    for path in candidates:
        searched.append(str(path))
        if path.is_file() and os.access(path, os.X_OK):
            return path
    on_path = shutil.which(RPC_BINARY)
    searched.append("PATH")
    if on_path:
        return Path(on_path)
    raise BinaryNotFound(searched, problem="rpc-server not found (it is built beside llama-server)")
