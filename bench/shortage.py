"""The base pipeline under shrinking memory budgets: does every call still answer, in waves, without reloads?

The shipped base pipeline (analyse → draft → three reviewers of one model → synthesis) on the two demo models,
with n_ctx 8192 so that the reviewers' server grows with its slots (1, 2, 3 slots of smollm2-135m need about
320, 500 and 680 MiB; gemma3-270m about 410 MiB). `server.memory_budget_mib` goes from "everything fits at
once" down to "only one 1-slot server fits", then below the largest one-call need. Each budget is one
`chorus run` in a fresh process, on this machine's real memory, with nothing left running between budgets.

Per budget: status, calls answered, waves per stage, the slots of each wave's servers, servers started,
wall time (the run's, from the session record), and the bound it must meet:

    bound = sum over every wave (each stage's waves and each synthesis) of its slowest call's request time
          + one server start per wave (the slowest cold start of the demo models, measured in this run)

Target: every budget at or above the largest one-call need completes with every call answered and a wall
time within its bound (no model that stayed in memory is loaded again); every budget below it is refused
before any server starts. The last line is one JSON object with the figures, targets and pass/fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/: bench/launcher.py would shadow the launcher package

import yaml  # noqa: E402

from launcher.memory.fit import footprint  # noqa: E402
from launcher.process.server import ModelServer, ServerOptions  # noqa: E402
from orchestrator.config.schema import load_config  # noqa: E402
from orchestrator.runtime import Runtime  # noqa: E402

MiB = 2**20
N_CTX, TOKENS = 8192, 16
QUESTION = "Why is the sky blue?"
SETS = [f"defaults.n_ctx={N_CTX}", f"defaults.max_tokens={TOKENS}", "defaults.seed=7"]


def make_config(root: Path) -> Path:
    """The shipped config, its models_dir the repo's models/, history and logs in `root`."""
    cfg = root / "config"
    if cfg.exists():
        return cfg
    subprocess.run(["cp", "-r", str(REPO / "config"), str(cfg)], check=True)
    app = yaml.safe_load((cfg / "app.yaml").read_text())
    app.update(models_dir=str(REPO / "models"), sessions_dir=str(root / "sessions"), logs_dir=str(root / "logs"))
    (cfg / "app.yaml").write_text(yaml.safe_dump(app))
    return cfg


def set_budget(cfg: Path, mib: int) -> None:
    app = yaml.safe_load((cfg / "app.yaml").read_text())
    app["server"]["memory_budget_mib"] = mib
    (cfg / "app.yaml").write_text(yaml.safe_dump(app))


def needs(cfg: Path) -> dict[str, float]:
    """The scheduler's own figures (MiB on the budget) for the servers this pipeline can use."""
    rt = Runtime(load_config(cfg))
    g = rt.memory_guard
    out = {f"smollm2-135m x{k}": footprint(g.need(rt.server_spec("smollm2-135m", n_ctx=N_CTX, slots=k))) / MiB
           for k in (1, 2, 3)}
    out["gemma3-270m x1"] = footprint(g.need(rt.server_spec("gemma3-270m", n_ctx=N_CTX))) / MiB
    return out


def cold_start_s(cfg: Path) -> float:
    """The slowest cold start (spawn → /health) of any server the pipeline may start: each demo model at each
    slot count it may run with (a 3-slot server allocates more before it answers)."""
    rt = Runtime(load_config(cfg))
    worst = 0.0
    for model, slots in (("gemma3-270m", 1), ("smollm2-135m", 1), ("smollm2-135m", 2), ("smollm2-135m", 3)):
        spec = rt.server_spec(model, n_ctx=N_CTX, slots=slots)
        server = ModelServer(spec, rt.binary, Path(tempfile.mkdtemp()), ServerOptions(startup_timeout_s=120))
        t0 = time.perf_counter()
        server.start()
        worst = max(worst, time.perf_counter() - t0)
        server.stop()
    return worst


def server_starts(logs: Path) -> int:
    return sum(1 for p in logs.glob("*.log") if p.name != "chorus.log") if logs.is_dir() else 0


def one_budget(root: Path, cfg: Path, mib: int) -> dict[str, Any]:
    logs = root / "logs"
    if logs.exists():
        subprocess.run(["rm", "-rf", str(logs)], check=True)
    set_budget(cfg, mib)
    env = {**os.environ, "CHORUS_ADMISSION_LEDGER": str(root / f"ledger-{mib}.json")}
    cmd = [sys.executable, "-m", "cli", "run", QUESTION, "--json", "--config-dir", str(cfg)]
    for s in SETS:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    process_s = time.perf_counter() - t0
    data = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
    row: dict[str, Any] = {"budget_mib": mib, "status": data.get("status", f"exit {out.returncode}"),
                           "servers_started": server_starts(logs), "process_s": round(process_s, 1)}
    if not data:
        row["error"] = out.stderr[-500:]
        return row
    if data.get("error"):
        row["error"] = data["error"].get("message", "")[:300]
    stages = data.get("stages", [])
    calls = answered = 0
    waves = 0
    wave_time = 0.0
    shape = []
    for stage in stages:
        by_label = {r["label"]: r for r in stage.get("responses", [])}
        calls += len(by_label)
        answered += sum(1 for r in by_label.values() if r.get("status") == "ok")
        for wave, servers in zip(stage.get("waves", []), stage.get("wave_servers", []), strict=False):
            waves += 1
            wave_time += max((by_label[label].get("total_s") or 0.0) for label in wave)
            shape.append(f"{stage['name']}:" + "+".join(f"{s['model']}x{s['slots']}{'' if s['started'] else '(warm)'}"
                                                      for s in servers["servers"]))
        for syn in ((stage.get("aggregation") or {}).get("details") or {}).get("synthesis_calls", []):
            calls += 1
            answered += syn.get("status") == "ok"
            waves += 1
            wave_time += syn.get("total_s") or 0.0
    row.update(calls=calls, answered=answered, waves=waves, shape=shape,
               wall_s=round((data.get("finished_at") or 0) - (data.get("started_at") or 0), 2),
               waves_s=round(wave_time, 2))
    return row


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="chorus-shortage-"))
    cfg = make_config(root)
    need = needs(cfg)
    largest_one_call = max(need["smollm2-135m x1"], need["gemma3-270m x1"])
    two, three, gemma = need["smollm2-135m x2"], need["smollm2-135m x3"], need["gemma3-270m x1"]
    budgets = sorted({
        int(three + gemma) + 16,              # everything at once, the draft's server kept warm
        int(max(three, gemma)) + 8,           # the 3-slot reviewers alone
        int((two + three) / 2),               # 2 slots, then 1 call on the same server
        int(max(two, gemma)) + 8,             # 2 slots, just
        int((max(two, gemma) + largest_one_call) / 2),  # 1 slot: three waves
        int(largest_one_call) + 2,            # only the largest 1-slot server fits
        int(largest_one_call * 0.8),          # below the largest one-call need: refused
    }, reverse=True)
    start_s = cold_start_s(cfg)
    print(f"needs on the budget (MiB, n_ctx {N_CTX}): " + ", ".join(f"{k} {v:.0f}" for k, v in need.items()))
    print(f"largest one-call need: {largest_one_call:.0f} MiB; slowest cold server start: {start_s:.2f} s\n")
    rows = []
    for mib in budgets:
        row = one_budget(root, cfg, mib)
        should_run = mib >= largest_one_call
        if should_run:
            row["bound_s"] = round(row.get("waves_s", 0.0) + row.get("waves", 0) * start_s, 2)
            row["pass"] = (row["status"] == "completed" and row.get("answered") == row.get("calls")
                           and row.get("wall_s", 1e9) <= row["bound_s"])
        else:
            row["pass"] = (row["status"] == "failed" and row["servers_started"] == 0
                           and "does not fit even alone" in row.get("error", ""))
        rows.append(row)
        print(f"budget {mib:5d} MiB: {row['status']:9s} calls {row.get('answered', 0)}/{row.get('calls', 0)}  "
              f"waves {row.get('waves', 0)}  starts {row['servers_started']}  wall {row.get('wall_s', '-')}s  "
              f"bound {row.get('bound_s', '-')}s  {'PASS' if row['pass'] else 'FAIL'}")
        for s in row.get("shape", []):
            print(f"      {s}")
        if row.get("error") and not row["pass"]:
            print(f"      {row['error']}")
    ok = len(rows) >= 6 and all(r["pass"] for r in rows)
    print(json.dumps({"bench": "shortage", "n_ctx": N_CTX, "max_tokens": TOKENS, "needs_mib": {k: round(v, 1)
                      for k, v in need.items()}, "largest_one_call_mib": round(largest_one_call, 1),
                      "cold_start_s": round(start_s, 2), "rows": rows,
                      "targets": {"at_or_above_largest_one_call": "completed, every call answered, wall <= bound",
                                  "below": "refused before any server starts", "budgets": ">= 6"},
                      "pass": ok}))
    with contextlib.suppress(OSError):
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
