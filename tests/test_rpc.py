"""llama.cpp RPC workers and remote replicas: the memory query, the layer split, replica choice and retry,
and, on loopback with the real binaries, a model split over two workers, a worker lost mid-run and a
replica killed under a three-call stage."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.worker import security_warning
from launcher.memory.estimate import estimate_rpc_split
from launcher.memory.gguf import read_gguf
from launcher.process.rpc import RpcError, RpcWorkerShort, WorkerProcess, parse_endpoint, query_memory, start_worker
from launcher.process.server import ModelServer, ServerOptions, ServerSpec
from launcher.units import MiB
from orchestrator.config.schema import ModelEntry, PipelineSpec
from orchestrator.engine.fake import FakeBackend
from orchestrator.engine.replicas import ReplicaSet, backoff_s
from orchestrator.engine.run import Engine
from orchestrator.plan.memory import check_rpc_workers, machine_view
from orchestrator.plan.resolve import Machine, Target, build_plan
from tests.conftest import engine_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pipeline(stages: list[dict], **defaults: object) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "t", "defaults": {"max_tokens": 12, "n_ctx": 512, "temperature": 0,
                                                                   "seed": 7, **defaults}, "stages": stages})


# ---------------------------------------------------------------- unit: config, resolution, split


def test_model_entry_refuses_a_worker_that_is_not_host_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        ModelEntry(file="m.gguf", rpc=["10.0.0.2"])
    with pytest.raises(ValueError, match="host:port"):
        ModelEntry(file="m.gguf", rpc=["10.0.0.2:99999"])
    assert ModelEntry(file="m.gguf", rpc=["10.0.0.2:50052", "[::1]:50053"]).rpc == ["10.0.0.2:50052", "[::1]:50053"]


def test_model_entry_rpc_needs_a_local_file_and_replicas_need_none() -> None:
    with pytest.raises(ValueError, match="rpc"):
        ModelEntry(url="http://h:8080/v1", rpc=["h:50052"])
    with pytest.raises(ValueError, match="replicas"):
        ModelEntry(file="m.gguf", replicas=["http://h:8080/v1"])


def test_endpoints_is_another_name_for_replicas_and_the_first_is_the_url() -> None:
    entry = ModelEntry.model_validate({"endpoints": ["http://a:1/v1", "http://b:2/v1"]})
    assert entry.replicas == ["http://a:1/v1", "http://b:2/v1"]
    assert entry.url == "http://a:1/v1"


def test_rpc_workers_go_into_argv_and_the_server_family(tmp_path: Path) -> None:
    spec = ServerSpec("m", tmp_path / "m.gguf", rpc=("127.0.0.1:50052", "127.0.0.1:50053"))
    cmd = ModelServer(spec, Path("llama-server"), tmp_path).command(8080)
    assert cmd[cmd.index("--rpc") + 1] == "127.0.0.1:50052,127.0.0.1:50053"
    assert spec.family != ServerSpec("m", tmp_path / "m.gguf").family
    assert "--rpc" not in ModelServer(ServerSpec("m", tmp_path / "m.gguf"), Path("x"), tmp_path).command(1)


def test_resolution_puts_workers_on_the_spec_and_keeps_gpu_layers_without_a_gpu(config_dir, demo_model) -> None:
    from orchestrator.config.registry import Registry
    from orchestrator.config.schema import load_config

    models = config_dir.models()
    models["models"]["split"] = {"file": demo_model.name, "default_gpu_layers": 99,
                                 "rpc": ["127.0.0.1:50052", "127.0.0.1:50053"]}
    models["models"]["rep"] = {"replicas": ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]}
    config_dir.write_models(models)
    registry = Registry(load_config(config_dir.path))
    plan = build_plan(_pipeline([{"name": "s", "models": ["split", "rep", "gemma3-270m"], "prompt": "x"}]),
                      registry, Machine(has_gpu=False))
    split, rep, plain = (c.target for c in plan.stages[0].calls)
    assert split.server is not None and split.server.rpc == ("127.0.0.1:50052", "127.0.0.1:50053")
    assert split.server.n_gpu_layers == 99  # the layers go to the workers
    assert plain.server is not None and plain.server.n_gpu_layers == 0 and plain.server.rpc == ()
    assert rep.kind == "remote" and rep.urls == ("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1")
    assert plan.to_dict()["servers"][0]["rpc"] == ["127.0.0.1:50052", "127.0.0.1:50053"]


def test_split_follows_the_workers_free_memory(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    spec = ServerSpec("g", demo_model, n_ctx=512, n_gpu_layers=99, rpc=("a:1", "b:2"))
    even = estimate_rpc_split(meta, spec, [1000 * MiB, 1000 * MiB])
    skewed = estimate_rpc_split(meta, spec, [3000 * MiB, 1000 * MiB])
    assert set(even) == {"local", "a:1", "b:2"}
    assert skewed["a:1"]["weights"] > even["a:1"]["weights"] > 0
    assert skewed["b:2"]["weights"] < even["b:2"]["weights"]
    # every layer's weights are somewhere: the split moves them, it does not lose them
    assert sum(p.get("weights", 0) for p in even.values()) == sum(p.get("weights", 0) for p in skewed.values())
    assert even["local"]["weights"] > 0  # the input embeddings stay on this machine
    none = estimate_rpc_split(meta, ServerSpec("g", demo_model, n_ctx=512, n_gpu_layers=0, rpc=("a:1", "b:2")),
                              [1000 * MiB, 1000 * MiB])
    assert not none["a:1"] and not none["b:2"]  # -ngl 0: nothing offloaded, all local


def test_worker_short_error_names_need_and_have_per_worker() -> None:
    exc = RpcWorkerShort("big", {"a:1": 300 * MiB, "b:2": 100 * MiB}, {"a:1": 200 * MiB, "b:2": 500 * MiB})
    assert "worker a:1: needs 300 MiB, 200 MiB free" in str(exc)
    assert "b:2" not in exc.message  # only the short one is named
    assert exc.to_dict()["need"] == {"a:1": 300 * MiB, "b:2": 100 * MiB}


def test_query_of_a_closed_port_names_the_worker() -> None:
    endpoint = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(RpcError, match=endpoint.replace(".", r"\.")):
        query_memory(endpoint, timeout_s=1)


def test_worker_warns_loudly_off_loopback_only() -> None:
    assert security_warning("127.0.0.1", 50052) is None
    assert security_warning("localhost", 50052) is None
    warning = security_warning("0.0.0.0", 50052)
    assert warning is not None and "NO authentication" in warning and "trusted network" in warning
    assert parse_endpoint("[::1]:7") == ("::1", 7)


# ---------------------------------------------------------------- unit: replicas


def test_replicas_take_the_least_outstanding_then_skip_a_down_one() -> None:
    now = [0.0]
    rs = ReplicaSet(["http://a", "http://b", "http://c"], clock=lambda: now[0])
    picks = [rs.choose() for _ in range(3)]
    assert sorted(picks) == ["http://a", "http://b", "http://c"]  # one each before any gets a second
    rs.release("http://a", ok=True)
    assert rs.choose() == "http://a"  # the only one with nothing outstanding
    wait = rs.mark_down("http://b")
    for url in ("http://a", "http://b", "http://c"):
        rs.release(url)
    assert wait == backoff_s(1) and rs.down() == ["http://b"]
    assert {rs.choose() for _ in range(4)} == {"http://a", "http://c"}


def test_a_down_replica_is_probed_again_after_a_growing_backoff() -> None:
    now = [0.0]
    rs = ReplicaSet(["http://a", "http://b"], clock=lambda: now[0])
    first = rs.mark_down("http://a")
    second = rs.mark_down("http://a")
    assert second > first  # the backoff doubles
    assert not rs.due_for_probe("http://a")
    now[0] += second
    assert rs.due_for_probe("http://a") and "http://a" in rs.healthy()
    rs.mark_up("http://a")
    assert not rs.due_for_probe("http://a") and rs.down() == []


def test_with_every_replica_down_the_one_due_back_first_is_tried() -> None:
    now = [0.0]
    rs = ReplicaSet(["http://a", "http://b"], clock=lambda: now[0])
    rs.mark_down("http://a")
    rs.mark_down("http://b")
    rs.mark_down("http://b")
    assert rs.choose() == "http://a"


def _replica_plan() -> object:
    from launcher.process.client import GenerationRequest
    from orchestrator.config.schema import StageSpec
    from orchestrator.plan.resolve import CallPlan, RunPlan, StagePlan

    target = Target("rep", "remote", url="http://a/v1", urls=("http://a/v1", "http://b/v1"))
    stage_spec = StageSpec.model_validate({"name": "s", "models": ["rep", "rep", "rep"], "prompt": "q"})
    calls = tuple(CallPlan(f"rep-{i}", target, GenerationRequest(prompt="")) for i in range(3))
    pipeline = PipelineSpec.model_validate({"name": "t", "stages": [{"name": "s", "models": ["rep"], "prompt": "q"}]})
    return RunPlan(pipeline, "manual", (StagePlan(1, stage_spec, calls, None),))


def test_a_failed_replica_is_marked_down_and_its_call_retried_once_on_another() -> None:
    backend = FakeBackend(failing_urls={"http://a/v1"}).script("rep", "fine", delay_s=0.01)
    run = asyncio.run(Engine(backend).run(_replica_plan(), "q"))  # type: ignore[arg-type]
    calls = run.stages[0].responses
    assert run.status == "completed" and all(c.ok for c in calls)
    assert {c.server for c in calls} == {"http://b/v1"}  # the session records who answered
    assert "http://a/v1" in backend.marked_down


def test_a_call_fails_when_its_retry_fails_too() -> None:
    backend = FakeBackend(failing_urls={"http://a/v1", "http://b/v1"})
    run = asyncio.run(Engine(backend).run(_replica_plan(), "q"))  # type: ignore[arg-type]
    calls = run.stages[0].responses
    assert all(c.status == "failed" and c.error and c.error.type == "ServerCrashed" for c in calls)
    assert len(backend.requests) == 6  # each call: once, then once more, never a third time
    assert set(backend.marked_down) == {"http://a/v1", "http://b/v1"}  # both down after failing


# ---------------------------------------------------------------- integration: loopback workers and replicas


@pytest.fixture
def rpc_bin(llama_server_bin: Path) -> Path:
    from launcher.errors import BinaryNotFound
    from launcher.process.binary import find_rpc_server

    try:
        return find_rpc_server()
    except BinaryNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture
def workers(rpc_bin: Path, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        for i in range(2):
            started.append(start_worker(rpc_bin, "127.0.0.1", _closed_port(), mem_mb=600,
                                        log_path=tmp_path / f"worker{i}.log"))
        yield started
    finally:
        for w in started:
            w.stop()


@pytest.mark.integration
def test_memory_query_against_a_real_worker(workers: list[WorkerProcess]) -> None:
    mem = query_memory(workers[0].endpoint)
    assert mem.version.startswith("7.") and 0 < mem.free_bytes <= mem.total_bytes
    assert mem.worker == workers[0].endpoint


def _with_split_model(config_dir, demo_model: Path, endpoints: list[str]) -> None:
    models = config_dir.models()
    models["models"]["gemma-split"] = {"file": demo_model.name, "default_gpu_layers": 99, "rpc": endpoints}
    config_dir.write_models(models)


@pytest.mark.integration
def test_a_model_split_over_two_workers_answers_as_the_local_server(config_dir, demo_model, workers) -> None:
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime

    _with_split_model(config_dir, demo_model, [w.endpoint for w in workers])
    rt = Runtime(load_config(config_dir.path))
    try:
        spec = _pipeline([{"name": "local", "models": ["gemma3-270m"], "prompt": "The sky is blue because"},
                          {"name": "split", "models": ["gemma-split"], "prompt": "The sky is blue because"}])
        plan = rt.plan(spec)
        rows = machine_view(plan, None)
        assert [r.kind for r in rows] == ["local", "rpc", "rpc"]
        assert all(r.models == ["gemma-split"] and (r.need_bytes or 0) > 0 for r in rows[1:])
        record, _ = engine_run(rt, spec)
        local, split = (s.responses[0] for s in record.stages)
        assert local.ok and split.ok, (local.error, split.error)
        assert split.text == local.text and split.text.strip()
        assert any("--rpc" in s.command(0) for s in rt.running_servers())
    finally:
        rt.close()


@pytest.mark.integration
def test_a_worker_short_of_memory_is_refused_with_need_and_have(config_dir, demo_model, workers) -> None:
    spec = ServerSpec("gemma-split", demo_model, n_ctx=512, n_gpu_layers=99, rpc=tuple(w.endpoint for w in workers))
    check_rpc_workers(spec)  # fits: the workers report this machine's free memory
    from unittest import mock

    from launcher.process.rpc import WorkerMemory

    small = WorkerMemory(workers[0].endpoint, "7.0.0", 10 * MiB, 10 * MiB)
    with mock.patch("launcher.process.rpc.query_memory", return_value=small), pytest.raises(RpcWorkerShort) as info:
        check_rpc_workers(spec)
    assert info.value.have[workers[0].endpoint] == 10 * MiB and info.value.need[workers[0].endpoint] > 10 * MiB


@pytest.mark.integration
def test_a_worker_killed_mid_run_names_the_worker_and_the_run_goes_on(config_dir, demo_model, workers) -> None:
    from orchestrator.config.schema import load_config
    from orchestrator.engine.events import Token
    from orchestrator.runtime import Runtime

    _with_split_model(config_dir, demo_model, [w.endpoint for w in workers])
    rt = Runtime(load_config(config_dir.path))
    victim = workers[1]

    def kill_on_first_split_token(event: object) -> None:
        if isinstance(event, Token) and getattr(event, "label", None) == "gemma-split" \
                and victim.process.poll() is None:
            victim.kill()

    try:
        spec = _pipeline([{"name": "both", "prompt": "Tell a story:", "execution": "sequential",
                           "models": ["gemma-split", {"model": "smollm2-135m", "max_tokens": 12}]}],
                         max_tokens=200)  # the split model still generating when its worker is killed
        record, _ = engine_run(rt, spec, observers=[kill_on_first_split_token])
        split, other = record.stages[0].responses
        assert split.status == "failed" and split.error is not None
        assert victim.endpoint in split.error.message, split.error
        assert other.ok and other.text
        assert record.status == "partial"
        # the next use of the model refuses before starting, naming the dead worker
        again, _ = engine_run(rt, _pipeline([{"name": "again", "models": ["gemma-split"], "prompt": "Hi"}]))
        error = again.stages[0].responses[0].error
        assert error and error.type == "RpcError" and victim.endpoint in error.message
    finally:
        rt.close()


@pytest.mark.integration
def test_two_replicas_share_a_stage_and_one_killed_the_stage_completes(
        config_dir, demo_model, llama_server_bin, tmp_path, monkeypatch) -> None:
    from orchestrator.config.schema import load_config
    from orchestrator.engine.events import Token
    from orchestrator.runtime import Runtime

    servers: list[ModelServer] = []
    try:
        for _ in range(2):
            server = ModelServer(ServerSpec("gemma3-270m", demo_model, n_ctx=512, slots=2, threads=1),
                                 llama_server_bin, tmp_path / "logs", ServerOptions(startup_timeout_s=120))
            server.api_key = "replica-test-key"
            servers.append(server.start())
        monkeypatch.setenv("REPLICA_KEY", "replica-test-key")
        urls = [f"{s.base_url}/v1" for s in servers]
        models = config_dir.models()
        models["models"]["gemma-rep"] = {"replicas": urls, "api_key_env": "REPLICA_KEY", "mode": "completion"}
        config_dir.write_models(models)
        rt = Runtime(load_config(config_dir.path))
        victim = servers[0]

        def kill_on_first_token(event: object) -> None:
            if isinstance(event, Token) and victim.is_alive():
                victim.process.kill()  # type: ignore[union-attr]

        try:
            spec = _pipeline([{"name": "three", "prompt": "Water boils at",
                               "models": [{"model": "gemma-rep", "label": f"r{i}"} for i in range(3)]}],
                             max_tokens=24)
            plan = rt.plan(spec)
            assert [r.machine for r in machine_view(plan, None) if r.kind == "remote"] == urls
            record, _ = engine_run(rt, spec, observers=[kill_on_first_token])
            calls = record.stages[0].responses
            assert record.status == "completed", [c.error for c in calls]
            assert all(c.ok and c.text for c in calls)
            assert {c.server for c in calls} == {urls[1]}  # recorded: the replica that answered
        finally:
            rt.close()
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()


@pytest.mark.integration
def test_a_worker_capped_below_its_share_fails_the_load_naming_the_workers(config_dir, demo_model, rpc_bin,
                                                                           tmp_path) -> None:
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime

    capped: list[WorkerProcess] = []
    rt = None
    try:
        for i in range(2):  # 20 MiB each (`chorus worker --mem 20`): far below a share of the demo model
            capped.append(start_worker(rpc_bin, "127.0.0.1", _closed_port(), mem_mb=20,
                                       log_path=tmp_path / f"capped{i}.log"))
        _with_split_model(config_dir, demo_model, [w.endpoint for w in capped])
        rt = Runtime(load_config(config_dir.path))
        spec = _pipeline([{"name": "s", "models": ["gemma-split", "smollm2-135m"], "prompt": "Hi",
                           "execution": "sequential"}])
        record, _ = engine_run(rt, spec)
        split, other = record.stages[0].responses
        error = split.error
        assert split.status == "failed" and error and error.type == "RpcLoadFailed", error
        assert all(w.endpoint in error.message for w in capped) and "--mem" in (error.hint or "")
        assert other.ok and record.status == "partial"
        assert all(w.process.poll() is None for w in capped)  # the workers refused the buffer and live on
    finally:
        if rt is not None:
            rt.close()
        for w in capped:
            w.stop()
