"""Fault: the memory budget ignored by the planner and per process (issue 13, item 4).

With ``memory_budget_mib: 450`` and a stage of two ~330 MiB servers, the plan said "fits together",
the second server was refused at load, the stage was `partial` and no waves ran, and the hint said
"needs 327 MiB even with nothing else running" (327 < 450). Two chorus processes each ran 2 x 333 MiB
under the one cap. The budget is now a device the probe reports: the planner, the waves and the
admission check all see it, and chorus processes share it through the admission ledger on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import InsufficientMemory
from launcher.memory.admission import Demand, MemoryGuard
from launcher.memory.calibration import CalibrationCache
from launcher.memory.estimate import EstimatorSettings
from launcher.memory.fit import footprint
from launcher.memory.ledger import AdmissionLedger
from launcher.memory.probes import FixedProbe
from launcher.process.server import ModelServer, ServerSpec
from tests.conftest import REPO, ConfigDir

MiB = 1 << 20
GiB = 1 << 30
SETTINGS = EstimatorSettings(repack_types=frozenset())
BIG_MACHINE = FixedProbe(64 * GiB, 64 * GiB)  # RAM is never what is short here: only the budget


class FakeServer(ModelServer):
    """A running server as far as the admission check can tell, without a process."""

    def __init__(self, spec: ServerSpec) -> None:
        super().__init__(spec, Path("/nonexistent/llama-server"), Path("/tmp"))

    def is_alive(self) -> bool:
        return True


def two_models(demo_model: Path) -> tuple[ServerSpec, ServerSpec]:
    """Two servers of ~330 MiB each (the demo file under two names, each its own server)."""
    return (ServerSpec("first", demo_model, n_ctx=2048), ServerSpec("second", demo_model, n_ctx=2304))


def guard(budget: int, ledger: Path) -> MemoryGuard:
    return MemoryGuard(BIG_MACHINE, settings=SETTINGS, budget_bytes=budget, ledger=AdmissionLedger(ledger))


# ---------------------------------------------------------------- one process, simulated machine


def test_planner_splits_a_stage_that_exceeds_the_budget_into_waves(demo_model: Path, tmp_path: Path) -> None:
    a, b = two_models(demo_model)
    one = footprint(guard(GiB, tmp_path / "l.json").need(a))
    assert 250 * MiB < one < 450 * MiB
    g = guard(450 * MiB, tmp_path / "ledger.json")
    state = g.state()
    sched = g.schedule([Demand(a, 1), Demand(b, 1)], state)
    assert state.have["budget"] == 450 * MiB
    assert sched.together_need["budget"] == footprint(g.need(a)) + footprint(g.need(b)) > 450 * MiB
    assert [[p.demand for p in w.placements] for w in sched.waves] == [[0], [1]] and sched.unfit == []
    # the second wave stops the first wave's server: the budget holds one at a time
    assert [w.holding.server.spec for w in sched.waves[1].stop] == [a]
    roomy = guard(2 * one + 10 * MiB, tmp_path / "l2.json")
    assert roomy.schedule([Demand(a, 1), Demand(b, 1)], roomy.state()).fits_together


def test_second_server_over_the_budget_is_refused_with_true_need_and_have(demo_model: Path,
                                                                         tmp_path: Path) -> None:
    a, b = two_models(demo_model)
    g = guard(450 * MiB, tmp_path / "ledger.json")
    g.check_fit(a, [])
    g.forget(a)
    running = [FakeServer(a)]
    with pytest.raises(InsufficientMemory) as err:
        g.check_fit(b, running)
    exc = err.value
    need_b, held_a = footprint(g.need(b)), footprint(g.need(a))
    assert exc.need["budget"] == need_b and exc.have["budget"] == 450 * MiB - held_a
    assert exc.need["budget"] > exc.have["budget"] and need_b < 450 * MiB
    assert "budget: needs" in exc.message
    assert not any("even with nothing else running" in s for s in exc.suggestions), exc.suggestions
    assert any(s.startswith("stop 'first'") for s in exc.suggestions), exc.suggestions
    g.check_fit(b, [])  # 'first' stopped: room again


def test_model_larger_than_the_whole_budget_says_so(demo_model: Path, tmp_path: Path) -> None:
    a, _ = two_models(demo_model)
    g = guard(100 * MiB, tmp_path / "ledger.json")
    with pytest.raises(InsufficientMemory) as err:
        g.check_fit(a, [])
    assert any("even with nothing else running" in s and "budget" in s for s in err.value.suggestions)
    assert "raise server.memory_budget_mib in app.yaml" in err.value.suggestions


# ---------------------------------------------------------------- several processes, one ledger

CHILD = """
import sys, time
from pathlib import Path
from launcher.memory.admission import Demand, MemoryGuard
from launcher.errors import InsufficientMemory
from launcher.memory.estimate import EstimatorSettings
from launcher.memory.ledger import AdmissionLedger
from launcher.memory.probes import FixedProbe
from launcher.process.server import ServerSpec
ledger, budget, model, n_ctx, go = sys.argv[1:6]
g = MemoryGuard(FixedProbe(64 << 30, 64 << 30), settings=EstimatorSettings(repack_types=frozenset()),
                budget_bytes=int(budget), ledger=AdmissionLedger(ledger))
spec = ServerSpec("child", Path(model), n_ctx=int(n_ctx))
print("ready", flush=True)
while go != "-" and not Path(go).exists():
    time.sleep(0.005)
try:
    g.check_fit(spec, [])
    print("admitted", flush=True)
except InsufficientMemory as exc:
    print("refused", exc.have["budget"], flush=True)
sys.stdin.read()  # stay alive (holding what was admitted) until the parent closes stdin
"""


def child(ledger: Path, budget: int, model: Path, n_ctx: int, go: Path | str = "-") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(ledger), str(budget), str(model), str(n_ctx), str(go)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_two_processes_share_one_budget_through_the_ledger(demo_model: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "run" / "admission.json"
    _, b = two_models(demo_model)
    g = guard(450 * MiB, ledger)
    other = child(ledger, 450 * MiB, demo_model, 2048)
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "ready"
        assert other.stdout.readline().strip() == "admitted"  # the other process took ~330 MiB
        with pytest.raises(InsufficientMemory) as err:
            g.check_fit(b, [])
        held = 450 * MiB - err.value.have["budget"]
        assert held == footprint(g.need(ServerSpec("child", demo_model, n_ctx=2048)))
        assert any("other chorus processes hold" in s for s in err.value.suggestions), err.value.suggestions
        assert oct(ledger.stat().st_mode & 0o777) == "0o600"
    finally:
        stop([other])
    g.check_fit(b, [])  # its owner is dead: the entry is dropped and the budget is free again


def test_processes_admitting_at_the_same_moment_take_turns(demo_model: Path, tmp_path: Path) -> None:
    """Four processes race for a budget that holds one server: exactly one is admitted."""
    ledger, go = tmp_path / "admission.json", tmp_path / "go"
    one = footprint(guard(GiB, tmp_path / "l.json").need(ServerSpec("child", demo_model, n_ctx=2048)))
    procs = [child(ledger, int(one * 1.5), demo_model, 2048, go) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        answers = [p.stdout.readline().split()[0] for p in procs if p.stdout is not None]
    finally:
        stop(procs)
    assert sorted(answers) == ["admitted", "refused", "refused", "refused"], answers


# ---------------------------------------------------------------- the real server


@pytest.mark.integration
@pytest.mark.serial  # a real server under a memory budget, measured
def test_budget_refuses_a_second_real_server_here_and_in_another_process(
        config_dir: ConfigDir, llama_server_bin: Path, demo_model: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime

    ledger = tmp_path / "ledger" / "admission.json"
    monkeypatch.setenv("CHORUS_ADMISSION_LEDGER", str(ledger))
    a, b = ServerSpec("gemma3-270m", demo_model, n_ctx=512), ServerSpec("gemma3-270m", demo_model, n_ctx=768)
    est = MemoryGuard(BIG_MACHINE).need(a)
    budget_mib = int(footprint(est) * 1.5) // MiB  # room for one server, not two
    config_dir.write_app(server={"startup_timeout_s": 120, "request_timeout_s": 600, "idle_timeout_s": 900,
                                 "stop_grace_s": 5, "memory_budget_mib": budget_mib})
    rt = Runtime(load_config(config_dir.path), calibration=CalibrationCache(tmp_path / "cal"))
    procs: list[subprocess.Popen[str]] = []
    try:
        server = rt.pool.acquire(a)  # in use: the pool may not stop it to make room
        assert server.is_alive() and rt.pool.starts == 1
        with pytest.raises(InsufficientMemory) as err:
            rt.pool.acquire(b)
        assert err.value.need["budget"] > err.value.have["budget"] and rt.pool.starts == 1
        # another chorus process on this machine sees the running server in the ledger
        procs.append(child(ledger, budget_mib * MiB, demo_model, 768))
        assert procs[0].stdout is not None and procs[0].stdout.readline().strip() == "ready"
        assert procs[0].stdout.readline().split()[0] == "refused"
        rt.pool.release(server)
    finally:
        rt.close()
        stop(procs)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{server.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    late = child(ledger, budget_mib * MiB, demo_model, 768)
    try:
        assert late.stdout is not None and late.stdout.readline().strip() == "ready"
        assert late.stdout.readline().strip() == "admitted"  # the server is gone: so is its entry
    finally:
        stop([late])
