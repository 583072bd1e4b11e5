"""`chorus check | serve | ps | plan`: what the registry and this machine offer, one model's llama-server in the
foreground, the llama-servers running, and what a pipeline would need where."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cli import run as cli_run
from cli.output import gib as _gib
from cli.output import mib as _mib
from cli.output import print_table
from orchestrator.app import Chorus, install_signal_cleanup
from orchestrator.plan.memory import (
    MemoryPlan,
    ServerNeed,
    plan_header,
    plan_rows,
    stage_headline,
    stage_wave_lines,
)
from orchestrator.plan.resolve import RetrievalPlan, RunPlan
from orchestrator.units import fmt_bytes


def _chorus(args: argparse.Namespace) -> Chorus:
    return Chorus.from_dir(args.config_dir)


def cmd_check(args: argparse.Namespace) -> int:
    chorus = _chorus(args)
    config, registry = chorus.config, chorus.registry
    check = chorus.status()
    status, mem = check.base, check.memory
    report = check.to_dict()
    report.setdefault("sessions_dir", str(config.sessions_dir))  # every folder in use, as README says
    report.setdefault("logs_dir", str(config.app.logs_dir))
    server = report["llama_server"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"config:     {config.paths.config_dir}")
    if server["path"]:
        print(f"server:     {server['path']} ({server['version']})")
    else:
        print(f"server:     NOT FOUND. {server['error']}")
    print(f"models dir: {config.models_dir}" + ("" if report["models_dir_exists"] else "  (NOT FOUND)"))
    print(f"sessions:   {config.sessions_dir}" + ("" if config.sessions_dir.is_dir() else "  (made at the first run)"))
    print(f"logs:       {config.app.logs_dir}" + ("" if config.app.logs_dir.is_dir() else "  (created when needed)"))
    print()
    print_table([(r.name, r.status, r.known_mode, r.reason or r.entry.description) for r in registry.records.values()],
                ["MODEL", "STATUS", "MODE", "NOTE"])
    print()
    if status.available:
        print("base pipeline: available")
    else:
        still = "manual mode can use remote models only" if server["path"] is None else "manual mode still works"
        print(f"base pipeline: BLOCKED, base mode is unavailable ({still})")
        for model, reason in status.missing.items():
            print(f"  - {model}: {reason}")
    print()
    print(f"RAM:  {_gib(mem.ram_available_bytes)} free of {_gib(mem.ram_total_bytes)}")
    if mem.cgroup is not None:
        cg = mem.cgroup
        print(f"      (container limit {fmt_bytes(cg.limit_bytes)}, {fmt_bytes(cg.usage_bytes)} used, cgroup "
              f"v{cg.version} {cg.path}; host has {fmt_bytes(mem.host_ram_available_bytes)} free)")
    for device in mem.extra:
        print(f"{device.name.capitalize()}: {_gib(device.free_bytes)} free of {_gib(device.total_bytes)} "
              f"({device.note})")
    if mem.gpus:
        for g in mem.gpus:
            print(f"VRAM: GPU {g.index} {g.name}: {_gib(g.free_bytes)} free of {_gib(g.total_bytes)}")
    else:
        print(f"VRAM: {mem.gpu_note or 'no GPU'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    install_signal_cleanup()
    # "Ctrl-C stops it" must hold also when we were started with SIGINT ignored (`chorus serve … &` in a
    # script, a test runner's worker): Python then installs no KeyboardInterrupt handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = _chorus(args).serve(  # too many --slots: the refusal says how many fit (launcher/memory/suggest.py)
        args.model, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers, slots=args.slots,
        announce=lambda spec: print(f"starting llama-server for '{spec.model}' (n_ctx={spec.n_ctx}, "
                                    f"n_gpu_layers={spec.n_gpu_layers}, slots={spec.slots})...", file=sys.stderr))
    spec = server.spec
    print(f"ready in {server.ready_s:.1f}s: {server.base_url}  (OpenAI base: {server.base_url}/v1)")
    print(f"pid {server.pid}, api key {server.api_key}, log {server.log_path}")
    print("Ctrl-C stops it.", file=sys.stderr, flush=True)
    try:
        while server.is_alive():
            time.sleep(0.5)
        if server.process is not None and server.process.returncode in (0, -signal.SIGTERM):
            # llama-server exits 0 when it shuts down on SIGTERM: another process stopped it
            print(f"llama-server for '{spec.model}' was stopped from outside (`chorus stop`?)", file=sys.stderr)
            return 0
        raise server.failure()
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
        return 0
    finally:
        server.stop()


def cmd_ps(args: argparse.Namespace) -> int:
    records = _chorus(args).servers()
    if args.json:
        print(json.dumps([{**vars(r), "rss_bytes": r.rss_bytes()} for r in records], indent=2))
        return 0
    if not records:
        print("no llama-server running")
        return 0
    print_table([(r.pid, r.port, r.model, r.n_ctx, r.n_gpu_layers, r.slots, _mib(r.rss_bytes()),
                  r.owner_pid if r.owner_alive() else f"{r.owner_pid} (gone)")  # orphan: next start stops it
                 for r in records], ["PID", "PORT", "MODEL", "N_CTX", "NGL", "SLOTS", "RSS", "OWNER"])
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.plan.memory import machine_view

    chorus = _chorus(args)
    planned = chorus.plan(cli_run.pipeline_of(args, chorus, blocked_ok=True))
    run_plan, plan = planned.run, planned.memory
    if args.png:
        write_memory_png(plan, args.png)
    machines = machine_view(run_plan, plan)
    if args.json:
        print(json.dumps({**plan_json(run_plan, plan), "machines": [m.to_dict() for m in machines]}, indent=2))
        return 0
    resources = chorus.config.app.resources
    print(plan_header(plan, resources.fraction, resources.fixed_mib))
    if run_plan.blocked is not None:
        print(run_plan.blocked.message)
    for stage, resolved in zip(plan.stages, run_plan.stages, strict=True):
        print()
        if resolved.retrieval is not None:  # no model call: passages from docs.db, nothing to fit in memory
            print(f"stage '{stage.stage}': {retrieve_text(resolved.retrieval)}")
            continue
        print(f"stage '{stage.stage}': {stage_headline(stage)}")
        print_table([(r["wave"], r["model"], r["labels"], r["n_ctx"], r["ngl"], r["slots"], r["server"],
                      *_plan_memory_cells(r["need"])) for r in plan_rows(stage)],
                    ["WAVE", "MODEL", "LABELS", "N_CTX", "NGL", "SLOTS", "SERVER", "RAM", "VRAM", "FIGURE"])
        for line in stage_wave_lines(stage):
            print(f"  {line}")
    if len(machines) > 1:  # RPC workers or remote endpoints: where each part runs
        print("\nper machine:")
        print_table([(m.machine, ", ".join(m.models) or "-", fmt_bytes(m.need_bytes) if m.need_bytes is not None
                      else "-", fmt_bytes(m.have_bytes) if m.have_bytes is not None else "-", m.note)
                     for m in machines], ["MACHINE", "RUNS", "NEEDS", "FREE", "NOTE"])
    workers_short = any(m.kind == "rpc" and m.note for m in machines)
    return 0 if plan.fits and run_plan.blocked is None and not workers_short else 1


def retrieve_text(retrieval: RetrievalPlan) -> str:
    """A retrieve stage in `chorus plan`: its collection and passage count (and the query's embedder)."""
    embedder = f", query embedded by {retrieval.embedder.model}" if retrieval.embedder is not None else ""
    return f"retrieve from {retrieval.collection} (top_k {retrieval.top_k}){embedder}"


def write_memory_png(plan: MemoryPlan, path: Path) -> None:
    """`chorus plan --png`: the memory chart as a PNG (matplotlib is imported only when asked for)."""
    from orchestrator.charts import memory_chart, save_png

    print(f"memory chart written to {save_png(memory_chart(plan), path)}", file=sys.stderr)


def _plan_memory_cells(m: ServerNeed) -> tuple[str, str, str]:
    """RAM, VRAM and FIGURE of one row: a missing model says so instead of showing zero bytes."""
    if m.source == "unavailable":
        return "-", "-", f"missing: {m.reason or 'not registered'}"
    if m.remote:
        return "remote", "-", m.source
    return _gib(m.ram_bytes), _gib(m.vram_bytes), m.reason or m.source


def plan_json(run_plan: RunPlan, memory: MemoryPlan) -> dict[str, Any]:
    """The memory plan, with the resolved plan it was made from: server specs (slots included) and, per
    stage, each call's target and generation request."""
    resolved = run_plan.to_dict()
    data = {**memory.to_dict(), "mode": resolved["mode"], "blocked": resolved["blocked"],
            "servers": resolved["servers"]}
    for stage, calls in zip(data["stages"], resolved["stages"], strict=True):
        stage["calls"], stage["synthesis_call"] = calls["calls"], calls["synthesis"]
    return data
