"""`chorus api` and `chorus ui` wait on their child: a stop signal is passed on, a child that ignores it is
killed after the grace time, and the wait costs no CPU (it blocks rather than polls)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from cli.ui import supervise


def child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def signal_us_later(signum: int, after_s: float) -> None:
    threading.Timer(after_s, os.kill, (os.getpid(), signum)).start()


READY_THEN_SLEEP = "import time; print('up', flush=True); time.sleep(60)"
IGNORING_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def test_the_childs_own_exit_status_is_returned() -> None:
    assert supervise(child("raise SystemExit(3)")) == 3


def test_sigterm_is_passed_on_and_reported_as_128_plus_15() -> None:
    proc = child(READY_THEN_SLEEP)
    signal_us_later(signal.SIGTERM, 0.5)
    started = time.monotonic()
    assert supervise(proc, grace_s=30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    assert proc.returncode == -signal.SIGTERM


def test_ctrl_c_is_passed_on_and_reported_as_success() -> None:
    proc = child(READY_THEN_SLEEP)
    signal_us_later(signal.SIGINT, 0.5)
    assert supervise(proc, grace_s=30) == 0
    assert proc.returncode is not None


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_time() -> None:
    proc = child(IGNORING_TERM)
    time.sleep(0.5)  # its handler installed
    signal_us_later(signal.SIGTERM, 0.1)
    started = time.monotonic()
    assert supervise(proc, grace_s=1.0) == 128 + signal.SIGTERM
    took = time.monotonic() - started
    assert proc.returncode == -signal.SIGKILL
    assert 1.0 <= took < 10


def test_waiting_on_a_busy_child_takes_no_cpu() -> None:
    """The wait blocks: polling woke the supervisor ~50 times a second beside the busy llama-servers."""
    proc = child(READY_THEN_SLEEP)
    me = psutil.Process()
    before = me.cpu_times()
    ctx_before = me.num_ctx_switches().voluntary
    signal_us_later(signal.SIGTERM, 2.0)
    supervise(proc, grace_s=30)
    after = me.cpu_times()
    wakes = me.num_ctx_switches().voluntary - ctx_before
    assert (after.user + after.system) - (before.user + before.system) < 0.05
    assert wakes < 20, f"{wakes} wake-ups in 2 s of waiting"
