"""An RPC worker that goes away mid-generation over the network: its link cut, the process alive.

A killed worker closes its socket and llama-server sees the error at once (tests/test_rpc.py). A cut link
says nothing: llama-server blocks on the worker for ever. chorus must still end that call within
`server.request_timeout_s` (plus the worker probe and the hung server's stop), name the worker
(RpcWorkerLost), stop the wedged server, and let the other model of the stage answer: the run is `partial`.
Once the link is back the worker serves again and the model answers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from launcher.process.rpc import probe
from orchestrator.config.schema import PipelineSpec
from tests import netns, yamlfile
from tests.conftest import engine_run
from tests.netns import NetLab

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 8
STOP_GRACE_S = 2
WORKER_PROBE_S = 1.0  # LocalBackend's probe of each worker after a failure
# rpc-server answers again about a second after the link is back, or, still on the dead connection, not within
# 90 s (docs/reliability.md, 26.2): a longer wait only delays the run
RECOVERY_WAIT_S = 30
PORT = 50052


def _pipeline(models: list[str], max_tokens: int) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "t", "defaults": {"max_tokens": max_tokens, "n_ctx": 512, "temperature": 0, "seed": 7},
        "stages": [{"name": "both", "models": models, "prompt": "Tell a long story about a ship:",
                    "execution": "sequential"}]})


def _wait(check, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def test_a_worker_cut_off_mid_generation_fails_in_time_named_and_the_run_is_partial(
        config_dir, demo_model: Path, llama_server_bin: Path, tmp_path: Path) -> None:
    from orchestrator.config.schema import load_config
    from orchestrator.engine.events import Token
    from orchestrator.runtime import Runtime

    netns.require()
    with NetLab(["w1"]) as lab:
        link = lab.links["w1"]
        worker = f"{link.far_ip}:{PORT}"
        # the worker as a deployment runs it: the real CLI, on the private address only
        lab.popen("w1", [str(Path(".venv/bin/chorus").resolve()), "worker", "--host", link.far_ip, "--port",
                         str(PORT), "--log", str(tmp_path / "worker.log")], log=tmp_path / "worker.out")
        models = config_dir.models()
        models["models"]["gemma-split"] = {"file": demo_model.name, "default_gpu_layers": 99, "rpc": [worker]}
        config_dir.write_models(models)
        app = yamlfile.load((config_dir.path / "app.yaml").read_text())
        config_dir.write_app(server={**app.get("server", {}), "request_timeout_s": REQUEST_TIMEOUT_S,
                                     "stop_grace_s": STOP_GRACE_S})
        cut_at: list[float] = []

        def cut_on_first_split_token(event: object) -> None:
            if isinstance(event, Token) and getattr(event, "label", None) == "gemma-split" and not cut_at:
                lab.cut("w1")
                cut_at.append(time.time())

        with lab.inside("hub"):
            assert _wait(lambda: probe(worker), 30), (tmp_path / "worker.out").read_text(errors="replace")
            rt = Runtime(load_config(config_dir.path))
            try:
                record, _ = engine_run(rt, _pipeline(["gemma-split", "smollm2-135m"], 32),
                                       observers=[cut_on_first_split_token])
                split, other = record.stages[0].responses
                wedged = [s for s in rt.running_servers() if s.spec.rpc and s.is_alive()]
                lab.restore("w1")
                restored = time.monotonic()
                back = _wait(lambda: probe(worker), RECOVERY_WAIT_S)
                waited = time.monotonic() - restored
                print(f"worker answered again {waited:.1f}s after its link came back" if back
                      else f"worker did not answer within {waited:.0f}s of its link coming back")
                again = engine_run(rt, _pipeline(["gemma-split"], 4))[0] if back else None
            finally:
                rt.close()

    assert cut_at, f"the split model never produced a token: {split.status} {split.error}"
    error = split.error
    assert split.status == "failed" and error and error.type == "RpcWorkerLost", error
    assert worker in error.message, error
    took = (split.finished_at or 0) - cut_at[0]
    print(f"split call failed {took:.1f}s after the cut: {error.message}")
    assert took <= REQUEST_TIMEOUT_S + WORKER_PROBE_S + STOP_GRACE_S + 4, took
    assert other.ok and other.text, (other.status, other.error)
    assert record.status == "partial"
    assert not wedged, "the server blocked on the lost worker was left in the pool"
    # Recovery is rpc-server's own: it serves one client at a time, and after some cuts it stays on the dead
    # connection (docs/reliability.md, open issues). When it answers again, the model must work again.
    if back:
        assert again is not None and again.stages[0].responses[0].ok, again and again.stages[0].responses[0].error
