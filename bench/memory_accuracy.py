"""Memory estimate vs. a real llama-server, over the demo model and the synthetic zoo (bench/zoo/).

    python bench/memory_accuracy.py [--models demo,llama3-8b,...] [--n-ctx 512,4096,32768] [--slots 1,3]

For every model, n_ctx (per slot) and slot count: estimate the server's RAM from the GGUF header alone
(`MemoryGuard.estimate`, i.e. launcher/memory/estimate.py), start the real server (at -lv 4, so llama.cpp logs its
buffer sizes), send one request, measure it, stop it. One row each, then the worst row.

"Measured" is the server's *peak* RSS, read after the request (`launcher.memory.calibration.measure_server`):

- n_ctx <= --fill-max (default 512): the request really fills slot 0's context (n_ctx - 8 prompt tokens), so
  every buffer is as full as a real run makes it: the RSS then is the peak.
- larger n_ctx (4096, 32768): filling them takes minutes to hours per row on two shared cores, so the
  server runs with glibc's ``MALLOC_PERTURB_``, which writes every allocation once when it is made (KV
  cache, compute buffer, logits, repacked weights: all resident, as with a full context), and gets a short
  request. That also makes resident what a real run allocates and never touches (26-42 MiB here: HTTP and
  tokenizer buffers), so that amount, measured per model and slot count as perturbed minus real RSS of
  the filled 512 run, is taken off. No estimate enters a measured figure. ``--fill-max 4096`` really
  fills the 4096 rows too (about 3 minutes a row on two busy cores).

The mapped model file is resident in every case (llama.cpp maps it with MAP_POPULATE). Servers run with
``--ctx-checkpoints 0``: a SWA model's server otherwise keeps a copy of the slot's SWA cache per prompt
(up to 32 per slot), which one request does not show; `EstimatorSettings.ctx_checkpoints` counts them.
With a GPU, VRAM is measured per process through NVML and added.

Each row says how its compute buffer was sized: ``formula`` (launcher/memory/estimate.py's closed form for the
architecture) or ``calibrated`` (a per-architecture factor measured once, `estimate.COMPUTE_CALIBRATION`).

Target: |error| <= 5% of the measured peak for every row. The last line is one JSON object with the
figures, the target and pass/fail. Killed by a timeout (SIGTERM, SIGHUP, Ctrl-C) it stops its server before
exiting; killed with SIGKILL, the server dies with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.zoo.make_zoo import ensure_zoo  # noqa: E402
from launcher.memory.admission import MemoryGuard  # noqa: E402
from launcher.memory.calibration import measure_server  # noqa: E402
from launcher.memory.estimate import compute_basis  # noqa: E402
from launcher.memory.gguf import read_gguf  # noqa: E402
from launcher.process.binary import find_llama_server  # noqa: E402
from launcher.process.server import ModelServer, ServerOptions, ServerSpec, install_signal_cleanup  # noqa: E402

MiB = 1 << 20
TARGET_ABS_ERROR_PCT = 5
N_CTX = (512, 4096, 32768)
SLOTS = (1, 3)
DEMO = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
PERTURB = {"MALLOC_PERTURB_": "85"}  # glibc writes this byte into every allocation: all of it is resident


def request(server: ModelServer, n_ctx: int, fill: bool, vocab: int) -> dict[str, object]:
    """One completion: a prompt that fills the slot's context (fill) or a short one."""
    rng = random.Random(n_ctx)
    prompt: object = [rng.randrange(100, min(vocab, 2000)) for _ in range(n_ctx - 8)] if fill else "Hello, world"
    body = {"prompt": prompt, "n_predict": 4, "seed": 1, "temperature": 0, "cache_prompt": False}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    r = httpx.post(f"{server.base_url}/completion", json=body, headers=headers, timeout=900)
    r.raise_for_status()
    data = r.json()
    return {"prompt_tokens": int(data.get("tokens_evaluated", 0)), "predicted": int(data.get("tokens_predicted", 0))}


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / MiB:8.1f}"


SERVER_ARGS = ("--ctx-checkpoints", "0")


def run_one(binary: Path, name: str, model: Path, n_ctx: int, slots: int, ngl: int, logs: Path,
            guard: MemoryGuard, fill: bool, perturb: bool) -> dict[str, object]:
    """Start, one request, measure, stop: one server's figures."""
    spec = ServerSpec(name, model, n_ctx=n_ctx, n_gpu_layers=ngl, slots=slots, extra_args=SERVER_ARGS)
    est = guard.estimate(spec)
    meta = read_gguf(model)
    options = ServerOptions(log_verbosity=4, startup_timeout_s=300, env=PERTURB if perturb else {})
    server = ModelServer(spec, binary, logs, options).start()
    try:
        t0 = time.perf_counter()
        req = request(server, n_ctx, fill, meta.vocab_size or 32000)
        req_s = time.perf_counter() - t0
        time.sleep(0.2)
        m = measure_server(server)
    finally:
        server.stop()
    assert m is not None, "the server died before it could be measured"
    measured = m.rss_bytes + sum(m.vram_bytes.values())
    estimate = est.ram_bytes + (est.vram_bytes if m.vram_bytes else 0)

    def kind(buffers: dict[str, dict[str, int]], *kinds: str) -> int:
        return sum(v for dev in buffers.values() for k, v in dev.items() if k in kinds)

    return {
        "model": name, "arch": meta.architecture, "n_ctx": n_ctx, "slots": slots, "n_gpu_layers": ngl,
        "estimate_bytes": estimate, "measured_bytes": measured,
        "error_pct": round((estimate - measured) / measured * 100, 1) + 0.0,  # no -0.0
        "compute_basis": compute_basis(meta), "filled": fill, "perturbed": perturb,
        "request": req, "request_s": round(req_s, 1),
        "rss_bytes": m.rss_bytes, "rss_anon_bytes": m.rss_anon_bytes, "rss_file_bytes": m.rss_file_bytes,
        "vram_bytes": sum(m.vram_bytes.values()),
        "est_weights": kind(est.breakdown, "weights", "weights_repacked"), "log_weights": kind(m.buffers, "weights"),
        "est_kv": kind(est.breakdown, "kv"), "log_kv": kind(m.buffers, "kv"),
        "est_compute": kind(est.breakdown, "compute"), "log_compute": kind(m.buffers, "compute"),
        "est_other": kind(est.breakdown, "output", "overhead"),
        "estimate_breakdown": est.breakdown, "llama_cpp_buffers": m.buffers,
    }


HEADER = (f"{'model':14} {'n_ctx':>6} {'sl':>2} | {'estimate':>8} {'measured':>8} {'error':>7} | {'est wts':>8} "
          f"{'log wts':>8} {'est KV':>8} {'log KV':>8} {'est cmp':>8} {'log cmp':>8} | {'anon':>8} {'file':>8} "
          f"| how   compute  (MiB)")


def row_text(r: dict[str, object]) -> str:
    return (f"{r['model']:14} {r['n_ctx']:>6} {r['slots']:>2} | {mib(r['estimate_bytes'])} "  # type: ignore[arg-type]
            f"{mib(r['measured_bytes'])} {r['error_pct']:>+6.1f}% | {mib(r['est_weights'])} "  # type: ignore[arg-type]
            f"{mib(r['log_weights'])} {mib(r['est_kv'])} {mib(r['log_kv'])} "  # type: ignore[arg-type]
            f"{mib(r['est_compute'])} {mib(r['log_compute'])} | {mib(r['rss_anon_bytes'])} "  # type: ignore[arg-type]
            f"{mib(r['rss_file_bytes'])} | {'fill' if r['filled'] else 'pert':5}  {r['compute_basis']}")  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated: demo and zoo names (default: all)")
    parser.add_argument("--n-ctx", default=",".join(map(str, N_CTX)))
    parser.add_argument("--slots", default=",".join(map(str, SLOTS)))
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--fill-max", type=int, default=512, help="really fill the context up to this n_ctx")
    parser.add_argument("--no-perturb", action="store_true", help="never use MALLOC_PERTURB_ (short requests "
                        "above --fill-max then measure less than the peak)")
    args = parser.parse_args()
    install_signal_cleanup()  # a timeout's SIGTERM stops the server being measured, then exits
    binary = find_llama_server()
    logs = REPO / "logs" / "bench-memory"
    wanted = [m for m in args.models.split(",") if m]
    models: dict[str, Path] = {"demo": DEMO} if not wanted or "demo" in wanted else {}
    models.update(ensure_zoo(names=[m for m in wanted if m != "demo"] or None) if wanted != ["demo"] else {})
    guard = MemoryGuard()
    gpus = guard.gpus()
    n_ctxs = [int(x) for x in args.n_ctx.split(",")]
    slot_counts = [int(x) for x in args.slots.split(",")]
    print(f"models {', '.join(models)}; n_gpu_layers {args.n_gpu_layers}; "
          f"{'GPUs: ' + ', '.join(g.name for g in gpus) if gpus else guard.gpu_note}")
    print(f"measured = peak RSS: after a request that fills slot 0's context (fill: n_ctx <= {args.fill_max}), else "
          "with MALLOC_PERTURB_ less the never-touched allocations (perturbed - real RSS, filled 512 run)")
    print("estimate = launcher/memory/estimate.py via MemoryGuard.estimate; compute: formula or calibrated "
          "per architecture")
    print()
    print(HEADER)
    print("-" * len(HEADER))
    results = []
    t0 = time.perf_counter()
    for name, path in models.items():
        for slots in slot_counts:
            gap: int | None = None  # allocated, never touched by a real run: perturbed minus real, filled
            for n_ctx in n_ctxs:
                fill = n_ctx <= args.fill_max
                r = run_one(binary, name, path, n_ctx, slots, args.n_gpu_layers, logs, guard, fill, False if fill
                            else not args.no_perturb)
                if fill and gap is None and not args.no_perturb and any(c > args.fill_max for c in n_ctxs):
                    p = run_one(binary, name, path, n_ctx, slots, args.n_gpu_layers, logs, guard, True, True)
                    gap = int(p["measured_bytes"]) - int(r["measured_bytes"])  # type: ignore[call-overload]
                if r["perturbed"]:
                    r["untouched_bytes"] = gap or 0
                    r["measured_bytes"] = int(r["measured_bytes"]) - (gap or 0)  # type: ignore[call-overload]
                    est_b, meas_b = int(r["estimate_bytes"]), int(r["measured_bytes"])  # type: ignore[call-overload]
                    r["error_pct"] = round((est_b - meas_b) / meas_b * 100, 1) + 0.0
                results.append(r)
                print(row_text(r), flush=True)
    elapsed = time.perf_counter() - t0
    worst = max(results, key=lambda r: abs(float(r["error_pct"])))  # type: ignore[arg-type]
    worst_pct = abs(float(worst["error_pct"]))  # type: ignore[arg-type]
    failing = [r for r in results if abs(float(r["error_pct"])) > TARGET_ABS_ERROR_PCT]  # type: ignore[arg-type]
    print()
    print(f"worst row: {row_text(worst)}")
    print(f"worst |error| {worst_pct:.1f}% (target <= {TARGET_ABS_ERROR_PCT}% on every row), "
          f"{len(results) - len(failing)}/{len(results)} rows within target, {elapsed:.0f} s")
    summary = {
        "bench": "memory_accuracy", "models": list(models), "n_gpu_layers": args.n_gpu_layers,
        "measured": f"RSS after filling slot 0's context for n_ctx <= {args.fill_max}; above: RSS with "
                    "MALLOC_PERTURB_ less (perturbed - real RSS of the filled 512 run)"
                    + (" + NVML VRAM" if gpus else ""),
        "server_args": list(SERVER_ARGS),
        "rows": [{k: r[k] for k in ("model", "n_ctx", "slots", "estimate_bytes", "measured_bytes", "error_pct",
                                    "compute_basis", "filled", "perturbed", "untouched_bytes")
                  if k in r} for r in results],
        "worst": {k: worst[k] for k in ("model", "n_ctx", "slots", "error_pct")},
        "worst_abs_error_pct": worst_pct, "target_abs_error_pct_max": TARGET_ABS_ERROR_PCT,
        "rows_failing": len(failing), "target_met": not failing, "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(summary))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
