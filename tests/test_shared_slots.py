"""Concurrent requests, runs and eval items share the warm servers' slots, on the real llama-server.

A server is sized for the runs that may go at once (the API's max_runs, an eval's concurrency), as many
slots as memory allows and never past it (app.yaml's server.max_slots caps it); a warm server is reused
busy or not, and restarted bigger only while idle and when the bigger one fits.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from orchestrator.app import Chorus
from orchestrator.history.store import SessionStore
from tests import yamlfile
from tests.conftest import ConfigDir
from tests.test_memory_waves import need_mib, set_budget

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
LOCAL = "http://127.0.0.1"


def ask(client: TestClient, model: str, i: int, out: list[int]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": f"Say hello number {i}."}],
            "max_tokens": 8, "temperature": 0}
    out.append(client.post("/v1/chat/completions", json=body).status_code)


def at_once(client: TestClient, model: str, n: int) -> list[int]:
    statuses: list[int] = []
    threads = [threading.Thread(target=ask, args=(client, model, i, statuses)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def servers_of(door: Chorus, model: str) -> list[Any]:
    return [s for s in door.running_servers() if s.model == model]


def test_concurrent_requests_for_a_model_share_one_server_sized_for_them(config_dir: ConfigDir,
                                                                          llama_server_bin: Path) -> None:
    door = Chorus.from_dir(config_dir.path)
    try:
        with TestClient(create_app(door, ApiSettings(max_runs=3)), base_url=LOCAL) as client:
            statuses = at_once(client, MODEL, 6)
            assert statuses == [200] * 6
            (server,) = servers_of(door, MODEL)
            assert server.spec.slots == 3  # max_runs 3: one slot per request going at once
            assert door.runtime.pool.starts == 1
            metrics = client.get("/health").json()
            assert (metrics["max_runs"], metrics["runs"], metrics["queued"]) == (3, 0, 0)
            # one model alone on the cores keeps libgomp's spinning (launcher/process/server.py: OMP_SPIN_ENV)
            assert server.pid is not None and "GOMP_SPINCOUNT" not in psutil.Process(server.pid).environ()
            # a second model's server may be busy beside it: short spinning
            assert at_once(client, "gemma3-270m", 1) == [200]
            (other,) = servers_of(door, "gemma3-270m")
            assert other.pid is not None and psutil.Process(other.pid).environ().get("GOMP_SPINCOUNT") == "1000"
    finally:
        door.close()


def write_pair_pipeline(config_dir: ConfigDir, *, max_tokens: int) -> None:
    """`chorus/pair`: gemma drafts, smollm2 refines (two servers, one after the other in each run)."""
    spec = {"defaults": {"max_tokens": max_tokens, "temperature": 0, "n_ctx": 1024},
            "stages": [{"name": "draft", "models": ["gemma3-270m"], "prompt": "Q: {{ question }}\nA:"},
                       {"name": "refine", "models": [MODEL]}]}
    pipelines = config_dir.path / "pipelines"
    pipelines.mkdir(exist_ok=True)
    (pipelines / "pair.yaml").write_text(yamlfile.dump(spec))


def test_servers_of_a_pipeline_with_two_models_spin_short_when_runs_share_them(config_dir: ConfigDir,
                                                                              llama_server_bin: Path) -> None:
    """Concurrent runs of a two-model pipeline keep two servers busy at once: each starts with short
    OpenMP spinning, the first one too (the plan names both before either starts)."""
    door = Chorus.from_dir(config_dir.path)
    try:
        write_pair_pipeline(config_dir, max_tokens=4)
        with TestClient(create_app(door, ApiSettings(max_runs=2)), base_url=LOCAL) as client:
            assert at_once(client, "chorus/pair", 1) == [200]
        servers = door.running_servers()
        assert sorted(s.model for s in servers) == ["gemma3-270m", MODEL]
        assert all(s.pid is not None and psutil.Process(s.pid).environ().get("GOMP_SPINCOUNT") == "1000"
                   for s in servers)
    finally:
        door.close()


def test_concurrent_pipeline_runs_reuse_one_warm_server_per_model(config_dir: ConfigDir,
                                                                 llama_server_bin: Path) -> None:
    pipelines = config_dir.path / "pipelines"
    pipelines.mkdir(exist_ok=True)
    (pipelines / "two.yaml").write_text(yamlfile.dump({
        "defaults": {"max_tokens": 8, "temperature": 0, "n_ctx": 1024},
        "stages": [{"name": "draft", "models": [MODEL]},
                   {"name": "refine", "models": [MODEL], "prompt": "Improve: {previous}"}]}))
    door = Chorus.from_dir(config_dir.path)
    try:
        with TestClient(create_app(door, ApiSettings(max_runs=2)), base_url=LOCAL) as client:
            statuses = at_once(client, "chorus/two", 4)
        assert statuses == [200] * 4
        (server,) = servers_of(door, MODEL)
        assert server.spec.slots == 2  # sized for the two runs that go at once
        assert door.runtime.pool.starts == 1  # every stage of every run on the one warm server
        assert len(SessionStore(door.config.sessions_dir).list()) == 4
    finally:
        door.close()


def test_a_models_requests_and_pipeline_runs_of_it_share_one_server(config_dir: ConfigDir,
                                                                       llama_server_bin: Path) -> None:
    """The proxy's server and a pipeline's are one family (the same threads: every core for a server that runs
    alone), so requests and runs batch on one server's slots rather than loading the model twice."""
    pipelines = config_dir.path / "pipelines"
    pipelines.mkdir(exist_ok=True)
    (pipelines / "one.yaml").write_text(yamlfile.dump({
        "defaults": {"max_tokens": 4, "temperature": 0}, "stages": [{"name": "answer", "models": [MODEL]}]}))
    door = Chorus.from_dir(config_dir.path)
    try:
        with TestClient(create_app(door, ApiSettings(max_runs=2)), base_url=LOCAL) as client:
            assert at_once(client, MODEL, 2) == [200, 200]
            assert at_once(client, "chorus/one", 2) == [200, 200]
        (server,) = servers_of(door, MODEL)
        assert door.runtime.pool.starts == 1 and server.spec.threads == door.runtime.machine().cores
    finally:
        door.close()


def test_an_idle_warm_server_grows_its_slots_when_more_fit_and_never_past_the_budget(
        config_dir: ConfigDir, llama_server_bin: Path) -> None:
    door = Chorus.from_dir(config_dir.path)
    try:
        one = door.runtime.server_spec(MODEL, n_ctx=4096)
        with door.runtime.pool.lease(one):
            pass  # a 1-slot server, warm and idle: what a single run leaves
        door.expect_runs(4)
        assert door.runtime.place(one).slots == 4  # idle and a 4-slot server fits: restarted bigger
    finally:
        door.close()
    two, three = need_mib(config_dir, MODEL, 4096, 2), need_mib(config_dir, MODEL, 4096, 3)
    set_budget(config_dir, int((two + three) / 2))  # room for two slots, not three
    door = Chorus.from_dir(config_dir.path)
    try:
        door.expect_runs(4)
        placed = door.runtime.place(door.runtime.server_spec(MODEL, n_ctx=4096))
        assert placed.slots == 2
    finally:
        door.close()


def test_a_request_to_a_warm_server_nothing_would_replace_is_leased_without_a_memory_decision(
        config_dir: ConfigDir, llama_server_bin: Path) -> None:
    """The proxy's hot path: no scheduling (about 5 ms of CPU per request, taken from the server's cores)
    while the warm server is the one placing would pick; an idle smaller one still goes through `place`."""
    door = Chorus.from_dir(config_dir.path)
    try:
        spec = door.runtime.server_spec(MODEL)  # the proxy's spec for the model
        assert door.runtime.lease_warm(spec) is None  # nothing warm yet
        door.expect_runs(2)
        with door.runtime.pool.lease(door.runtime.place(spec)) as warm:
            assert warm.spec.slots == 2
        leased = door.runtime.lease_warm(spec)
        assert leased is warm
        door.runtime.pool.release(leased)
        door.expect_runs(4)  # more slots wanted, and the 2-slot server is idle: placing decides again
        assert door.runtime.lease_warm(spec) is None
        with TestClient(create_app(door, ApiSettings(max_runs=4)), base_url=LOCAL) as client:
            assert at_once(client, MODEL, 4) == [200] * 4
        (server,) = servers_of(door, MODEL)
        assert server.spec.slots == 4 and door.runtime.pool.starts == 2  # the idle 2-slot one restarted bigger
    finally:
        door.close()


def test_an_eval_goes_as_many_items_at_once_as_fit(config_dir: ConfigDir, llama_server_bin: Path) -> None:
    door = Chorus.from_dir(config_dir.path)
    try:
        pipeline = door.eval_pipeline(mode="base", overrides=["defaults.n_ctx=1024"])
        roomy = door.eval_spec(pipeline).concurrency
        assert roomy == door.config.app.server.max_slots  # plenty of memory: capped by server.max_slots
        assert door.eval_spec(pipeline, concurrency=2).concurrency == 2  # asked for: taken as it is
    finally:
        door.close()
    # n_ctx 8192: each smollm2 slot costs about 180 MiB. Room for the three reviewers' 3-slot server (one
    # item at a time), not for the 4-slot server two items at once would want
    set_budget(config_dir, int(need_mib(config_dir, "smollm2-135m", 8192, 3)) + 20)
    tight = Chorus.from_dir(config_dir.path)
    try:
        pipeline = tight.eval_pipeline(mode="base", overrides=["defaults.n_ctx=8192"])
        assert tight.eval_spec(pipeline).concurrency == 1
    finally:
        tight.close()


def compute_intervals(door: Chorus) -> list[tuple[str, str, float, float]]:
    """(session, server, start, end) of every model call saved: from the client's own clock of the call
    (total_s, request sent to last token) back from when the engine saw it end."""
    store = SessionStore(door.config.sessions_dir)
    out = []
    for row in store.list():
        for stage in store.load(row["id"]).stages:
            for r in stage.responses:
                if r.status == "ok" and r.finished_at and r.total_s and r.server:
                    out.append((row["id"], r.server, r.finished_at - r.total_s, r.finished_at))
    return out


def test_concurrent_runs_of_a_two_model_pipeline_take_turns_at_the_cores(config_dir: ConfigDir,
                                                                          llama_server_bin: Path) -> None:
    """On the CPU, three runs of gemma -> smollm2 at once (warm servers, as an eval or the API meets them):
    a model's calls of different runs compute together on its slots, and the two servers never compute at
    the same time (side by side they slice 2 cores: 60-70 tok/s together against 75 and 120 alone)."""
    door = Chorus.from_dir(config_dir.path)
    try:
        write_pair_pipeline(config_dir, max_tokens=24)
        with TestClient(create_app(door, ApiSettings(max_runs=3)), base_url=LOCAL) as client:
            assert at_once(client, "chorus/pair", 1) == [200]  # both servers warm
            assert at_once(client, "chorus/pair", 3) == [200] * 3
            assert at_once(client, "chorus/pair", 3) == [200] * 3
        assert door.runtime.pool.starts == 2 and door.runtime.cpu_gate.busy() == {}
        calls = compute_intervals(door)
        assert len(calls) == 14
        crossed = [(a, b) for a in calls for b in calls
                   if a[1] < b[1] and a[2] < b[3] - 0.05 and b[2] < a[3] - 0.05]
        assert not crossed, crossed
        batched = [(a, b) for a in calls for b in calls
                   if a[0] < b[0] and a[1] == b[1] and a[2] < b[3] and b[2] < a[3]]
        assert batched  # runs' calls of one model overlapped: they shared its slots
    finally:
        door.close()


def stream_interval(client: TestClient, i: int, out: list[tuple[float, float]]) -> None:
    """One proxied chat answer, streamed: (first token, last token) on the wall clock."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count from {i} to {i + 20}."}],
            "max_tokens": 24, "temperature": 0, "stream": True}
    seen: list[float] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                seen.append(time.time())
    assert seen
    out.append((seen[0], seen[-1]))


def test_proxied_requests_take_turns_at_the_cores_with_pipeline_runs(config_dir: ConfigDir,
                                                                     llama_server_bin: Path) -> None:
    """Proxied requests for smollm2 and two runs of a gemma pipeline, at once (warm servers): the two servers
    never compute at the same time, and the proxied requests batch on their server's slots."""
    door = Chorus.from_dir(config_dir.path)
    try:
        (config_dir.path / "pipelines").mkdir(exist_ok=True)
        (config_dir.path / "pipelines" / "solo.yaml").write_text(yamlfile.dump({
            "defaults": {"max_tokens": 24, "temperature": 0, "n_ctx": 1024},
            "stages": [{"name": "draft", "models": ["gemma3-270m"], "prompt": "Q: {{ question }}\nA:"}]}))
        proxied: list[tuple[float, float]] = []
        with TestClient(create_app(door, ApiSettings(max_runs=3)), base_url=LOCAL) as client:
            assert at_once(client, "chorus/solo", 1) == [200] and at_once(client, MODEL, 1) == [200]  # warm
            statuses: list[int] = []
            threads = [threading.Thread(target=ask, args=(client, "chorus/solo", i, statuses)) for i in range(2)]
            threads += [threading.Thread(target=stream_interval, args=(client, i, proxied)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert statuses == [200, 200] and len(proxied) == 3
        assert door.runtime.pool.starts == 2 and door.runtime.cpu_gate.busy() == {}
        drafts = [(start, end) for _, _, start, end in compute_intervals(door)]
        assert len(drafts) == 3
        crossed = [(d, p) for d in drafts for p in proxied if d[0] < p[1] - 0.05 and p[0] < d[1] - 0.05]
        assert not crossed, crossed
        assert any(a[0] < b[1] and b[0] < a[1] for a in proxied for b in proxied if a < b)  # they batched
    finally:
        door.close()
