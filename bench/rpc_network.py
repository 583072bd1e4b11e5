"""A model split over an RPC worker across a real (emulated) network path, at three link profiles, vs local.

bench/rpc_overhead.py splits over loopback, which hides the network. Here the worker (`rpc-server`) runs in
its own network namespace behind a veth link (tests/netns.py): bandwidth capped with `tc tbf` on both ends,
latency added by a relay that holds each chunk RTT/2 each way (tests/netns_relay.py; netem is not always
available). llama-server runs in the hub namespace with `-ngl 99 --rpc <relay>`, so every offloaded layer
lives on the worker. Per profile: load time (the worker receives its weights over the link), prompt and
generation tokens/s (llama-server's own timings), bytes over the link per prompt and per generated token
(the kernel's counters on the hub's end of the veth), the measured round trip (RPC calls through the
relay), and the greedy text: the target is the same text on every link (local may differ: its CPU backend
repacks Q4 weights, the worker's RPC buffers are not repacked). A fourth profile keeps the output layer on
this machine (`-ot`), since llama.cpp otherwise sends the logits, n_vocab floats, over the link per token.

The demo model, then the zoo's largest shape (bench/zoo/, when made). One server start per profile plus
one local, each asked 3 times (a ~40-token prompt, then 16 tokens; medians): figures, not statistics.
About 1.5 minutes for the demo model and 4 for the zoo model on 2 cores. Needs root (namespaces);
otherwise it says why and exits 0.

    sudo .venv/bin/python bench/rpc_network.py [--zoo NAME | --no-zoo] [--tokens 16]

The last line is one JSON object. Every process and namespace is removed on every way out (finally blocks,
SIGTERM/SIGHUP turned into an exit that runs them, PR_SET_PDEATHSIG, the harness's atexit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.process.binary import find_llama_server, find_rpc_server  # noqa: E402
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest, GenerationResult  # noqa: E402
from launcher.process.rpc import CMD_DEVICE_COUNT, CMD_HELLO, CONN_CAPS_SIZE, start_worker  # noqa: E402
from launcher.process.server import ModelServer, ServerOptions, ServerSpec, install_signal_cleanup  # noqa: E402
from tests import netns  # noqa: E402

MODEL = Path(os.environ.get("CHORUS_DEMO_MODEL", REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
# (name, rate in Mbit/s, round trip in ms, output layer kept here). llama.cpp offloads the output layer
# first (any -ngl >= 1), so its logits, n_vocab floats, cross the link for every token; OUTPUT_HERE keeps
# the output matrix (or a tied model's copy of token_embd) on this machine instead.
PROFILES = [("10 Gbit/s, 0.1 ms", 10_000.0, 0.1, False), ("1 Gbit/s, 0.5 ms", 1_000.0, 0.5, False),
            ("100 Mbit/s, 5 ms", 100.0, 5.0, False), ("100 Mbit/s, 5 ms, output here", 100.0, 5.0, True)]
OUTPUT_HERE = ("-ot", r"^(output|token_embd)\.weight$=CPU")
ZOO_DEFAULT = "qwen3-30b-a3b"  # the zoo's largest shape (2 of 48 layers, 128 experts): bench/zoo/README.md
PROMPT = ("The harbour was quiet before dawn. Fishing boats rocked against the pier, gulls waited on the "
          "posts, and the old lighthouse keeper walked down the hill with a lantern. He had seen")
WORKER_PORT = 50052
THREADS = 2
TIME_LIMIT_S = 600
SAMPLES = 3  # prompt and generation requests per server start (medians); the start itself is measured once


@dataclass
class Row:
    model: str
    profile: str
    rate_mbit: float | None = None
    rtt_ms_set: float | None = None
    rtt_ms_measured: float | None = None
    load_s: float = 0.0
    load_mb_moved: float = 0.0
    prompt_tokens: int = 0
    prompt_tok_s: float = 0.0
    gen_tokens: int = 0
    gen_tok_s: float = 0.0
    bytes_per_prompt_token: float = 0.0
    bytes_per_gen_token: float = 0.0
    extra_ms_per_token: float | None = None  # generation time per token over the local server's
    text: str = field(default="", repr=False)
    same_as_local: bool | None = None


def _rpc_round_trip_ms(host: str, port: int, n: int = 20) -> float:
    """Median of n RPC calls (DEVICE_COUNT: 9 bytes out, 12 back) after the handshake, through the relay."""
    def call(sock: socket.socket, cmd: int, payload: bytes) -> None:
        sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
        size = struct.unpack("<Q", _recv(sock, 8))[0]
        _recv(sock, size)

    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        call(sock, CMD_HELLO, bytes(CONN_CAPS_SIZE))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call(sock, CMD_DEVICE_COUNT, b"")
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("worker closed the connection")
        data += chunk
    return data


async def _generate(server: ModelServer, prompt: str, tokens: int) -> GenerationResult:
    async with GenerationClient(timeout_s=900) as client:
        endpoint = Endpoint(server.model, server.base_url, "completion", server.api_key)
        return await client.generate(endpoint, GenerationRequest(prompt=prompt, max_tokens=tokens, temperature=0,
                                                                 seed=1))


def _measure(server: ModelServer, row: Row, tokens: int, moved: Callable[[], int]) -> None:
    """A warm-up, then SAMPLES times: a fresh prompt alone (1 token), then the same prompt again for `tokens`
    (its prefix cached, so that request is generation). Medians: one busy moment does not make the row."""
    asyncio.run(_generate(server, "Once upon a time", 2))
    prompt_rates, gen_rates, prompt_bytes, gen_bytes = [], [], [], []
    for i in range(SAMPLES):
        prompt = f"Story {i + 1}. {PROMPT}"
        before = moved()
        first = asyncio.run(_generate(server, prompt, 1))
        mid = moved()
        gen = asyncio.run(_generate(server, prompt, tokens))
        after = moved()
        pt, gt = first.server_timings, gen.server_timings
        row.prompt_tokens, row.gen_tokens = int(pt.get("prompt_n") or 0), int(gt.get("predicted_n") or 0)
        prompt_rates.append(float(pt.get("prompt_per_second") or 0.0))
        gen_rates.append(float(gt.get("predicted_per_second") or 0.0))
        prompt_bytes.append((mid - before) / max(1, row.prompt_tokens))
        gen_bytes.append((after - mid) / max(1, row.gen_tokens))
        if i == 0:
            row.text = gen.text
    row.prompt_tok_s, row.gen_tok_s = statistics.median(prompt_rates), statistics.median(gen_rates)
    row.bytes_per_prompt_token, row.bytes_per_gen_token = statistics.median(prompt_bytes), statistics.median(gen_bytes)


def _relay_base_ms(lab: netns.NetLab, logs: Path) -> float:
    """The round trip to the worker through a relay that holds nothing, on an unshaped link."""
    lab.shape("w1", 0)
    relay, port = lab.relay("hub", "127.0.0.1:0", f"{lab.links['w1'].far_ip}:{WORKER_PORT}", 0.0,
                            log=logs / "relay.log")
    try:
        return _rpc_round_trip_ms("127.0.0.1", port)
    finally:
        relay.kill()
        relay.wait(timeout=10)


def run_model(lab: netns.NetLab, model: Path, logs: Path, tokens: int) -> list[Row]:
    binary = find_llama_server()
    link = lab.links["w1"]

    def moved() -> int:
        return sum(lab.counters("w1"))

    rows = []
    with lab.inside("hub"):
        local = ModelServer(ServerSpec(f"{model.stem}-local", model, n_ctx=512, threads=THREADS), binary, logs,
                            ServerOptions(startup_timeout_s=300))
        t0 = time.perf_counter()
        local.start()
        row = Row(model.name, "local (no split)", load_s=time.perf_counter() - t0)
        try:
            _measure(local, row, tokens, lambda: 0)
        finally:
            local.stop()
        rows.append(row)
        base = _relay_base_ms(lab, logs)
        for name, rate, rtt, output_here in PROFILES:
            lab.shape("w1", rate)
            hold = max(0.0, (rtt - base) / 2)  # the relay's own forwarding time is part of the round trip
            relay, port = lab.relay("hub", "127.0.0.1:0", f"{link.far_ip}:{WORKER_PORT}", hold,
                                    log=logs / "relay.log")
            row = Row(model.name, name, rate, rtt, _rpc_round_trip_ms("127.0.0.1", port))
            spec = ServerSpec(f"{model.stem}-split", model, n_ctx=512, n_gpu_layers=99, threads=THREADS,
                              rpc=(f"127.0.0.1:{port}",), extra_args=OUTPUT_HERE if output_here else ())
            split = ModelServer(spec, binary, logs, ServerOptions(startup_timeout_s=300))
            before = moved()
            t0 = time.perf_counter()
            try:
                split.start()
                row.load_s = time.perf_counter() - t0
                row.load_mb_moved = (moved() - before) / 1e6
                _measure(split, row, tokens, moved)
            finally:
                split.stop()
                relay.kill()
                relay.wait(timeout=10)
            row.same_as_local = row.text == rows[0].text
            if row.gen_tok_s and rows[0].gen_tok_s:
                row.extra_ms_per_token = 1000 / row.gen_tok_s - 1000 / rows[0].gen_tok_s
            rows.append(row)
            print(f"  {model.name}: {name} done", file=sys.stderr, flush=True)
    return rows


def _exit_on(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _table(rows: list[Row]) -> str:
    head = (f"{'model':<26} {'link':<27} {'rtt ms':>7} {'load s':>7} {'load MB':>8} {'prompt tok/s':>12} "
            f"{'gen tok/s':>9} {'+ms/tok':>7} {'B/prompt tok':>12} {'B/gen tok':>10} {'=local':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rtt = f"{r.rtt_ms_measured:.2f}" if r.rtt_ms_measured is not None else "-"
        same = "-" if r.same_as_local is None else ("yes" if r.same_as_local else "no")
        extra = "-" if r.extra_ms_per_token is None else f"{r.extra_ms_per_token:.1f}"
        lines.append(f"{r.model[:26]:<26} {r.profile:<27} {rtt:>7} {r.load_s:>7.1f} {r.load_mb_moved:>8.1f} "
                     f"{r.prompt_tok_s:>12.1f} {r.gen_tok_s:>9.1f} {extra:>7} {r.bytes_per_prompt_token:>12,.0f} "
                     f"{r.bytes_per_gen_token:>10,.0f} {same:>6}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", action="append", default=None, metavar="NAME",
                   help=f"a bench/zoo shape to run after the demo model (repeatable; default {ZOO_DEFAULT} when "
                        "the zoo is made: bench/zoo/make_zoo.py)")
    p.add_argument("--no-zoo", action="store_true", help="the demo model only")
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    reason = netns.unavailable()
    if reason:
        print(f"skipped: {reason}")
        print(json.dumps({"bench": "rpc_network", "skipped": reason}))
        return 0
    install_signal_cleanup()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)
    models = [MODEL]
    if not args.no_zoo:
        from bench.zoo.make_zoo import zoo_dir

        zoo = [zoo_dir() / f"{name}.gguf" for name in (args.zoo or [ZOO_DEFAULT])]
        missing = [p for p in zoo if not p.is_file()]
        if args.zoo and missing:
            p.error(f"not in the zoo: {', '.join(map(str, missing))} (bench/zoo/make_zoo.py makes it)")
        models += [p for p in zoo if p.is_file()]
    logs = Path(tempfile.mkdtemp(prefix="chorus-rpc-network-"))
    started = time.perf_counter()
    rows: list[Row] = []
    with netns.NetLab(["w1"]) as lab:
        link = lab.links["w1"]
        with lab.inside("w1"):  # the worker's own machine; started from this (main) thread, which lives on
            worker = start_worker(find_rpc_server(), link.far_ip, WORKER_PORT, threads=THREADS,
                                  log_path=logs / "worker.log")
        try:
            for model in models:
                rows += run_model(lab, model, logs, args.tokens)
        finally:
            worker.stop()
    total = time.perf_counter() - started
    print(f"{len(PROFILES)} link profiles + local, one server start each, medians of {SAMPLES} requests of "
          f"{args.tokens} tokens, {THREADS} threads, worker in its own network namespace; bytes = both directions "
          "on the hub's end of the link")
    print(_table(rows))
    # the link must not change the answer: every split of a model writes the same greedy text. Local differs
    # (its CPU backend repacks Q4 weights for AVX2, the worker's RPC buffers do not: other kernels, other floats)
    same = all(len({r.text for r in rows if r.model == m.name and r.rate_mbit is not None}) == 1 for m in models)
    figures = {"bench": "rpc_network", "tokens": args.tokens, "starts_per_profile": 1, "samples": SAMPLES,
               "threads": THREADS, "total_s": round(total, 1),
               "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(r).items() if k != "text"}
                        for r in rows],
               "targets": {"same_text_on_every_link": True, "total_s_max": TIME_LIMIT_S},
               "same_text_on_every_link": same, "pass": same and total <= TIME_LIMIT_S}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
