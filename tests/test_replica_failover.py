"""Replica failover in pieces, without a network (tests/test_netns_failover.py runs it over one): a replica
back from its backoff is probed by one caller only, the state outlives a run, and a connection that never
opens to a remote is "no answer" (another replica may take the call), within half the deadline."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from launcher.errors import RequestTimeout, ServerUnreachable
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from orchestrator.engine.replicas import ReplicaSet, shared


def test_only_one_caller_probes_a_replica_back_from_its_backoff() -> None:
    now = [0.0]
    rs = ReplicaSet(["http://a", "http://b"], clock=lambda: now[0])
    now[0] += rs.mark_down("http://a")
    assert rs.choose() == "http://b"  # a tie goes to the healthy one
    assert rs.choose() == "http://a" and rs.due_for_probe("http://a")  # the least busy, back from its backoff
    assert {rs.choose() for _ in range(3)} == {"http://b"}  # the others keep away while it is checked
    rs.release("http://a")
    rs.mark_down("http://a")  # the probe failed: down again, for longer
    assert rs.choose() == "http://b"


def test_a_probe_given_up_frees_the_replica_for_the_next_caller() -> None:
    now = [0.0]
    rs = ReplicaSet(["http://a", "http://b"], clock=lambda: now[0])
    now[0] += rs.mark_down("http://a")
    assert rs.choose() == "http://b"
    assert rs.choose() == "http://a"
    rs.release("http://a")  # the caller went away (cancelled) before probing
    assert rs.choose() == "http://a" and rs.due_for_probe("http://a")


def test_calls_caught_by_one_outage_count_as_one_failure() -> None:
    now = [0.0]
    rs = ReplicaSet(["http://a", "http://b"], clock=lambda: now[0])
    begun = [now[0]] * 4  # four calls under way on a when its link goes
    now[0] = 3.0
    first = rs.mark_down("http://a", since=begun[0])
    now[0] = 10.0  # the other three time out later, of the same outage
    assert [rs.mark_down("http://a", since=b) for b in begun[1:]] == [0.0, 0.0, 0.0]
    assert rs.replicas[0].failures == 1 and first == 1.0
    assert rs.mark_down("http://a", since=now[0]) == 2.0  # a call begun after the mark-down: a new failure


def test_replica_state_is_kept_for_the_process_not_the_run() -> None:
    urls = ["http://shared-a.test/v1", "http://shared-b.test/v1"]
    shared(urls).mark_down(urls[0])
    assert shared(list(urls)) is shared(urls)  # the next run (the API's next request) gets the same set
    assert shared(urls).down() == [urls[0]]
    assert shared(urls[::-1]) is not shared(urls)  # another model's list is its own


def _client_that_cannot_connect(timeout_s: float) -> GenerationClient:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    client = GenerationClient(timeout_s=timeout_s)
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(refuse), timeout=client.timeout)
    return client


def test_a_remote_that_never_connects_is_no_answer_so_another_replica_may_take_the_call() -> None:
    client = _client_that_cannot_connect(10)
    endpoint = Endpoint("rep", "http://10.213.9.2:8080/v1", "completion", None, remote=True)
    with pytest.raises(ServerUnreachable, match=r"no connection within 5s at http://10\.213\.9\.2:8080"):
        asyncio.run(client.generate(endpoint, GenerationRequest(prompt="hi", max_tokens=1)))


def test_a_local_server_that_never_connects_still_times_out() -> None:
    client = _client_that_cannot_connect(10)
    endpoint = Endpoint("m", "http://127.0.0.1:9", "completion", None)
    with pytest.raises(RequestTimeout):  # the engine replaces a hung local server on a timeout
        asyncio.run(client.generate(endpoint, GenerationRequest(prompt="hi", max_tokens=1)))


def test_connecting_takes_at_most_half_the_deadline() -> None:
    assert GenerationClient(timeout_s=10).timeout.connect == 5
    assert GenerationClient(timeout_s=600).timeout.connect == 10


def test_a_model_asked_for_directly_through_the_api_fails_over_to_a_replica_that_answers(config_dir) -> None:
    """`chorus api` forwarding a `url:` model with `replicas:` (not only pipelines): the replica that cannot be
    reached is marked down and the request goes to the next one; the next request goes there straight away."""
    import json
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from api.proxy import ModelProxy
    from orchestrator.app import Chorus

    served: list[str] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # an OpenAI-compatible server's answer, as llama-server gives it
            self.rfile.read(int(self.headers.get("content-length") or 0))
            served.append(self.path)
            body = json.dumps({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "up"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    live = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=live.serve_forever, args=(0.02,), daemon=True).start()  # shutdown() waits a poll
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed once the block ends: nothing listens there
    models = config_dir.models()
    dead_url, live_url = f"http://127.0.0.1:{dead}/v1", f"http://127.0.0.1:{live.server_port}/v1"
    models["models"]["rep"] = {"url": dead_url, "replicas": [live_url]}
    config_dir.write_models(models)

    async def ask(proxy: ModelProxy) -> tuple[str, int]:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with proxy.open("rep", "chat/completions", body) as reply:
            return reply.upstream.base_url, reply.response.status_code

    async def twice() -> list[tuple[str, int]]:
        with Chorus.from_dir(config_dir.path) as chorus:
            proxy = ModelProxy(chorus)
            try:
                return [await ask(proxy), await ask(proxy)]
            finally:
                await proxy.aclose()

    try:
        answers = asyncio.run(twice())
    finally:
        live.shutdown()
    assert answers == [(live_url, 200), (live_url, 200)]
    assert served == ["/v1/chat/completions"] * 2
    assert shared([dead_url, live_url]).down() == [dead_url]
