"""Models as Ollama users expect them: unregistered files listed and added, servers stopped, keep-alive per model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cli.models import append_entry_text
from launcher.process.pool import ServerPool
from launcher.process.server import ServerSpec
from launcher.process.state import ServerRecord, list_running, stop_recorded, write_record
from orchestrator.config.registry import Registry
from orchestrator.config.schema import ModelEntry, load_config
from orchestrator.errors import ConfigError
from tests import yamlfile
from tests.clirun import run_main
from tests.conftest import REPO, SECOND_MODEL_NAME, ConfigDir

SMOL = SECOND_MODEL_NAME
COMMENTED_MODELS = """\
# My models. Comments, blank lines and key order must survive `chorus models add`.

models:
  gemma3-270m:
    file: gemma-3-270m-q4_k_m.gguf   # the demo
    default_n_ctx: 4096

  # an example, not in use:
  # llama3:
  #   file: Meta-Llama-3-8B-Instruct.Q5_K_M.gguf
"""


def chorus(config_dir: ConfigDir, *args: str) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS --config-dir DIR`, its main() in this process (tests/clirun.py)."""
    return run_main(*args, "--config-dir", str(config_dir.path))


def chorus_process(config_dir: ConfigDir, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """The same as a process of its own, as a user types it."""
    return subprocess.run([sys.executable, "-m", "cli", *args, "--config-dir", str(config_dir.path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def smol(config_dir: ConfigDir) -> Path:
    """The SmolLM2 instruct file in models_dir (the fixture links it there), with no entry for it."""
    config_dir.write_models(COMMENTED_MODELS)
    return config_dir.models_dir / SMOL


# ---------------------------------------------------------------- listing unregistered files


def test_models_lists_an_unregistered_file_with_its_metadata_and_a_ready_entry(config_dir: ConfigDir,
                                                                             smol: Path) -> None:
    out = chorus(config_dir, "models", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert next(m for m in listed if m["name"] == "gemma3-270m")["status"] == "available"
    (loose,) = [m for m in listed if m["status"] == "unregistered"]
    assert loose["file"] == SMOL and loose["name"] is None
    assert (loose["architecture"], loose["size_label"], loose["has_chat_template"]) == ("llama", "135M", True)
    assert loose["context_length"] == 8192 and loose["size_bytes"] > 90_000_000
    assert loose["entry"]["file"] == SMOL and loose["entry"]["default_n_ctx"] == 4096
    ModelEntry.model_validate(loose["entry"])  # a valid models.yaml entry as it stands

    table = chorus(config_dir, "models").stdout
    assert "Not registered" in table and SMOL in table and f"chorus models add {SMOL}" in table
    block = table.split(f"writes to {config_dir.path / 'models.yaml'}:", 1)[1]
    assert yamlfile.load(block) == {loose["suggested_name"]: loose["entry"]}  # copy-paste ready


def test_later_parts_of_a_split_model_and_registered_files_are_not_listed(config_dir: ConfigDir) -> None:
    for name in ("big-00001-of-00002.gguf", "big-00002-of-00002.gguf"):
        (config_dir.models_dir / name).write_bytes(b"GGUF" + b"\0" * 60)
    loose = Registry(load_config(config_dir.path)).unregistered_files()
    assert [f.file for f in loose] == ["big-00001-of-00002.gguf"]  # not the demo model: it is registered
    assert loose[0].reason and loose[0].reason.startswith("not a valid GGUF file") and loose[0].entry() is None


# ---------------------------------------------------------------- models add


def test_models_add_appends_the_entry_and_keeps_the_comments(config_dir: ConfigDir, smol: Path) -> None:
    before = (config_dir.path / "models.yaml").read_text()
    out = chorus(config_dir, "models", "add", SMOL, "--name", "smol")
    assert out.returncode == 0, out.stderr
    after = (config_dir.path / "models.yaml").read_text()
    assert after.startswith(before.rstrip("\n"))  # every comment and line as it was, the block after them
    assert "\n  smol:\n    file: SmolLM2-135M-Instruct.Q4_1.gguf\n" in after
    rec = Registry(load_config(config_dir.path)).records["smol"]
    assert rec.available and rec.mode == "chat"
    assert oct((config_dir.path / "models.yaml").stat().st_mode & 0o777) == oct(0o644)


def test_models_add_refuses_a_duplicate_name_and_leaves_the_file_alone(config_dir: ConfigDir, smol: Path) -> None:
    before = (config_dir.path / "models.yaml").read_text()
    out = chorus(config_dir, "models", "add", str(smol), "--name", "gemma3-270m")
    assert out.returncode == 2 and "already defined" in out.stderr and "Traceback" not in out.stderr
    assert (config_dir.path / "models.yaml").read_text() == before


def test_models_add_refuses_a_file_that_is_not_a_gguf(config_dir: ConfigDir) -> None:
    (config_dir.models_dir / "notes.gguf").write_text("hello")
    out = chorus(config_dir, "models", "add", "notes.gguf")
    assert out.returncode == 2 and "not a valid GGUF file" in " ".join(out.stderr.split())


def test_models_add_to_the_empty_file_init_writes(config_dir: ConfigDir, smol: Path) -> None:
    config_dir.write_models("# my models\nmodels: {}   # none yet\n")
    out = chorus(config_dir, "models", "add", SMOL)
    assert out.returncode == 0, out.stderr
    text = (config_dir.path / "models.yaml").read_text()
    assert text.startswith("# my models\nmodels:  # none yet\n")
    assert list(load_config(config_dir.path).models) == ["smollm2-135m-instruct.q4_1"]


def test_a_layout_it_cannot_append_to_is_rewritten_whole_and_still_valid(config_dir: ConfigDir, smol: Path) -> None:
    config_dir.write_models("models: {gemma3-270m: {file: gemma-3-270m-q4_k_m.gguf}}\n")
    assert append_entry_text("models: {a: {file: a.gguf}}\n", "b", {"file": "b.gguf"}) is None
    out = chorus(config_dir, "models", "add", SMOL, "--name", "smol")
    assert out.returncode == 0 and "rewritten whole" in out.stdout
    assert set(load_config(config_dir.path).models) == {"gemma3-270m", "smol"}


def test_appending_lands_at_the_models_indentation() -> None:
    text = "models:\n    a:\n        file: a.gguf\n# trailing note\n"
    out = append_entry_text(text, "b", {"file": "b.gguf"})
    assert out is not None and out.startswith(text)
    assert yamlfile.load(out) == {"models": {"a": {"file": "a.gguf"}, "b": {"file": "b.gguf"}}}


# ---------------------------------------------------------------- chorus stop


def fake_server(tmp_path: Path, script: str) -> subprocess.Popen[bytes]:
    """A process whose argv[0] is '…/llama-server' (bash under that name) leading its own group, with a child."""
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir(exist_ok=True)
    if not exe.exists():
        exe.symlink_to(shutil.which("bash") or "/bin/bash")
    proc = subprocess.Popen([str(exe), "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(psutil.Process(proc.pid).children()) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie its new parent has not reaped yet (a container's init may never)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def record_of(proc: subprocess.Popen[bytes], model: str) -> ServerRecord:
    return ServerRecord(pid=proc.pid, port=1, model=model, model_path="/m.gguf", n_ctx=512, n_gpu_layers=0,
                        slots=1, owner_pid=os.getpid(), started_at=time.time())


def test_stop_record_stops_the_whole_group_and_removes_the_record(tmp_path: Path) -> None:
    proc = fake_server(tmp_path, "sleep 300 & wait")
    child = psutil.Process(proc.pid).children()[0]
    state = tmp_path / "running"
    write_record(state, record_of(proc, "m"))
    assert [r.pid for r in list_running(state)] == [proc.pid]
    assert stop_recorded(state, record_of(proc, "m"), grace_s=5) == "stopped"
    assert proc.wait(timeout=5) is not None and dead(child)
    assert list_running(state) == []


def test_stop_record_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = fake_server(tmp_path, "trap '' TERM; sleep 300 & wait")
    child = psutil.Process(proc.pid).children()[0]
    state = tmp_path / "running"
    started = time.monotonic()
    assert stop_recorded(state, record_of(proc, "m"), grace_s=0.5) == "killed"
    assert time.monotonic() - started < 5
    assert proc.wait(timeout=5) == -9 and dead(child)


def test_stop_record_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    proc = fake_server(tmp_path, "sleep 300 & wait")
    try:
        stale = record_of(proc, "m")
        stale.started_at = time.time() - 3600  # recorded an hour ago: this process is another one on that pid
        assert stop_recorded(tmp_path / "running", stale, grace_s=0.5) == "gone"
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=5)


def test_stop_cli_stops_a_model_and_reports_it(config_dir: ConfigDir, tmp_path: Path) -> None:
    state = config_dir.path.parent / "logs" / "running"
    keep = fake_server(tmp_path, "sleep 300 & wait")
    gone = fake_server(tmp_path, "sleep 300 & wait")
    try:
        write_record(state, record_of(keep, "other"))
        write_record(state, record_of(gone, "gemma3-270m"))
        out = chorus_process(config_dir, "stop", "gemma3-270m")  # another process stops what this one started
        assert out.returncode == 0, out.stderr
        assert f"gemma3-270m (pid {gone.pid}" in out.stdout and ": stopped" in out.stdout
        assert gone.wait(timeout=5) is not None and keep.poll() is None
        missing = chorus(config_dir, "stop", "nothing-here")
        assert missing.returncode == 1 and "running: other" in missing.stderr
        everything = chorus(config_dir, "stop", "--all")
        assert everything.returncode == 0 and f"other (pid {keep.pid}" in everything.stdout
        assert keep.wait(timeout=5) is not None
        assert chorus(config_dir, "stop", "--all").stdout.strip() == "no llama-server running"
    finally:
        for proc in (keep, gone):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=5)


def test_stop_has_help_and_needs_a_model_or_all(config_dir: ConfigDir) -> None:
    helped = chorus(config_dir, "stop", "--help")
    assert helped.returncode == 0 and "--all" in helped.stdout
    bare = chorus(config_dir, "stop")
    assert bare.returncode == 2 and "give a model name or --all" in bare.stderr


# ---------------------------------------------------------------- keep-alive per model


class FakeServer:
    """What the pool uses of a ModelServer, without a process."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec, self.model, self.stopped, self.stopped_by_us = spec, spec.model, False, False

    def is_alive(self) -> bool:
        return not self.stopped

    def stop(self, grace_s: float | None = None) -> None:
        self.stopped = True


class ProcesslessPool(ServerPool):
    def _start(self, spec: ServerSpec, **_: object) -> FakeServer:  # type: ignore[override]
        return FakeServer(spec)


def test_a_models_own_idle_timeout_overrides_the_pools(tmp_path: Path) -> None:
    own = {"quick": 5.0}
    pool = ProcesslessPool(tmp_path, tmp_path, idle_timeout_s=900, idle_timeout_for=lambda s: own.get(s.model))
    try:
        quick, slow = ServerSpec("quick", tmp_path / "q.gguf"), ServerSpec("slow", tmp_path / "s.gguf")
        a, b = pool.acquire(quick), pool.acquire(slow)
        pool.release(a)
        pool.release(b)
        now = time.monotonic()
        assert pool.evict_idle(now=now + 60) == [a]        # its own 5 s, not the pool's 900 s
        assert pool.evict_idle(now=now + 901) == [b]       # the pool's
        assert quick.family == ServerSpec("other-name", tmp_path / "q.gguf").family  # not in the server's key
    finally:
        pool.shutdown()


def test_a_server_two_model_names_share_lives_by_the_longer_keep_alive(tmp_path: Path) -> None:
    pool = ProcesslessPool(tmp_path, tmp_path, idle_timeout_s=None, idle_timeout_for={"quick": 5.0}.get)
    try:
        path = tmp_path / "one.gguf"
        a = pool.acquire(ServerSpec("quick", path))
        b = pool.acquire(ServerSpec("never-idle", path))  # same file and flags: the same server
        assert a is b
        pool.release(a)
        pool.release(b)
        assert pool.evict_idle(now=time.monotonic() + 10_000) == []  # the pool's None (never) is the longer
    finally:
        pool.shutdown()


def test_idle_timeout_in_models_yaml(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["gemma3-270m"]["idle_timeout_s"] = 30
    config_dir.write_models(models)
    assert load_config(config_dir.path).models["gemma3-270m"].idle_timeout_s == 30
    assert ModelEntry(file="x.gguf").idle_timeout_s is None  # unset: app.yaml's server.idle_timeout_s
    models["models"]["gemma3-270m"]["idle_timeout_s"] = 0
    config_dir.write_models(models)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        load_config(config_dir.path)
