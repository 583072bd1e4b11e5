"""Threads for servers that run together: the plan's share of the cores vs llama-server's default (all cores).

Three reviewer servers of the demo model (three model entries that cannot share a server) generate at
the same time, as the review stage of a pipeline does. Round A: every server with llama-server's default
thread count; round B: the thread count chorus's run plan gives each (its share of the usable cores).
Rounds are interleaved (3 each) and the median aggregate tokens/s compared.
Target: the plan's share is at least as fast as the default (ratio >= 1.0). The last line is one JSON object.

Every server is stopped on every way out (finally, SIGTERM/SIGHUP/Ctrl-C handlers; PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.cpus import usable_cores  # noqa: E402
from launcher.process.binary import find_llama_server  # noqa: E402
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest  # noqa: E402
from launcher.process.server import ModelServer, ServerSpec, install_signal_cleanup  # noqa: E402
from orchestrator.config.registry import Registry  # noqa: E402
from orchestrator.config.schema import PipelineSpec, load_config  # noqa: E402
from orchestrator.plan.resolve import Machine, build_plan  # noqa: E402

MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
ROUNDS = int(os.environ.get("CHORUS_BENCH_RUNS", "3"))
TOKENS = 32


def plan_specs(models_dir: Path, cores: int) -> list[ServerSpec]:
    """The three reviewer servers exactly as a run plan resolves them on this machine (distinct n_ctx keeps
    them from sharing one server, as three different models would)."""
    config_dir = Path(tempfile.mkdtemp(prefix="chorus-threads-"))
    entries = {f"rev-{c}": {"file": MODEL.name, "default_n_ctx": 512 + 256 * i} for i, c in enumerate("abc")}
    (config_dir / "app.yaml").write_text(f"models_dir: {models_dir}\n")
    (config_dir / "models.yaml").write_text(json.dumps({"models": entries}))
    pipeline = PipelineSpec.model_validate({"name": "panel", "stages": [
        {"name": "review", "models": list(entries)}]})
    plan = build_plan(pipeline, Registry(load_config(config_dir)), Machine(cores=cores))
    return plan.servers


async def generate_together(servers: list[ModelServer]) -> float:
    """Aggregate completion tokens/s of one request per server, all at once."""
    async with GenerationClient(timeout_s=900) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client.generate(
            Endpoint(s.model, s.base_url, "completion", s.api_key),
            GenerationRequest(prompt=f"Story {i}: Once upon a time", max_tokens=TOKENS, temperature=0, seed=1))
            for i, s in enumerate(servers)))
        wall = time.perf_counter() - t0
    return sum(r.completion_tokens or 0 for r in results) / wall


def round_with(specs: list[ServerSpec], binary: Path, logs: Path) -> float:
    servers = [ModelServer(spec, binary, logs) for spec in specs]
    try:
        for s in servers:
            s.start()
        asyncio.run(generate_together(servers))  # warm-up: first request pays page-ins
        return asyncio.run(generate_together(servers))
    finally:
        for s in servers:
            s.stop()


def main() -> int:
    install_signal_cleanup()
    binary = find_llama_server()
    cores = usable_cores()
    specs = plan_specs(MODEL.parent, cores)
    default = [dataclasses.replace(s, threads=None) for s in specs]
    logs = Path(tempfile.mkdtemp(prefix="chorus-threads-logs-"))
    print(f"{len(specs)} servers at once on {cores} usable cores; plan threads: {[s.threads for s in specs]}")
    a, b = [], []
    for i in range(ROUNDS):
        a.append(round_with(default, binary, logs))
        b.append(round_with(specs, binary, logs))
        print(f"round {i + 1}: default threads {a[-1]:.1f} tok/s, plan share {b[-1]:.1f} tok/s", flush=True)
    med_a, med_b = statistics.median(a), statistics.median(b)
    ratio = med_b / med_a if med_a else 0.0
    print(f"median aggregate tok/s: default {med_a:.1f}, plan share {med_b:.1f}; ratio {ratio:.2f}")
    print(json.dumps({"bench": "threads", "cores": cores, "servers": len(specs),
                      "plan_threads": [s.threads for s in specs], "default_tok_s": round(med_a, 2),
                      "plan_tok_s": round(med_b, 2), "ratio": round(ratio, 3), "target_ratio_min": 1.0,
                      "pass": ratio >= 1.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
