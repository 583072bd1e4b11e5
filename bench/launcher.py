"""Launcher vs. llama-server started by hand, on the demo model, measured in one run.

Prints cold start (spawn to ready), first-token latency, per-request client overhead against a raw
httpx call, and the gain of 3 concurrent requests on one 3-slot server over 3 sequential ones.
Target: our concurrency gain keeps at least 95% of the hand-run server's gain.
The last line is one JSON object with the figures and targets.

Killed by a timeout (SIGTERM, SIGHUP, Ctrl-C) it stops the servers it started before exiting; killed
with SIGKILL, they die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.process.binary import find_llama_server  # noqa: E402
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest  # noqa: E402
from launcher.process.server import (  # noqa: E402
    ModelServer,
    ServerSpec,
    free_port,
    install_signal_cleanup,
    own_group_dying_with_parent,
    stop_process_group,
)

PROMPTS = ["Once upon a time", "The ocean is", "In the year 2050,"]


# ---------------------------------------------------------------- by hand

class HandServer:
    """llama-server as a person would run it: Popen and poll /health (the key in a 0600 file, not argv).

    It dies with this process (PR_SET_PDEATHSIG) and is stopped on every way out of the constructor.
    """

    def __init__(self, binary: Path, model: Path, n_ctx: int, slots: int, log: Path,
                 startup_timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.key = secrets.token_hex(8)
        self.url = f"http://127.0.0.1:{self.port}"
        self._keys = tempfile.TemporaryDirectory(prefix="chorus-bench-")  # 0700
        key_file = Path(self._keys.name) / "key"
        key_file.touch(mode=0o600)
        key_file.write_text(self.key + "\n")
        cmd = [str(binary), "-m", str(model), "-c", str(n_ctx * slots), "-np", str(slots), "-ngl", "0",
               "--host", "127.0.0.1", "--port", str(self.port), "--no-webui", "--api-key-file", str(key_file),
               "--fit", "off"]
        t0 = time.perf_counter()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=own_group_dying_with_parent)
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hand-run llama-server exited with status {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"hand-run llama-server not ready within {timeout_s:.0f}s")

    def complete(self, client: httpx.Client, prompt: str, n: int, stream: bool = False) -> float:
        """Seconds to the first token when streaming, else the whole request."""
        body = {"prompt": prompt, "n_predict": n, "seed": 1, "temperature": 0.7, "stream": stream}
        headers = {"Authorization": f"Bearer {self.key}"}
        t0 = time.perf_counter()
        if not stream:
            client.post(f"{self.url}/completion", json=body, headers=headers).raise_for_status()
            return time.perf_counter() - t0
        with client.stream("POST", f"{self.url}/completion", json=body, headers=headers) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                    return time.perf_counter() - t0
        return time.perf_counter() - t0

    def stop(self) -> None:
        try:
            stop_process_group(self.proc, grace_s=10.0)
        finally:
            self._keys.cleanup()


# ---------------------------------------------------------------- measurements

def hand_figures(binary: Path, model: Path, args: argparse.Namespace, logs: Path) -> dict[str, float]:
    srv = HandServer(binary, model, args.n_ctx, 3, logs / "hand.log")
    try:
        with httpx.Client(timeout=600) as client:
            srv.complete(client, "warm up", 4)
            first_token = statistics.median(srv.complete(client, "The sky is", 8, stream=True) for _ in range(3))
            tiny = statistics.median(srv.complete(client, "Hi", 1) for _ in range(args.tiny))
            t0 = time.perf_counter()
            for p in PROMPTS:
                srv.complete(client, p, args.tokens)
            seq = time.perf_counter() - t0
        with ThreadPoolExecutor(3) as ex, httpx.Client(timeout=600) as client:
            t0 = time.perf_counter()
            list(ex.map(lambda p: srv.complete(client, p, args.tokens), PROMPTS))
            par = time.perf_counter() - t0
    finally:
        srv.stop()
    return {"ready_s": srv.ready_s, "first_token_s": first_token, "tiny_request_s": tiny,
            "sequential_s": seq, "concurrent_s": par, "gain": seq / par}


async def ours_figures(binary: Path, model: Path, args: argparse.Namespace, logs: Path) -> dict[str, float]:
    server = ModelServer(ServerSpec("demo", model, n_ctx=args.n_ctx, slots=3), binary, logs).start()
    ep = Endpoint("demo", server.base_url, "completion", server.api_key)

    def req(prompt: str, n: int) -> GenerationRequest:
        return GenerationRequest(prompt, max_tokens=n, seed=1, temperature=0.7)

    try:
        async with GenerationClient() as client:
            await client.generate(ep, req("warm up", 4))
            firsts = [(await client.generate(ep, req("The sky is", 8))).first_token_s or 0.0 for _ in range(3)]
            tiny = []
            for _ in range(args.tiny):
                t0 = time.perf_counter()
                await client.generate(ep, req("Hi", 1))
                tiny.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for p in PROMPTS:
                await client.generate(ep, req(p, args.tokens))
            seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(*[client.generate(ep, req(p, args.tokens)) for p in PROMPTS])
            par = time.perf_counter() - t0
    finally:
        server.stop()
    return {"ready_s": server.ready_s or 0.0, "first_token_s": statistics.median(firsts),
            "tiny_request_s": statistics.median(tiny), "sequential_s": seq, "concurrent_s": par,
            "gain": seq / par}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(os.environ.get(
        "CHORUS_DEMO_MODEL", REPO / "models" / "gemma-3-270m-q4_k_m.gguf")))
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=96, help="tokens per request in the concurrency test")
    parser.add_argument("--tiny", type=int, default=15, help="1-token requests for the overhead figure")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    args = parser.parse_args()
    install_signal_cleanup()  # a timeout's SIGTERM stops our servers and unwinds the finally blocks
    binary = find_llama_server()
    logs = REPO / "logs" / "bench"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)

    hand_runs, ours_runs = [], []
    for _ in range(args.rounds):  # alternate so machine noise hits both sides alike
        hand_runs.append(hand_figures(binary, args.model, args, logs))
        ours_runs.append(asyncio.run(ours_figures(binary, args.model, args, logs)))
    hand = {k: statistics.median(r[k] for r in hand_runs) for k in hand_runs[0]}
    ours = {k: statistics.median(r[k] for r in ours_runs) for k in ours_runs[0]}

    kept = (ours["gain"] - 1) / (hand["gain"] - 1) if hand["gain"] > 1 else float("nan")
    print(f"{'':28}{'by hand':>12}{'chorus':>12}")
    for key, label in [("ready_s", "cold start (s)"), ("first_token_s", "first token (s)"),
                       ("tiny_request_s", "1-token request (s)"), ("sequential_s", "3 sequential (s)"),
                       ("concurrent_s", "3 concurrent (s)"), ("gain", "concurrency gain (x)")]:
        print(f"{label:28}{hand[key]:12.3f}{ours[key]:12.3f}")
    overhead_ms = (ours["tiny_request_s"] - hand["tiny_request_s"]) * 1000
    print(f"client overhead per request: {overhead_ms:+.1f} ms; share of hand-run gain kept: {kept:.1%}")
    result = {
        "bench": "launcher", "model": args.model.name, "cpu_count": os.cpu_count(),
        "hand": {k: round(v, 4) for k, v in hand.items()},
        "ours": {k: round(v, 4) for k, v in ours.items()},
        "client_overhead_ms": round(overhead_ms, 2),
        "cold_start_ratio": round(ours["ready_s"] / hand["ready_s"], 3),
        "gain_kept": round(kept, 3),
        "target_gain_kept_min": 0.95,
        "gain_ok": bool(kept >= 0.95),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
