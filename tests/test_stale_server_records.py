"""A stale server record whose pid and process group now belong to another program: `chorus ps` must not list
it and `chorus stop --all` must not kill it (launcher/process/state.py `process_of`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from launcher.process.state import ServerRecord, list_running, process_of, stop_recorded, write_record
from tests.clirun import run_main
from tests.conftest import ConfigDir


def stale_record_for(proc: subprocess.Popen[bytes]) -> ServerRecord:
    """What a server that is long gone left: its pid and group are `proc`'s now, its times are its own."""
    started = time.time() - 60
    return ServerRecord(pid=proc.pid, port=1, model="gemma3-270m", model_path="/models/gemma.gguf", n_ctx=512,
                        n_gpu_layers=0, slots=1, owner_pid=os.getpid(), started_at=started, pgid=proc.pid,
                        create_time=started + 0.5, owner_create_time=None)


def setsid_sleep() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["setsid", "sleep", "1000"], start_new_session=False)
    deadline = time.monotonic() + 5  # setsid execs sleep (it forks only when it leads a group already)
    while time.monotonic() < deadline:
        try:
            if psutil.Process(proc.pid).name() == "sleep" and os.getpgid(proc.pid) == proc.pid:
                return proc
        except (psutil.Error, OSError):
            pass
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("setsid sleep did not become its group's leader")


def test_a_record_naming_an_unrelated_group_leader_is_stale(tmp_path: Path) -> None:
    sleeper = setsid_sleep()
    try:
        running = tmp_path / "running"
        write_record(running, stale_record_for(sleeper))
        assert process_of(stale_record_for(sleeper)) is None
        assert list_running(running) == [] and not list(running.iterdir())  # dropped
        write_record(running, stale_record_for(sleeper))
        assert stop_recorded(running, stale_record_for(sleeper), grace_s=0.5) == "gone"
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(timeout=5)


def test_ps_and_stop_all_leave_the_unrelated_process_alone(config_dir: ConfigDir) -> None:
    sleeper = setsid_sleep()
    try:
        running = config_dir.path.parent / "logs" / "running"
        write_record(running, stale_record_for(sleeper))
        ps = run_main("ps", "--config-dir", config_dir.path)
        assert ps.returncode == 0 and str(sleeper.pid) not in ps.stdout
        write_record(running, stale_record_for(sleeper))
        stop = run_main("stop", "--all", "--config-dir", config_dir.path)
        assert stop.returncode == 0 and "no llama-server running" in stop.stdout
        time.sleep(0.2)
        assert sleeper.poll() is None, "stop --all killed a process that is not a server"
    finally:
        sleeper.kill()
        sleeper.wait(timeout=5)


def test_a_server_in_the_recorded_group_is_still_followed(tmp_path: Path) -> None:
    """The case the fallback is for: the recorded wrapper died, its child server lives on in the group."""
    server = tmp_path / "llama-server"
    server.symlink_to(shutil.which("sleep") or "/bin/sleep")
    wrapper = subprocess.Popen(["sh", "-c", f"'{server}' 300 & '{shutil.which('sleep')}' 301 & wait"],
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(psutil.Process(wrapper.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        children = psutil.Process(wrapper.pid).children()
        real = next(c for c in children if Path(c.cmdline()[0]).name == "llama-server")
        record = ServerRecord(pid=wrapper.pid, port=1, model="m", model_path="/m.gguf", n_ctx=512, n_gpu_layers=0,
                              slots=1, owner_pid=os.getpid(), started_at=time.time() - 1, pgid=wrapper.pid,
                              create_time=psutil.Process(wrapper.pid).create_time())
        os.kill(wrapper.pid, 9)
        wrapper.wait(timeout=5)
        found = process_of(record)
        assert found is not None and found.pid == real.pid  # the server, not the plain sleep beside it
    finally:
        os.killpg(wrapper.pid, 9)
