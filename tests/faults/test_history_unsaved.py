"""Fault 9: history cannot be saved: the sessions dir cannot be created, is read-only, or the disk is full.

The run still finishes and returns its answer, `chorus run` still prints it with a warning that history
could not be saved, and nothing crashes; once the disk has room again, history works as before.
A full disk is a small tmpfs (needs root to mount) and, where mounting is not allowed, a file-size
limit (RLIMIT_FSIZE) set after the server is up, so only chorus's own writes fail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.engine.events import Event, StageStarted
from orchestrator.history.store import SessionStore
from orchestrator.runs import Runner
from tests import yamlfile
from tests.conftest import REPO, ConfigDir
from tests.faults.conftest import answered, assert_session_valid, chorus, chorus_main, make_runtime, manual, run

pytestmark = pytest.mark.integration

QUESTION = "The capital of France is"


@pytest.fixture
def small(tmp_path: Path) -> list[str]:
    """`chorus run` arguments for a one-stage manual pipeline on the demo model (one server to start)."""
    spec = tmp_path / "small.yaml"
    spec.write_text(yamlfile.dump({"stages": [answered("s", max_tokens=4, n_ctx=512)]}))
    return ["--manual", str(spec)]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(name, options) -> a fresh tmpfs folder, unmounted afterwards; skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(name: str, options: str = "size=1m") -> Path:
        path = tmp_path / name
        path.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write into `folder` until the disk is full."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as f:
        for size in (65536, 4096, 512, 1):  # then smaller writes, so no partial page is left over
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.fsync(f.fileno())
    return filler


@contextlib.contextmanager
def filling(folder: Path) -> Iterator[Callable[[], None]]:
    """start() -> the disk fills now and stays full until the block ends, as when another process keeps
    writing: one fill is not enough, as the recorder's writer thread may be mid-write when the disk fills and
    then free pages of its own (a replaced file, the index's WAL), which its next writes would take."""
    stop = threading.Event()
    started = threading.Event()

    def keep_full() -> None:
        started.wait()
        while not stop.is_set():
            fill(folder)
            stop.wait(0.005)

    thread = threading.Thread(target=keep_full, daemon=True)
    thread.start()

    def start() -> None:
        fill(folder)  # full before the event's handler returns, so stage two's writes meet a full disk
        started.set()

    try:
        yield start
    finally:
        stop.set()
        started.set()
        thread.join()


def test_sessions_dir_that_cannot_be_created_or_written_still_gives_the_answer(
        config_dir: ConfigDir, llama_server_bin, tmp_path: Path, small: list[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config_dir.write_app(sessions_dir=str(blocker / "sessions"))  # mkdir fails: Not a directory
    runtime = make_runtime(config_dir)
    spec = manual([answered("s")], n_ctx=512)
    try:
        outcome, _ = run(runtime, spec, QUESTION)
        assert outcome.run.status == "completed" and outcome.run.final.strip()
        assert outcome.session_id is None
        assert outcome.history_error and outcome.history_error.startswith("history could not be saved")
        assert "Not a directory" in outcome.history_error

        read_only = tmp_path / "read-only"
        read_only.mkdir()
        if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
                                     capture_output=True).returncode == 0
        else:
            read_only.chmod(0o555)
            mounted = True
        if mounted:
            try:
                ro = Runner(runtime, store=SessionStore(read_only)).run(spec, QUESTION)
            finally:
                subprocess.run(["umount", "-l", str(read_only)], check=False, capture_output=True)
            assert ro.run.status == "completed" and ro.run.final.strip()
            assert ro.history_error and "cannot create session folder" in ro.history_error
    finally:
        runtime.close()

    out = chorus(config_dir, "run", QUESTION, *small)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.strip()  # the answer
    assert "warning: history could not be saved" in out.stderr


def test_full_disk_loses_the_history_not_the_answer_and_recovers(
        config_dir: ConfigDir, llama_server_bin, tmpfs: Callable[..., Path], small: list[str]) -> None:
    disk = tmpfs("disk")
    sessions = disk / "sessions"
    config_dir.write_app(sessions_dir=str(sessions))
    filler = fill(disk)
    runtime = make_runtime(config_dir)
    two_stages = manual([answered("one"), answered("two")], n_ctx=512)
    try:
        full, _ = run(runtime, two_stages, QUESTION)
        assert full.run.status == "completed" and full.run.final.strip()
        assert full.history_error and "No space left on device" in full.history_error
        assert full.history_error.count("No space left") == 1  # said once, not once per failed write

        filler.unlink()  # room at the start, then the disk fills up during the run
        with filling(disk) as start_filling:
            def fill_at_stage_two(event: Event) -> None:
                if isinstance(event, StageStarted) and event.stage == "two":
                    start_filling()

            midway, _ = run(runtime, two_stages, QUESTION, on_event=fill_at_stage_two)
        assert midway.run.status == "completed" and midway.run.final.strip()
        assert midway.history_error and "No space left on device" in midway.history_error

        out = chorus(config_dir, "run", QUESTION, *small)  # the user's view on the full disk
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert out.stdout.strip() and "warning: history could not be saved" in out.stderr
        assert "session:" not in out.stderr  # its first write failed: no session, and no empty folder left
        assert all((d / "session.json").is_file() for d in sessions.glob("session_*"))

        filler.unlink()  # room again: history works as before
        back, _ = run(runtime, two_stages, QUESTION)
        assert back.history_error is None
        assert_session_valid(sessions, back.session_id)  # type: ignore[arg-type]
    finally:
        runtime.close()
    listed = chorus_main(config_dir, "history", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    ids = [r["id"] for r in json.loads(listed.stdout)]
    assert back.session_id in ids
    assert full.session_id is None  # a full disk from the start: nothing to list
    assert {r["id"]: r["status"] for r in json.loads(listed.stdout)}[midway.session_id] == "interrupted"
    for sid in {full.session_id, midway.session_id} - {None}:  # half-written sessions never crash the history
        shown = chorus_main(config_dir, "history", "show", sid)  # type: ignore[arg-type]
        assert "Traceback" not in shown.stderr, shown.stderr


def test_file_size_limit_loses_the_history_not_the_answer(config_dir: ConfigDir, llama_server_bin) -> None:
    """Unprivileged disk-full: RLIMIT_FSIZE on chorus once its server is up (a child would inherit it)."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from orchestrator.config.schema import PipelineSpec, load_config
        from orchestrator.runs import Runner
        from orchestrator.runtime import Runtime
        runtime = Runtime(load_config({str(config_dir.path)!r}))
        spec = PipelineSpec.model_validate({{"stages": [{answered("s", max_tokens=4, n_ctx=512)!r}]}})
        plan = runtime.plan(spec, "manual")  # warm the very servers the run's plan resolves
        for call in [c for stage in plan.stages for c in stage.all_calls() if c.target.server is not None]:
            runtime.pool.release(runtime.pool.acquire(call.target.server))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # no file may grow: EFBIG
        outcome = Runner(runtime).run(spec, {QUESTION!r})
        runtime.close()
        print(json.dumps({{"status": outcome.run.status, "final": outcome.run.final,
                          "history_error": outcome.history_error}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed" and result["final"].strip()
    assert result["history_error"] and "File too large" in result["history_error"]
