"""QA bug 3: an eval is run by one process at a time. `chorus eval resume` of an eval another process is
running was not refused: both ran its missing answers (and left orphan sessions). eval.db now records the
owner (pid and its start time); a live owner refuses a second runner, a dead one (or a reused pid) makes
the eval `interrupted`, and resumable.

The processes here are real: the owner is a Python process running an eval on the scripted backend (slow
replies, so it is still running when the second one tries), the second is the real `chorus` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.config.registry import Registry
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.fake import FakeBackend, Script
from orchestrator.eval.items import EvalItem
from orchestrator.eval.run import EvalRunner, build_spec
from orchestrator.eval.store import EvalRunning, EvalStore
from orchestrator.runtime import Runtime
from tests.conftest import REPO, ConfigDir

ITEMS = 40

OWNER = textwrap.dedent("""
    import sys
    from orchestrator.config.registry import Registry
    from orchestrator.config.schema import PipelineSpec, load_config
    from orchestrator.engine.fake import FakeBackend, Script
    from orchestrator.eval.items import EvalItem
    from orchestrator.eval.run import EvalRunner, build_spec
    from orchestrator.runtime import Runtime

    config = load_config(sys.argv[1])
    runtime = Runtime(config, Registry(config))
    pipeline = PipelineSpec.model_validate({"name": "one", "stages": [
        {"name": "a", "models": ["gemma3-270m"], "prompt": "{{ question }}"}]})
    spec = build_spec(runtime, pipeline, mode="manual", baselines=False, concurrency=1)
    runner = EvalRunner(runtime, backend=FakeBackend(default=Script("42", delay_s=float(sys.argv[3]))))
    items = [EvalItem(i, f"q{i}", f"What is {i} + 42 - {i}?", number=42.0) for i in range(int(sys.argv[2]))]
    eval_id = runner.start(spec, items, source="test")
    print(eval_id, flush=True)
    runner.run(eval_id)
""")


def start_owner(config_dir: ConfigDir, *, items: int = ITEMS,
                delay_s: float = 1.0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(config_dir.path), str(items), str(delay_s)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the eval id, once it is recorded
    if not line.startswith("eval_"):
        proc.kill()
        raise AssertionError(proc.communicate(timeout=30)[1][-2000:])
    return proc, line


def wait_for_answers(store: EvalStore, eval_id: str, proc: subprocess.Popen[str], count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while len(store.answers(eval_id)) < count:
        assert proc.poll() is None and time.monotonic() < deadline, "the owner ended before answering"
        time.sleep(0.1)


def chorus(config_dir: ConfigDir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=os.environ.copy())


def test_resume_of_an_eval_another_process_runs_is_refused_and_a_killed_owner_leaves_it_resumable(
        config_dir: ConfigDir) -> None:
    store = EvalStore(config_dir.sessions_dir)
    owner, eval_id = start_owner(config_dir)
    try:
        wait_for_answers(store, eval_id, owner)
        assert store.get(eval_id)["status"] == "running"
        refused = chorus(config_dir, "eval", "resume", eval_id)
        assert refused.returncode == 2, refused.stderr
        err = " ".join(refused.stderr.split())
        assert f"{eval_id} is running in process {owner.pid}; stop it first or wait" in err
        assert "Traceback" not in refused.stderr
        row = store.get(eval_id)  # the refusal changed nothing: still running, still the owner's
        assert (row["status"], row["pid"]) == ("running", owner.pid) and owner.poll() is None
        listed = chorus(config_dir, "eval", "list", "--json")
        assert json.loads(listed.stdout)[0]["status"] == "running"
    finally:
        owner.send_signal(signal.SIGKILL)  # no cleanup at all: the record still says running
        owner.communicate(timeout=30)
    assert store.get(eval_id)["status"] == "interrupted"
    listed = chorus(config_dir, "eval", "list", "--json")
    assert json.loads(listed.stdout)[0]["status"] == "interrupted"
    answered = len(store.answers(eval_id))
    assert 1 <= answered < ITEMS
    config = load_config(config_dir.path)
    runtime = Runtime(config, Registry(config))
    try:
        backend = FakeBackend(default=Script("42"))
        report = EvalRunner(runtime, backend=backend).run(eval_id)
    finally:
        runtime.close()
    assert report.eval["status"] == "completed"
    assert len(backend.requests) == ITEMS - answered  # only what was missing ran, once
    assert len(store.answers(eval_id)) == ITEMS


def test_two_resumes_of_an_interrupted_eval_at_once_run_it_once(config_dir: ConfigDir) -> None:
    """Two real processes resume the same interrupted eval together: one runs it, the other is refused."""
    store = EvalStore(config_dir.sessions_dir)
    owner, eval_id = start_owner(config_dir, items=4, delay_s=60)  # never answers: stopped at once
    owner.send_signal(signal.SIGKILL)
    owner.communicate(timeout=30)
    assert store.get(eval_id)["status"] == "interrupted"
    resume = textwrap.dedent("""
        import sys
        from orchestrator.config.registry import Registry
        from orchestrator.config.schema import load_config
        from orchestrator.engine.fake import FakeBackend, Script
        from orchestrator.eval.run import EvalRunner
        from orchestrator.eval.store import EvalRunning
        from orchestrator.runtime import Runtime

        config = load_config(sys.argv[1])
        runtime = Runtime(config, Registry(config))
        try:
            EvalRunner(runtime, backend=FakeBackend(default=Script("42", delay_s=3.0))).run(sys.argv[2])
            print("ran")
        except EvalRunning as exc:
            print("refused", exc.pid)
        runtime.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", resume, str(config_dir.path), eval_id], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    said = sorted(out.split()[0] for out, _ in outs if out.strip())
    assert said == ["ran", "refused"], outs
    assert store.get(eval_id)["status"] == "completed" and len(store.answers(eval_id)) == 4


# ---------------------------------------------------------------- the owner record, in one process


def one_stage() -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "one", "stages": [
        {"name": "a", "models": ["gemma3-270m"], "prompt": "{{ question }}"}]})


@pytest.fixture
def runtime(config_dir: ConfigDir):  # the fake backend's runtime (the real one is conftest's `runtime`)
    config = load_config(config_dir.path)
    rt = Runtime(config, Registry(config))
    yield rt
    rt.close()


def test_an_eval_this_process_runs_already_is_refused(runtime: Runtime) -> None:
    """The UI runs evals in threads of one process: the pid alone cannot tell two runners apart."""
    runner = EvalRunner(runtime, backend=FakeBackend(default=Script("42", delay_s=0.3)))
    spec = build_spec(runtime, one_stage(), mode="manual", baselines=False)
    eval_id = runner.start(spec, [EvalItem(0, "a", "Say 42.", number=42.0)], source="test")

    async def both() -> list[object]:
        return await asyncio.gather(runner.arun(eval_id), EvalRunner(runtime, backend=runner.backend).arun(eval_id),
                                    return_exceptions=True)

    first, second = asyncio.run(both())
    assert isinstance(second, EvalRunning) and "is running in this process" in str(second)
    assert not isinstance(first, BaseException) and first.eval["status"] == "completed"  # type: ignore[attr-defined]


def test_an_owner_pid_reused_by_another_process_does_not_hold_the_eval(runtime: Runtime, tmp_path: Path) -> None:
    store = EvalStore(runtime.config.sessions_dir)
    eval_id = store.create({"systems": []}, [EvalItem(0, "a", "q")], source="t", pipeline="p")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        started = psutil.Process(other.pid).create_time()
        with store._connect() as conn:  # a live process with the owner's start time: it holds the eval
            conn.execute("UPDATE evals SET pid = ?, pid_started = ? WHERE id = ?", (other.pid, started, eval_id))
        assert store.get(eval_id)["status"] == "running"
        with pytest.raises(EvalRunning):
            store.claim(eval_id)
        with store._connect() as conn:  # the same pid, started at another time: a reused pid
            conn.execute("UPDATE evals SET pid_started = ? WHERE id = ?", (started - 3600, eval_id))
        assert store.get(eval_id)["status"] == "interrupted"
        store.claim(eval_id)
        assert store.get(eval_id)["pid"] == os.getpid()
    finally:
        other.kill()
        other.wait()


def test_an_eval_db_from_before_start_times_is_opened_and_gets_the_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "eval.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE evals (id TEXT PRIMARY KEY, number INTEGER UNIQUE, created_at REAL, "
                     "finished_at REAL, status TEXT, source TEXT, pipeline TEXT, spec TEXT, error TEXT, pid INTEGER)")
        conn.execute("INSERT INTO evals VALUES ('eval_001', 1, 0, NULL, 'running', 's', 'p', '{}', NULL, ?)",
                     (os.getpid(),))
    conn.close()
    path.chmod(0o600)
    store = EvalStore(tmp_path)
    assert store.get(1)["status"] == "running"  # this process, no start time recorded: alive
    store.claim("eval_001")
    assert store.get(1)["pid_started"] is not None
