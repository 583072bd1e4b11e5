"""The `chorus` command line. Each subcommand is one small function; errors print as one paragraph."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cli import api as cli_api
from cli import docs as cli_docs
from cli import eval as cli_eval
from cli import init as cli_init
from cli import models as cli_models
from cli import run as cli_run
from cli import stop as cli_stop
from cli import ui as cli_ui
from cli import worker as cli_worker
from cli.output import gib as _gib
from cli.output import mib as _mib
from cli.output import print_table
from cli.parser import SuggestingParser
from orchestrator.app import MIN_N_CTX, Chorus, install_signal_cleanup
from orchestrator.errors import ChorusError
from orchestrator.logs import setup_app_log_for
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

log = logging.getLogger("chorus")

Command = Callable[[argparse.Namespace], int]


def _chorus(args: argparse.Namespace) -> Chorus:
    return Chorus.from_dir(args.config_dir)


# ---------------------------------------------------------------- commands

def cmd_check(args: argparse.Namespace) -> int:
    chorus = _chorus(args)
    config, registry = chorus.config, chorus.registry
    check = chorus.status()
    status, mem = check.base, check.memory
    report = check.to_dict()
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
    server = _chorus(args).serve(
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


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, else argparse's one-line usage error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


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


# ---------------------------------------------------------------- wiring

def global_options(*, defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. The top parser holds the defaults; the
    subcommands' copies default to SUPPRESS, so an option given before the subcommand is not overwritten
    by the subcommand's own default (`chorus --config-dir X check`, `chorus -v run ...`)."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", type=Path, default=default(None),
                        help="folder with app.yaml, models.yaml, pipeline.yaml "
                             "(default: $CHORUS_CONFIG_DIR, $CHORUS_HOME/config, ./config, ~/.config/chorus, else "
                             "the packaged default config; see `chorus init`)")
    common.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log chorus's debug details to stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = global_options(defaults=False)
    parser: argparse.ArgumentParser = SuggestingParser(
        prog="chorus", parents=[global_options(defaults=True)],
        description="Run several local GGUF models together in pipelines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    cli_models.register(sub, common)

    p = sub.add_parser("check", parents=[common],
                       help="show the registry, the base pipeline's status and free RAM/VRAM")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("serve", parents=[common], help="run one model's llama-server in the foreground")
    p.add_argument("model", help="a model name from models.yaml")
    p.add_argument("--n-ctx", type=_int_at_least(MIN_N_CTX), default=None,
                   help=f"context per slot, at least {MIN_N_CTX} (default: the model's)")
    p.add_argument("--n-gpu-layers", type=_int_at_least(-1), default=None,
                   help="layers on the GPU, -1 for all (default: the model's)")
    p.add_argument("--slots", type=_int_at_least(1), default=1, help="parallel request slots (at least 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ps", parents=[common], help="list running llama-server processes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ps)
    cli_stop.register(sub, common)

    p = sub.add_parser("plan", parents=[common],
                       help="per stage: each model's RAM/VRAM estimate, whether the stage fits, else its waves")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pipeline", type=Path, default=None, help="a pipeline file (default: the base pipeline.yaml)")
    src.add_argument("--manual", type=Path, default=None, help="a manual pipeline file")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="override a parameter, as for `chorus run` (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--png", type=Path, metavar="FILE",
                   help="also write the memory plan as a chart (per device and wave: weights, KV cache, compute "
                        "vs free memory) to FILE, a PNG image")
    p.set_defaults(func=cmd_plan)

    cli_init.register(sub, common)
    cli_run.register(sub, common)
    cli_ui.register(sub, common)
    cli_eval.register(sub, common)
    cli_api.register(sub, common)
    cli_docs.register(sub, common)
    cli_worker.register(sub, common)
    return parser


def format_error(exc: ChorusError) -> str:
    text = f"chorus: error: {exc.message}"
    if exc.hint:
        text += f" {exc.hint}"
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


class OneLineFormatter(logging.Formatter):
    """Log records on stderr as one line each: a debug or info record's traceback (NVML not there, a probe
    that failed) is shortened to its exception's one-line text; warnings and errors keep theirs."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.levelno < logging.WARNING:
            exc = record.exc_info[1]
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
        return super().format(record)


def setup_stderr_logging(verbose: bool) -> None:
    """Warnings on stderr; with -v chorus's own debug lines too, not those of the HTTP or asyncio libraries."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "chorus_stderr", False)]:
        root.removeHandler(old)  # main() called again in one process (tests): one stderr handler
    handler = logging.StreamHandler(sys.stderr)
    handler.chorus_stderr = True  # type: ignore[attr-defined]  # our marker on a stdlib handler (getattr above)
    handler.setFormatter(OneLineFormatter("chorus: %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)  # a log file may want more than stderr
    root.addHandler(handler)  # the root stays at WARNING: other libraries' debug lines never show
    if verbose:
        logging.getLogger("chorus").setLevel(logging.DEBUG)


def quiet_broken_pipe() -> int:
    """stdout's reader went away (`chorus ... | head`): no traceback, and no second error when Python flushes
    stdout at exit (the Python docs' recipe). 141 = 128 + SIGPIPE, what a shell reports for such a pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_stderr_logging(args.verbose)
    setup_app_log_for(getattr(args, "config_dir", None), getattr(args, "command", None))  # <logs_dir>/chorus.log
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a pipe's reader that left shows here, not at exit
        return code
    except BrokenPipeError:
        return quiet_broken_pipe()
    except ChorusError as exc:
        print(format_error(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chorus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
