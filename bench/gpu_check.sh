#!/usr/bin/env bash
# GPU check: the VRAM estimate against NVML, over the demo model and the synthetic zoo, and a real CUDA OOM.
#
#   bench/gpu_check.sh            (from anywhere; uses the repo's .venv, or $PYTHON)
#
# Where a GPU is present (nvidia-smi works) it
#   1. builds the CUDA llama-server (CHORUS_CUDA=1 scripts/build_llama_server.sh; restored from the build
#      cache when it was built before),
#   2. runs every zoo model and the demo model with full offload (-ngl -1) and partial offload (half the
#      layers), one request each, and compares the estimate (launcher/memory/estimate.py through MemoryGuard, with
#      the GPUs NVML reports) with NVML's per-process VRAM and the RSS, per row,
#   3. provokes a real CUDA out-of-memory: a server whose KV cache is 1.5x the GPU's memory, started without
#      chorus's admission check; it must fail as ServerOutOfMemory, and the same process must then start a
#      server that answers (the app survives).
# It ends with one JSON line (figures, target, pass/fail). Without a GPU it says so in that line and exits 0.
# Every server it starts is stopped on every exit path (ModelServer.stop in finally, signal cleanup, and
# PR_SET_PDEATHSIG when this script is killed).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-$REPO/.venv/bin/python}"
TARGET_PCT="${GPU_CHECK_TARGET_PCT:-5}"

no_gpu() {
  echo "no GPU: $1; the GPU check did not run"
  printf '{"bench": "gpu_check", "gpu": false, "ran": false, "reason": "%s", "target_abs_error_pct_max": %s, "target_met": null}\n' \
    "$1" "$TARGET_PCT"
  exit 0
}

command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi does not work (no driver or no device)"
nvidia-smi -L

echo "building the CUDA llama-server..."
if ! CHORUS_CUDA=1 scripts/build_llama_server.sh; then
  echo "the CUDA build failed"
  printf '{"bench": "gpu_check", "gpu": true, "ran": false, "reason": "CUDA build failed", "target_met": false}\n'
  exit 1
fi

exec "$PY" - "$TARGET_PCT" <<'PYEOF'
"""The GPU part: estimate vs NVML per zoo model and offload, then a real CUDA OOM that the app survives."""
import json
import sys
import time
from pathlib import Path

import httpx

REPO = Path.cwd()
sys.path.insert(0, str(REPO))

from bench.zoo.make_zoo import ensure_zoo  # noqa: E402
from launcher.memory.admission import MemoryGuard  # noqa: E402
from launcher.process.binary import find_llama_server  # noqa: E402
from launcher.memory.calibration import measure_server  # noqa: E402
from launcher.errors import ServerOutOfMemory, ServerStartError  # noqa: E402
from launcher.memory.gguf import read_gguf  # noqa: E402
from launcher.process.server import ModelServer, ServerOptions, ServerSpec, install_signal_cleanup  # noqa: E402

MiB = 1 << 20
TARGET = float(sys.argv[1])
install_signal_cleanup()
binary = find_llama_server()
logs = REPO / "logs" / "bench-gpu"
guard = MemoryGuard()
gpus = guard.gpus()
if not gpus:
    print(json.dumps({"bench": "gpu_check", "gpu": False, "ran": False, "reason": guard.gpu_note or "NVML: no GPU",
                      "target_met": None}))
    sys.exit(0)
print("GPUs (NVML):", ", ".join(f"{g.index}: {g.name} {g.total_bytes // MiB} MiB" for g in gpus))
models = {"demo": REPO / "models" / "gemma-3-270m-q4_k_m.gguf", **ensure_zoo()}


def ask(server: ModelServer, prompt: str = "Hello, world") -> int:
    r = httpx.post(f"{server.base_url}/completion", timeout=300, headers={"Authorization": f"Bearer {server.api_key}"},
                   json={"prompt": prompt, "n_predict": 4, "seed": 1})
    r.raise_for_status()
    return int(r.json().get("tokens_predicted", 0))


def pct(est: int, meas: int) -> float | None:
    return round((est - meas) / meas * 100, 1) + 0.0 if meas else None


rows = []
print(f"{'model':14} {'ngl':>4} | {'est VRAM':>9} {'NVML':>9} {'err':>7} | {'est RAM':>8} {'RSS':>8} {'err':>7}  (MiB)")
for name, path in models.items():
    n_layer = read_gguf(path).block_count or 1
    for ngl in (-1, max(1, (n_layer + 1) // 2)):
        spec = ServerSpec(name, path, n_ctx=4096, slots=1, n_gpu_layers=ngl, extra_args=("--ctx-checkpoints", "0"))
        est = guard.estimate(spec)
        server = ModelServer(spec, binary, logs, ServerOptions(log_verbosity=4, startup_timeout_s=300)).start()
        try:
            answered = ask(server)
            time.sleep(0.5)
            m = measure_server(server)
        finally:
            server.stop()
        vram = sum(m.vram_bytes.values()) if m else 0
        row = {"model": name, "n_gpu_layers": ngl, "gpu_layers_used": est.gpu_layers_used, "answered": answered,
               "estimate_vram_bytes": est.vram_bytes, "nvml_vram_bytes": vram,
               "vram_error_pct": pct(est.vram_bytes, vram),
               "estimate_ram_bytes": est.ram_bytes, "rss_bytes": m.rss_bytes if m else 0,
               "ram_error_pct": pct(est.ram_bytes, m.rss_bytes if m else 0),
               "estimate_breakdown": est.breakdown, "llama_cpp_buffers": m.buffers if m else {}}
        rows.append(row)
        print(f"{name:14} {ngl:>4} | {est.vram_bytes / MiB:9.1f} {vram / MiB:9.1f} "
              f"{row['vram_error_pct'] or 0:>+6.1f}% | {est.ram_bytes / MiB:8.1f} {row['rss_bytes'] / MiB:8.1f} "
              f"{row['ram_error_pct'] or 0:>+6.1f}%", flush=True)

# a real CUDA OOM: KV cache 1.5x the first GPU, admission bypassed (ModelServer directly, --fit off)
gpu = gpus[0]
phi = models["phi3-mini"]
meta = read_gguf(phi)
kv_per_token = (meta.block_count or 1) * 2 * (meta.head_count_kv_at(0) * (meta.key_length or 0)) * 2
n_ctx = int(gpu.total_bytes * 1.5 // kv_per_token) // 256 * 256
oom: dict[str, object] = {"n_ctx": n_ctx, "kv_bytes": n_ctx * kv_per_token, "gpu_total_bytes": gpu.total_bytes}
big = ServerSpec("oom", phi, n_ctx=n_ctx, slots=1, n_gpu_layers=-1)
server = ModelServer(big, binary, logs, ServerOptions(startup_timeout_s=300))
try:
    server.start()
    oom["error"] = None
    oom["started"] = True
except ServerOutOfMemory as exc:
    oom["error"], oom["started"] = f"{type(exc).__name__}: {exc}", False
except ServerStartError as exc:
    oom["error"], oom["started"] = f"{type(exc).__name__} (not classified as OOM): {exc}", False
finally:
    server.stop()
oom["classified_oom"] = str(oom.get("error") or "").startswith("ServerOutOfMemory")
after = ModelServer(ServerSpec("after", models["demo"], n_ctx=2048, n_gpu_layers=-1), binary, logs).start()
try:
    oom["answered_after"] = ask(after) >= 1
finally:
    after.stop()
print("OOM:", json.dumps(oom))

worst_vram = max((abs(r["vram_error_pct"]) for r in rows if r["vram_error_pct"] is not None), default=None)
failing = [r for r in rows if r["vram_error_pct"] is None or abs(r["vram_error_pct"]) > TARGET]
summary = {
    "bench": "gpu_check", "gpu": True, "ran": True, "gpus": [g.name for g in gpus],
    "rows": [{k: r[k] for k in ("model", "n_gpu_layers", "gpu_layers_used", "estimate_vram_bytes", "nvml_vram_bytes",
                                "vram_error_pct", "estimate_ram_bytes", "rss_bytes", "ram_error_pct")} for r in rows],
    "worst_abs_vram_error_pct": worst_vram, "target_abs_error_pct_max": TARGET, "rows_failing": len(failing),
    "oom": {k: oom[k] for k in ("n_ctx", "started", "classified_oom", "answered_after")},
    "target_met": not failing and bool(oom["classified_oom"]) and bool(oom["answered_after"]),
}
print(json.dumps(summary))
sys.exit(0 if summary["target_met"] else 1)
PYEOF
