"""The API's admission: a limit of requests going at once, a bounded FIFO queue behind it, 429 with a
Retry-After worked out from recent durations when the queue is full, and nothing lost on the way."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from api.admission import Admission
from api.errors import TooManyRuns
from orchestrator.config.schema import load_config
from orchestrator.engine.fake import FakeBackend, Script
from orchestrator.history.store import SessionStore
from tests import test_api
from tests.test_api import chat, make_client

config = test_api.config  # the same fixture: two remote models, a one-stage pipeline 'solo'


def test_requests_over_the_limit_wait_their_turn_in_order() -> None:
    async def scenario() -> list[str]:
        gate = Admission(limit=1, queue=3)
        order: list[str] = []

        async def request(name: str, hold_s: float) -> None:
            await gate.acquire()
            order.append(name)
            await asyncio.sleep(hold_s)
            gate.release(hold_s)

        first = asyncio.ensure_future(request("a", 0.05))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(request(n, 0.01)) for n in "bcd"]
        await asyncio.sleep(0)
        assert (gate.active, gate.waiting) == (1, 3)
        await asyncio.gather(first, *rest)
        assert (gate.active, gate.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c", "d"]


def test_a_full_queue_refuses_with_a_retry_after_from_recent_durations() -> None:
    async def scenario() -> TooManyRuns:
        gate = Admission(limit=2, queue=2)
        for took in (4.0, 6.0, 5.0):
            await gate.acquire()
            gate.release(took)
        for _ in range(2):
            await gate.acquire()  # both places taken
        waiting = [asyncio.ensure_future(gate.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(TooManyRuns) as refused:
            await gate.acquire()
        for w in waiting:
            w.cancel()
        return refused.value

    error = asyncio.run(scenario())
    # two ahead in the queue plus this one, two at a time, at the median 5 s: about 7.5 s
    assert (error.limit, error.queued, error.retry_after_s) == (2, 2, 8)


def test_a_request_that_leaves_the_queue_gives_up_its_place() -> None:
    async def scenario() -> tuple[int, int, bool]:
        gate = Admission(limit=1, queue=2)
        await gate.acquire()
        leaver = asyncio.ensure_future(gate.acquire())
        stayer = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        leaver.cancel()
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.release()
        await asyncio.wait_for(stayer, 1)
        return gate.active, gate.waiting, leaver.cancelled()

    assert asyncio.run(scenario()) == (1, 0, True)


def test_a_place_handed_to_a_request_that_just_left_goes_to_the_next() -> None:
    async def scenario() -> tuple[int, int]:
        gate = Admission(limit=1, queue=2)
        await gate.acquire()
        leaver = asyncio.ensure_future(gate.acquire())
        stayer = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        gate.release()   # the place goes to `leaver`...
        leaver.cancel()  # ...which leaves before it wakes up
        await asyncio.wait_for(stayer, 1)
        return gate.active, gate.waiting

    assert asyncio.run(scenario()) == (1, 0)


def test_model_requests_beyond_the_limit_wait_in_their_servers_queue_up_to_the_same_bound() -> None:
    async def scenario() -> tuple[tuple[int, int], TooManyRuns, TooManyRuns]:
        gate = Admission(limit=2, queue=3)
        for _ in range(5):
            await gate.acquire(ahead=True)  # 2 going, 3 sent ahead to the server's queue: none waits here
        counts = (gate.going, gate.waiting)
        with pytest.raises(TooManyRuns) as model_refused:
            await gate.acquire(ahead=True)
        with pytest.raises(TooManyRuns) as run_refused:  # a pipeline run too: the queue is full
            await gate.acquire()
        return counts, model_refused.value, run_refused.value

    counts, model_refused, run_refused = asyncio.run(scenario())
    assert counts == (2, 3)
    assert model_refused.queued == run_refused.queued == 3


def test_a_run_waiting_behind_model_requests_sent_ahead_starts_only_when_fewer_than_the_limit_go() -> None:
    async def scenario() -> list[tuple[int, bool]]:
        gate = Admission(limit=1, queue=4)
        await gate.acquire(ahead=True)
        await gate.acquire(ahead=True)  # waits in the server's queue
        run = asyncio.ensure_future(gate.acquire())  # a pipeline run waits here, behind them
        await asyncio.sleep(0)
        model = asyncio.ensure_future(gate.acquire(ahead=True))  # in line behind the run: no overtaking
        await asyncio.sleep(0)
        seen = [(gate.waiting, run.done())]
        gate.release()  # the first model request is answered; the second now goes: still one going
        await asyncio.sleep(0)
        seen.append((gate.waiting, run.done()))
        gate.release()  # nothing going: the run starts, and the model request behind it is sent ahead
        await asyncio.sleep(0)
        seen.append((gate.waiting, run.done() and model.done()))
        return seen

    assert asyncio.run(scenario()) == [(3, False), (2, False), (1, True)]


def test_concurrent_pipeline_requests_beyond_the_limit_queue_and_all_get_answers(config: Path) -> None:
    backend = FakeBackend(default=Script("an answer", delay_s=0.3))
    results: list[int] = []
    with make_client(config, backend, max_runs=2, max_queue=8) as client:
        def post() -> None:
            results.append(client.post("/v1/chat/completions", json=chat("chorus/solo")).status_code)

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        peak_waiting = 0
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 20:
            peak_waiting = max(peak_waiting, client.app.state.limiter.waiting)
            assert client.app.state.limiter.active <= 2
            time.sleep(0.01)
        for t in threads:
            t.join()
        health = client.get("/health").json()
    assert results == [200] * 6
    assert peak_waiting >= 1  # some did wait rather than being refused
    assert (health["queued"], health["max_queue"], health["refused"]) == (0, 8, 0)
    sessions = SessionStore(load_config(config).sessions_dir).list()
    assert len(sessions) == 6  # one session per accepted request: nothing lost


def test_before_anything_finished_retry_after_grows_with_how_long_the_first_ones_have_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold servers: the first runs take a server start each. A constant 1 s had 15 of 20 `openai` clients
    (5 retries each) give up after 5 s while the first runs took 7-20 s."""
    import api.admission as admission

    now = [100.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])

    async def scenario() -> list[int]:
        gate = Admission(limit=2, queue=2)
        for _ in range(2):
            await gate.acquire()  # both going, nothing finished yet
        waiting = [asyncio.ensure_future(gate.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        told = []
        for age in (0.0, 3.0, 12.0):
            now[0] = 100.0 + age
            with pytest.raises(TooManyRuns) as refused:
                await gate.acquire()
            told.append(refused.value.retry_after_s)
        for w in waiting:
            w.cancel()
        return told

    assert asyncio.run(scenario()) == [1, 5, 18]  # (2 waiting + 1) / 2 places = 1.5 rounds of the age so far


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_still_answer(config: Path) -> None:
    backend = FakeBackend(default=Script("slow answer", delay_s=0.8))
    statuses: list[int] = []
    with make_client(config, backend, max_runs=1, max_queue=1) as client:
        def post() -> None:
            statuses.append(client.post("/v1/chat/completions", json=chat("chorus/solo")).status_code)

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        gate: Any = client.app.state.limiter
        while (gate.active, gate.waiting) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = client.post("/v1/chat/completions", json=chat("chorus/solo"))
        for t in threads:
            t.join()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_runs" and "queue is full" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert sorted(statuses) == [200, 200]
