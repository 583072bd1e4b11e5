"""Waiting for a `chorus api` subprocess to answer /health.

One client for the whole wait, without a TLS context: `httpx.get` builds a client per call, and loading the
CA store costs 20-90 ms of CPU each time, taken from the process the test is waiting for.
"""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float = 60.0) -> bool:
    """True once `url`/health answers 200; False if `proc` exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1, verify=False) as client:  # loopback http only
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    return False
