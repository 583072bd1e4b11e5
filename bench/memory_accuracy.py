"""Memory estimate vs. a real llama-server, on the demo model.

For n_ctx 512, 2048, 8192 and 32768 (per slot), each with 1 and 3 slots: estimate the server's RAM
(and VRAM) from the GGUF header alone, start the real server (at -lv 4, so llama.cpp logs its buffer
sizes), run one short generation, then measure it.

"Measured" is the server's RSS after one short generation (16 tokens): the whole mapped model file
is resident by then (the warm-up reads every weight) plus the anonymous memory llama.cpp allocated
and touched. The estimate is the peak: KV cache and compute buffer as if fully used, which a short
generation does not touch entirely, so a small positive error is expected at large n_ctx. With a
GPU, VRAM is measured per process through NVML.

Target: |error| <= 20% of the measured RSS for every configuration.
The last line is one JSON object with the figures and the target.

Killed by a timeout (SIGTERM, SIGHUP, Ctrl-C) it stops its server before exiting; killed with SIGKILL,
the server dies with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.admission import MemoryGuard  # noqa: E402
from launcher.binary import find_llama_server  # noqa: E402
from launcher.calibration import measure_server  # noqa: E402
from launcher.client import Endpoint, GenerationClient, GenerationRequest  # noqa: E402
from launcher.server import ModelServer, ServerOptions, ServerSpec, install_signal_cleanup  # noqa: E402

MiB = 1 << 20
TARGET_ABS_ERROR_PCT = 20
N_CTX = (512, 2048, 8192, 32768)
SLOTS = (1, 3)


def generate(server: ModelServer, tokens: int) -> None:
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)

    async def go() -> None:
        async with GenerationClient(timeout_s=120) as client:
            await client.generate(ep, GenerationRequest("The capital of France is", max_tokens=tokens, seed=1))

    asyncio.run(go())


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / MiB:8.1f}"


def run_one(binary: Path, model: Path, n_ctx: int, slots: int, ngl: int, tokens: int, logs: Path,
            guard: MemoryGuard) -> dict[str, object]:
    spec = ServerSpec("demo", model, n_ctx=n_ctx, n_gpu_layers=ngl, slots=slots)
    est = guard.estimate(spec)
    server = ModelServer(spec, binary, logs, ServerOptions(log_verbosity=4, startup_timeout_s=120)).start()
    try:
        generate(server, tokens)
        time.sleep(0.2)
        m = measure_server(server)
    finally:
        server.stop()
    assert m is not None, "the server died before it could be measured"
    measured = m.rss_bytes + sum(m.vram_bytes.values())
    estimate = est.ram_bytes + (est.vram_bytes if m.vram_bytes else 0)
    logged = {dev: sum(kinds.values()) for dev, kinds in m.buffers.items()}
    return {
        "n_ctx": n_ctx, "slots": slots, "n_gpu_layers": ngl,
        "estimate_bytes": estimate, "measured_bytes": measured,
        "error_pct": round((estimate - measured) / measured * 100, 1) + 0.0,  # no -0.0
        "estimate_ram_bytes": est.ram_bytes, "estimate_vram_bytes": est.vram_bytes,
        "rss_bytes": m.rss_bytes, "rss_anon_bytes": m.rss_anon_bytes, "rss_file_bytes": m.rss_file_bytes,
        "pss_bytes": m.pss_bytes, "vram_bytes": sum(m.vram_bytes.values()),
        "estimate_breakdown": est.breakdown, "llama_cpp_buffers": m.buffers,
        "llama_cpp_buffers_total": logged,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated before measuring")
    args = parser.parse_args()
    install_signal_cleanup()  # a timeout's SIGTERM stops the server being measured, then exits
    binary = find_llama_server()
    logs = REPO / "logs" / "bench-memory"
    guard = MemoryGuard()
    gpus = guard.gpus()
    print(f"model {args.model.name}, n_gpu_layers {args.n_gpu_layers}, "
          f"{'GPUs: ' + ', '.join(g.name for g in gpus) if gpus else guard.gpu_note}")
    print("measured = RSS (+ VRAM from NVML) after one short generation; estimate = the planner's peak figure")
    print()
    header = (f"{'n_ctx':>6} {'slots':>5} | {'estimate':>8} {'measured':>8} {'error':>7} | {'PSS':>8} {'anon':>8} "
              f"{'file':>8} | {'est KV':>8} {'log KV':>8} {'est cmp':>8} {'log cmp':>8}  (MiB)")
    print(header)
    print("-" * len(header))
    results = []
    t0 = time.perf_counter()
    for n_ctx in N_CTX:
        for slots in SLOTS:
            r = run_one(binary, args.model, n_ctx, slots, args.n_gpu_layers, args.tokens, logs, guard)
            results.append(r)
            est_b, log_b = r["estimate_breakdown"], r["llama_cpp_buffers"]  # type: ignore[assignment]
            est_kv = sum(k.get("kv", 0) for k in est_b.values())  # type: ignore[union-attr]
            log_kv = sum(k.get("kv", 0) for k in log_b.values())  # type: ignore[union-attr]
            est_c = sum(k.get("compute", 0) for k in est_b.values())  # type: ignore[union-attr]
            log_c = sum(k.get("compute", 0) for k in log_b.values())  # type: ignore[union-attr]
            print(f"{n_ctx:>6} {slots:>5} | {mib(r['estimate_bytes'])} {mib(r['measured_bytes'])} "  # type: ignore[arg-type]
                  f"{r['error_pct']:>+6.1f}% | {mib(r['pss_bytes'])} {mib(r['rss_anon_bytes'])} "  # type: ignore[arg-type]
                  f"{mib(r['rss_file_bytes'])} | {mib(est_kv)} {mib(log_kv)} {mib(est_c)} {mib(log_c)}",  # type: ignore[arg-type]
                  flush=True)
    elapsed = time.perf_counter() - t0
    worst = max(abs(float(r["error_pct"])) for r in results)  # type: ignore[arg-type]
    print()
    print(f"worst |error| {worst:.1f}% (target <= {TARGET_ABS_ERROR_PCT}%), {elapsed:.0f} s")
    summary = {
        "bench": "memory_accuracy", "model": args.model.name, "n_gpu_layers": args.n_gpu_layers,
        "measured": f"RSS after a {args.tokens}-token generation" + (" + NVML VRAM" if gpus else ""),
        "configs": [{k: r[k] for k in ("n_ctx", "slots", "estimate_bytes", "measured_bytes", "error_pct")}
                    for r in results],
        "worst_abs_error_pct": worst, "target_abs_error_pct_max": TARGET_ABS_ERROR_PCT,
        "target_met": worst <= TARGET_ABS_ERROR_PCT, "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(summary))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
