"""Model-server side of chorus: llama-server processes, GGUF metadata and memory.

Knows nothing of pipelines; the orchestrator builds on it.
"""

import importlib.util as _util
import sys as _sys


def _skip_doomed_httpx_cli() -> None:
    """`import httpx` tries its command-line client (httpx._main), which imports click and pygments (~20 ms of
    a cold start) before it fails on rich when httpx[cli] is not installed; httpx then falls back to a `main`
    that says so. Without rich that import can only fail, so it is marked absent up front: the same fallback,
    without the cost. With rich installed nothing changes."""
    if "httpx" not in _sys.modules and "httpx._main" not in _sys.modules and _util.find_spec("rich") is None:
        _sys.modules["httpx._main"] = None  # type: ignore[assignment]  # None: "import fails" (the import system's own)


_skip_doomed_httpx_cli()
