"""ModelServer, ServerPool and the client against the real llama-server and the demo model."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher.errors import (
    BinaryNotFound,
    InsufficientMemory,
    InvalidModelFile,
    ServerCrashed,
    ServerOutOfMemory,
    ServerStartError,
    ServerStopped,
)
from launcher.process import server as server_mod
from launcher.process.binary import find_llama_server
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from launcher.process.pool import ServerPool
from launcher.process.server import ModelServer, ServerOptions, ServerSpec, classify_exit
from tests.conftest import REPO

# No module-wide integration mark: a test that takes llama_server_bin, demo_model or pool is marked by
# tests/conftest.py; the pure ones (lookup order, exit classification, template flags) are the fast tier.


def spec_for(model: Path, **kw: object) -> ServerSpec:
    return ServerSpec("gemma3-270m", model, **{"n_ctx": 1024, **kw})  # type: ignore[arg-type]


def generate(server: ModelServer, prompt: str = "The capital of France is", **kw: object):
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)

    async def go():
        async with GenerationClient(timeout_s=120) as client:
            return await client.generate(ep, GenerationRequest(prompt, **{"max_tokens": 16, "seed": 1, **kw}))

    return asyncio.run(go())


@pytest.fixture
def pool(llama_server_bin: Path, tmp_path: Path):
    p = ServerPool(llama_server_bin, tmp_path / "logs", options=ServerOptions(startup_timeout_s=60))
    yield p
    p.shutdown()


def test_start_generate_stop(llama_server_bin: Path, demo_model: Path, tmp_path: Path) -> None:
    server = ModelServer(spec_for(demo_model), llama_server_bin, tmp_path).start()
    try:
        cmd = server.command(server.port or 0)
        for flag in ("-m", "-c", "-ngl", "-np", "--host", "--no-webui", "--api-key-file", "--metrics"):
            assert flag in cmd
        assert "--api-key" not in cmd and server.api_key not in " ".join(cmd)
        result = generate(server)
        assert result.text.strip()
        assert result.completion_tokens and result.completion_tokens > 0
        assert result.first_token_s is not None and result.total_s >= result.first_token_s
        assert server.log_path and server.log_path.exists()
    finally:
        server.stop()
    assert not server.is_alive()


def test_requests_without_the_api_key_are_refused(warm_demo_server: ModelServer) -> None:
    import httpx

    r = httpx.post(f"{warm_demo_server.base_url}/completion", json={"prompt": "hi", "n_predict": 1})
    assert r.status_code == 401


def test_a_server_spins_briefly_at_openmp_barriers_only_while_servers_share_the_cores(
        llama_server_bin: Path, demo_model: Path, tmp_path: Path) -> None:
    """Servers busy at once must not spin through each other's time slices (launcher/process/server.py)."""
    sharing = [False]
    options = ServerOptions(shares_cores=lambda _spec: sharing[0])
    spec = ServerSpec("gemma3-270m", demo_model, n_ctx=256, n_gpu_layers=0)
    for shares in (False, True):
        sharing[0] = shares
        server = ModelServer(spec, llama_server_bin, tmp_path, options).start()
        try:
            assert server.pid is not None
            environ = psutil.Process(server.pid).environ()
            assert environ.get("GOMP_SPINCOUNT") == ("1000" if shares else None)
            assert "LLAMA_API_KEY" not in environ
        finally:
            server.stop()


def test_the_users_openmp_setting_wins_over_chorus_spin_count() -> None:
    env = server_mod.server_env
    assert env({"OMP_WAIT_POLICY": "PASSIVE"}, {}, shares_cores=True) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env({}, {"GOMP_SPINCOUNT": "50"}, shares_cores=True)["GOMP_SPINCOUNT"] == "50"
    assert env({"PATH": "/bin", "LLAMA_API_KEY": "k"}, {}, shares_cores=True) == {"PATH": "/bin",
                                                                                   "GOMP_SPINCOUNT": "1000"}
    assert env({"PATH": "/bin"}, {}) == {"PATH": "/bin"}  # a server alone spins as llama.cpp chose


def test_two_parallel_requests_use_both_slots_of_one_server(pool: ServerPool, demo_model: Path) -> None:
    server = pool.acquire(spec_for(demo_model, slots=2))
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)

    async def both():
        async with GenerationClient() as client:
            return await asyncio.gather(*[
                client.generate(ep, GenerationRequest(p, max_tokens=16, seed=1))  # both in flight at once
                for p in ("Once upon a time", "The ocean is")])

    results = asyncio.run(both())
    assert all(r.text for r in results)
    deadline = time.monotonic() + 5  # the server logs a slot's release just after its answer ends
    while True:
        used_slots = set(re.findall(r"slot\s+release: id\s+(\d+)", server.log_path.read_text()))  # type: ignore
        if used_slots == {"0", "1"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert used_slots == {"0", "1"}
    assert pool.starts == 1


def test_same_spec_reuses_the_running_server(pool: ServerPool, demo_model: Path) -> None:
    first = pool.acquire(spec_for(demo_model))
    pool.release(first)
    again = pool.acquire(spec_for(demo_model))
    pool.release(again)
    assert again is first and pool.starts == 1
    # a server with more slots can serve a request for fewer
    big = pool.acquire(spec_for(demo_model, slots=3))
    pool.release(big)
    assert pool.acquire(spec_for(demo_model, slots=2)) is big
    assert pool.starts == 2


def test_concurrent_acquires_of_one_key_start_one_server(pool: ServerPool, demo_model: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        servers = list(ex.map(lambda _: pool.acquire(spec_for(demo_model)), range(4)))
    assert len({id(s) for s in servers}) == 1 and pool.starts == 1


def test_kill_9_mid_generation_is_a_typed_error_and_next_use_restarts(pool: ServerPool,
                                                                      demo_model: Path) -> None:
    server = pool.acquire(spec_for(demo_model))
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)
    killed: list[int] = []

    def on_token(_piece: str) -> None:
        if not killed:
            killed.append(server.pid or 0)
            os.kill(server.pid or 0, signal.SIGKILL)

    async def go():
        async with GenerationClient() as client:
            return await client.generate(ep, GenerationRequest("Count: 1, 2, 3,", max_tokens=400), on_token)

    with pytest.raises(ServerCrashed):
        asyncio.run(go())
    pool.release(server)
    failure = server.failure()
    assert isinstance(failure, ServerCrashed) and "SIGKILL" in failure.detail
    fresh = pool.acquire(spec_for(demo_model))
    assert fresh is not server and fresh.is_alive() and pool.starts == 2
    assert generate(fresh).text


def test_a_server_stopped_by_chorus_mid_generation_says_so_not_crash_or_oom(pool: ServerPool,
                                                                            demo_model: Path) -> None:
    """`chorus stop` or the UI's Models page during a run: it read "stopped by chorus (killed by SIGKILL
    (kill -9, or the kernel's OOM killer))" with the crash hint."""
    server = pool.acquire(spec_for(demo_model))
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)
    stopper: list[threading.Thread] = []

    def on_token(_piece: str) -> None:
        if not stopper:
            stopper.append(threading.Thread(target=pool.stop, args=(server,)))
            stopper[0].start()

    async def go():
        async with GenerationClient() as client:
            return await client.generate(ep, GenerationRequest("Count: 1, 2, 3,", max_tokens=400), on_token)

    with pytest.raises(ServerStopped) as stopped:
        asyncio.run(go())
    stopper[0].join(30)
    assert "chorus stopped the server" in str(stopped.value)
    assert "OOM" not in str(stopped.value) and "SIGKILL" not in str(stopped.value)
    assert "next request starts it again" in (stopped.value.hint or "")


def test_a_file_that_is_not_gguf_is_an_invalid_model_error(llama_server_bin: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a model\n" * 1000)
    with pytest.raises(InvalidModelFile) as err:
        ModelServer(spec_for(bogus), llama_server_bin, tmp_path).start()
    assert err.value.command and err.value.log_tail
    assert "bogus.gguf" in " ".join(err.value.command)


def test_tight_address_space_limit_is_an_out_of_memory_error(llama_server_bin: Path, demo_model: Path,
                                                            tmp_path: Path) -> None:
    options = ServerOptions(rlimit_as_bytes=300 * 2**20, startup_timeout_s=60)
    with pytest.raises(ServerOutOfMemory) as err:
        ModelServer(spec_for(demo_model), llama_server_bin, tmp_path, options).start()
    assert "alloc" in err.value.detail.lower()
    assert err.value.hint and "n_ctx" in err.value.hint


def test_port_taken_between_probe_and_bind_is_retried_on_another_port(
        llama_server_bin: Path, demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    ports = iter([taken])
    real = server_mod.free_port
    monkeypatch.setattr(server_mod, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
    try:
        server = ModelServer(spec_for(demo_model), llama_server_bin, tmp_path).start()
        assert server.port != taken
        assert "bind" in (tmp_path / f"gemma3-270m-{taken}.log").read_text().lower()
        server.stop()
    finally:
        blocker.close()


def test_killing_the_parent_leaves_no_server_behind(llama_server_bin: Path, demo_model: Path,
                                                    tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time, threading
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from launcher.process.server import ModelServer, ServerSpec
        def start():  # from a short-lived thread, the case PR_SET_PDEATHSIG gets wrong per-thread
            s = ModelServer(ServerSpec("m", Path({str(demo_model)!r}), n_ctx=512),
                            Path({str(llama_server_bin)!r}), Path({str(tmp_path)!r})).start()
            print(s.pid, flush=True)
        t = threading.Thread(target=start); t.start(); t.join()
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert psutil.pid_exists(child_pid)
        time.sleep(0.5)  # the short-lived thread has exited; the server must still be up
        assert psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and psutil.pid_exists(child_pid):
            try:
                if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        alive = psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, "llama-server outlived its parent"
    finally:
        parent.kill()


def test_the_pool_never_stops_a_server_to_make_room_it_only_asks_the_admission(llama_server_bin: Path,
                                                                                  demo_model: Path,
                                                                                  tmp_path: Path) -> None:
    """Which server stops is the scheduler's decision (tests/test_memory.py, the runtime's admission); a
    refused start leaves every warm server as it was."""
    size = demo_model.stat().st_size
    budget = int(size * 1.5)
    asked: list[int] = []

    def weights_budget(spec: ServerSpec, running: list[ModelServer]) -> None:
        """A fit check that counts each server as its file's size against a fixed budget."""
        asked.append(len(running))
        used = size * len(running)
        if used + size > budget:
            raise InsufficientMemory(spec.model, {"budget": size}, {"budget": max(0, budget - used)})

    pool = ServerPool(llama_server_bin, tmp_path, fit_check=weights_budget)
    try:
        a = pool.acquire(spec_for(demo_model, n_ctx=512))
        pool.release(a)
        with pytest.raises(InsufficientMemory) as err:
            pool.acquire(spec_for(demo_model, n_ctx=768))
        assert err.value.need["budget"] == size
        assert a.is_alive() and pool.servers() == [a] and asked == [0, 1]  # asked once per start, no retry
        assert pool.acquire(spec_for(demo_model, n_ctx=512)) is a  # the warm one still serves
    finally:
        pool.shutdown()


def test_idle_servers_are_stopped_after_the_timeout(llama_server_bin: Path, demo_model: Path,
                                                    tmp_path: Path) -> None:
    pool = ServerPool(llama_server_bin, tmp_path, idle_timeout_s=1000)
    try:
        s = pool.acquire(spec_for(demo_model))
        assert pool.evict_idle(now=time.monotonic() + 5000) == []  # in use: kept
        pool.release(s)
        assert pool.evict_idle(now=time.monotonic() + 5000) == [s]
        assert not s.is_alive() and pool.servers() == []
    finally:
        pool.shutdown()


def test_pool_is_usable_from_asyncio(pool: ServerPool, demo_model: Path) -> None:
    async def go():
        servers = await asyncio.gather(*[pool.aacquire(spec_for(demo_model)) for _ in range(3)])
        return servers

    servers = asyncio.run(go())
    assert len({id(s) for s in servers}) == 1


def test_remote_openai_endpoint_with_key_from_environment(warm_demo_server: ModelServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama-server reached only by URL plays the remote machine (vLLM, Ollama, another box)."""
    server = warm_demo_server
    monkeypatch.setenv("FAR_KEY", server.api_key)
    ep = Endpoint("far", f"{server.base_url}/v1", "completion", os.environ["FAR_KEY"], remote=True)

    async def go():
        async with GenerationClient() as client:
            return await client.generate(ep, GenerationRequest("The sky is", max_tokens=8, seed=3))

    assert asyncio.run(go()).text


def test_missing_binary_error_gives_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "none"))
    with pytest.raises(BinaryNotFound) as err:
        find_llama_server(tmp_path / "configured")
    assert "scripts/build_llama_server.sh" in str(err.value)


def test_binary_lookup_order_is_config_then_env_then_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env_exe = tmp_path / "env-llama-server"
    env_exe.write_text("#!/bin/sh\n")
    env_exe.chmod(0o755)
    monkeypatch.setenv("LLAMA_SERVER", str(env_exe))
    assert find_llama_server(exe) == exe
    assert find_llama_server(None) == env_exe
    exe.chmod(0o644)
    with pytest.raises(BinaryNotFound, match="not executable"):
        find_llama_server(exe)


def test_unrunnable_binary_is_a_start_error(tmp_path: Path, demo_model: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("not a program")
    fake.chmod(0o644)
    with pytest.raises(ServerStartError, match="cannot run"):
        ModelServer(spec_for(demo_model), fake, tmp_path).start()


@pytest.mark.parametrize(
    ("rc", "log", "kind"),
    [
        (1, "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on device 0: "
            "cudaMalloc failed: out of memory", ServerOutOfMemory),
        (-6, "GGML_ASSERT(...) failed\nAborted", ServerCrashed),
        (-11, "", ServerCrashed),
        (1, "gguf_init_from_file_impl: invalid magic characters", InvalidModelFile),
        (1, "couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080", ServerStartError),
    ],
)
def test_exit_classification_from_status_and_log(rc: int, log: str, kind: type) -> None:
    err = classify_exit("m", rc, log, command=["llama-server"], log_path=None)
    assert isinstance(err, kind)
    assert err.command == ["llama-server"] and err.log_tail == log


def test_a_server_stopped_from_another_process_is_said_to_be_stopped_not_crashed(llama_server_bin: Path,
                                                                                  demo_model: Path,
                                                                                  tmp_path: Path) -> None:
    """`chorus stop` in another process sends SIGTERM; llama-server exits 0: "server crashed: exited with
    status 0 … its log may say why it died" was the API's word for it."""
    server = ModelServer(spec_for(demo_model), llama_server_bin, tmp_path).start()
    try:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGTERM)
        assert server.process is not None
        server.process.wait(timeout=30)
        failure = server.failure()
    finally:
        server.stop()
    assert isinstance(failure, ServerStopped) and "stopped from outside" in failure.detail, failure
    assert "crash" not in str(failure).replace("did not crash", "")


def test_error_records_carry_the_class_hint() -> None:
    err = classify_exit("m", 1, "cudaMalloc failed: out of memory", command=["x"], log_path=None)
    record = err.to_dict()
    assert record["type"] == "ServerOutOfMemory" and "n_ctx" in record["hint"]
    assert record["model"] == "m" and record["command"] == ["x"]


def test_request_timeout_bounds_the_whole_answer_not_each_chunk(pool: ServerPool, demo_model: Path) -> None:
    """A server that keeps streaming still times out when the answer as a whole takes too long."""
    from launcher.errors import RequestTimeout

    server = pool.acquire(spec_for(demo_model))
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)
    tokens: list[str] = []

    async def go():
        async with GenerationClient(timeout_s=600) as client:
            return await client.generate(ep, GenerationRequest("Count: 1, 2, 3,", max_tokens=4000),
                                         tokens.append, timeout_s=3.0)  # first tokens in time on a busy machine

    with pytest.raises(RequestTimeout, match="within 3s"):
        asyncio.run(go())
    assert tokens  # it was streaming when the deadline hit
    assert server.is_alive()


@pytest.mark.parametrize(("template", "flags"), [
    ("chatml", ["--no-jinja", "--chat-template", "chatml"]),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", ["--jinja", "--chat-template"]),
    ("/etc/chorus/my.jinja", ["--jinja", "--chat-template-file", "/etc/chorus/my.jinja"]),
])
def test_chat_template_names_text_and_files_get_the_right_flags(template: str, flags: list[str]) -> None:
    from launcher.process.server import chat_template_args

    assert chat_template_args(template)[: len(flags)] == flags
