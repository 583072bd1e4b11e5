"""Turns at the CPU (launcher/process/gate.py): the rules, on a gate with no server behind it.

The end-to-end proof, real servers of two models under concurrent runs, is in test_shared_slots.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from launcher.process.gate import CpuGate


class Trace:
    """Which calls compute when: (event, name) in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.release: dict[str, asyncio.Event] = {}

    async def call(self, gate: CpuGate, name: str, owner: str, server: str, threads: int = 2) -> None:
        self.release[name] = asyncio.Event()
        async with gate.turn(owner, server, threads):
            self.events.append(("in", name))
            await self.release[name].wait()
            self.events.append(("out", name))

    def inside(self) -> set[str]:
        now: set[str] = set()
        for what, name in self.events:
            (now.add if what == "in" else now.discard)(name)
        return now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_calls_of_one_server_compute_together_and_another_servers_call_waits_for_the_cores() -> None:
    async def go() -> None:
        gate, t = CpuGate(cores=2), Trace()
        tasks = [asyncio.create_task(t.call(gate, f"a{i}", f"run{i}", "gemma")) for i in range(3)]
        await settle()
        assert t.inside() == {"a0", "a1", "a2"}  # one server, three streams: they batch
        other = asyncio.create_task(t.call(gate, "b", "run9", "smollm2"))
        await settle()
        assert "b" not in t.inside() and gate.waiting() == 1
        for name in ("a0", "a1"):
            t.release[name].set()
        await settle()
        assert "b" not in t.inside()  # the cores are free only when the last gemma call is done
        t.release["a2"].set()
        await settle()
        assert t.inside() == {"b"}
        t.release["b"].set()
        await asyncio.gather(*tasks, other)
        assert gate.busy() == {} and gate.waiting() == 0

    asyncio.run(go())


def test_a_waiting_call_is_not_overtaken_by_later_calls_of_the_busy_server() -> None:
    """Otherwise a stream of requests for one model would starve the other model's."""
    async def go() -> None:
        gate, t = CpuGate(cores=2), Trace()
        first = asyncio.create_task(t.call(gate, "a0", "run0", "gemma"))
        await settle()
        b = asyncio.create_task(t.call(gate, "b", "run1", "smollm2"))
        await settle()
        late = asyncio.create_task(t.call(gate, "a1", "run2", "gemma"))
        late2 = asyncio.create_task(t.call(gate, "b2", "run3", "smollm2"))
        await settle()
        assert t.inside() == {"a0"}
        t.release["a0"].set()
        await settle()
        # the first waiter goes, and every waiter of its server with it; the later gemma call waits its turn
        assert t.inside() == {"b", "b2"}
        t.release["b"].set()
        t.release["b2"].set()
        await settle()
        assert t.inside() == {"a1"}
        t.release["a1"].set()
        await asyncio.gather(first, b, late, late2)

    asyncio.run(go())


def test_servers_whose_threads_fit_in_the_cores_compute_side_by_side() -> None:
    """Servers given a share of the cores (models.yaml `threads:`) do not slice each other's."""
    async def go() -> None:
        gate, t = CpuGate(cores=8), Trace()
        tasks = [asyncio.create_task(t.call(gate, n, f"run-{n}", n, threads=4)) for n in ("a", "b", "c")]
        await settle()
        assert t.inside() == {"a", "b"}  # 4 + 4 threads on 8 cores; a third 4 would not fit
        t.release["a"].set()
        await settle()
        assert t.inside() == {"b", "c"}
        for n in ("b", "c"):
            t.release[n].set()
        await asyncio.gather(*tasks)

    asyncio.run(go())


def test_a_runs_parallel_stage_keeps_its_servers_side_by_side() -> None:
    """The plan split the cores among a parallel stage's servers (one thread each here): one run's calls go
    together, even past the cores, when its first call has its turn."""
    async def go() -> None:
        gate, t = CpuGate(cores=2), Trace()
        other = asyncio.create_task(t.call(gate, "x", "other-run", "x", threads=2))
        await settle()
        mine = [asyncio.create_task(t.call(gate, m, "run", m, threads=1)) for m in ("a", "b", "c")]
        await settle()
        assert t.inside() == {"x"}
        t.release["x"].set()
        await settle()
        assert t.inside() == {"a", "b", "c"}
        for m in ("a", "b", "c"):
            t.release[m].set()
        await asyncio.gather(other, *mine)

    asyncio.run(go())


def test_a_waiting_call_that_is_cancelled_leaves_no_turn_behind() -> None:
    async def go() -> None:
        gate, t = CpuGate(cores=2), Trace()
        a = asyncio.create_task(t.call(gate, "a", "run0", "gemma"))
        await settle()
        b = asyncio.create_task(t.call(gate, "b", "run1", "smollm2"))
        c = asyncio.create_task(t.call(gate, "c", "run2", "qwen"))
        await settle()
        b.cancel()
        await settle()
        assert gate.waiting() == 1
        t.release["a"].set()
        await settle()
        assert t.inside() == {"c"}  # the cancelled waiter took no turn
        t.release["c"].set()
        await asyncio.gather(a, c)
        with pytest.raises(asyncio.CancelledError):
            await b
        assert gate.busy() == {} and gate.waiting() == 0

    asyncio.run(go())


def test_runs_on_two_event_loops_take_turns_at_one_gate() -> None:
    """UI runs go in threads, each with its own loop: a turn handed over wakes the other loop."""
    gate = CpuGate(cores=2)
    order: list[str] = []
    holding = threading.Event()
    go_on = threading.Event()

    async def first() -> None:
        async with gate.turn("run0", "gemma", 2):
            order.append("gemma in")
            holding.set()
            await asyncio.to_thread(go_on.wait)
            order.append("gemma out")

    async def second() -> None:
        await asyncio.to_thread(holding.wait)
        waiting = asyncio.create_task(_turn(gate, "run1", "smollm2", order))
        while gate.waiting() == 0:
            await asyncio.sleep(0.01)
        go_on.set()
        await asyncio.wait_for(waiting, 10)

    threads = [threading.Thread(target=asyncio.run, args=(f(),)) for f in (first, second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert order == ["gemma in", "gemma out", "smollm2 in"]


async def _turn(gate: CpuGate, owner: str, server: str, order: list[str]) -> None:
    async with gate.turn(owner, server, 2):
        order.append(f"{server} in")
