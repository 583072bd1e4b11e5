"""What splitting a model over llama.cpp RPC workers costs: the demo model local vs split over 2 loopback workers.

One llama-server runs the demo model on this machine alone; another (-ngl 99 --rpc w1,w2) puts its layers on
two `rpc-server` workers on 127.0.0.1. Each answers the same greedy prompts (a warm-up first); the figure is
split tokens/s over local tokens/s. No target: loopback hides the network, so on real machines the ratio is
lower (every token crosses the wire once per worker). The last line is one JSON object.

Every process is stopped on every way out: finally blocks, SIGTERM/SIGHUP turned into an exit that runs them,
and PR_SET_PDEATHSIG on the servers and the workers should this process be killed outright.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.process.binary import find_llama_server, find_rpc_server  # noqa: E402
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest  # noqa: E402
from launcher.process.rpc import WorkerProcess, start_worker  # noqa: E402
from launcher.process.server import ModelServer, ServerSpec, install_signal_cleanup  # noqa: E402

MODEL = Path(os.environ.get("CHORUS_DEMO_MODEL", REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
ROUNDS = int(os.environ.get("CHORUS_BENCH_RUNS", "3"))
TOKENS = 32


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def tokens_per_s(server: ModelServer, seed: int) -> float:
    async with GenerationClient(timeout_s=900) as client:
        t0 = time.perf_counter()
        r = await client.generate(Endpoint(server.model, server.base_url, "completion", server.api_key),
                                  GenerationRequest(prompt=f"Story {seed}: Once upon a time", max_tokens=TOKENS,
                                                    temperature=0, seed=seed))
        return (r.completion_tokens or 0) / (time.perf_counter() - t0)


def measure(server: ModelServer) -> float:
    asyncio.run(tokens_per_s(server, 0))  # warm-up: the first request pays page-ins
    return statistics.median(asyncio.run(tokens_per_s(server, i + 1)) for i in range(ROUNDS))


def _exit_on(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    install_signal_cleanup()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)  # SystemExit runs the finally blocks below: workers stopped too
    binary, rpc_binary = find_llama_server(), find_rpc_server()
    logs = Path(tempfile.mkdtemp(prefix="chorus-rpc-bench-"))
    workers: list[WorkerProcess] = []
    servers: list[ModelServer] = []
    try:
        local = ModelServer(ServerSpec("demo-local", MODEL, n_ctx=512, threads=1), binary, logs)
        servers.append(local)
        local.start()
        local_tps = measure(local)
        local.stop()
        for i in range(2):
            workers.append(start_worker(rpc_binary, "127.0.0.1", _port(), log_path=logs / f"worker{i}.log"))
        rpc = tuple(w.endpoint for w in workers)
        split = ModelServer(ServerSpec("demo-split", MODEL, n_ctx=512, n_gpu_layers=99, threads=1, rpc=rpc),
                            binary, logs)
        servers.append(split)
        split.start()
        split_tps = measure(split)
    finally:
        for s in servers:
            s.stop()
        for w in workers:
            w.stop()
    ratio = split_tps / local_tps if local_tps else 0.0
    print(f"demo model, {TOKENS} tokens, median of {ROUNDS}: local {local_tps:.1f} tok/s, split over 2 loopback "
          f"workers {split_tps:.1f} tok/s; ratio {ratio:.2f} (a figure, no target: loopback hides the network)")
    print(json.dumps({"bench": "rpc_overhead", "model": MODEL.name, "tokens": TOKENS, "rounds": ROUNDS,
                      "workers": 2, "local_tok_s": round(local_tps, 2), "split_tok_s": round(split_tps, 2),
                      "ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
