"""`chorus worker`: run a llama.cpp RPC worker (upstream's rpc-server) on this machine until Ctrl-C.

Another machine's chorus names it in models.yaml (`rpc: ["this-host:50052"]`) and its llama-server puts part
of that model's layers here. The RPC protocol has NO authentication and lets any client that reaches the port
allocate memory and run computations here: listen on loopback, or on a trusted private network only.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from orchestrator.app import RPC_DEFAULT_PORT as DEFAULT_PORT
from orchestrator.app import find_rpc_server, is_loopback, query_memory, start_worker
from orchestrator.units import fmt_bytes

SECURITY_WARNING = (
    "WARNING: the RPC worker listens on {host}, which is not loopback. llama.cpp's RPC protocol has NO "
    "authentication and NO encryption: anyone who can reach {host}:{port} can use this machine's memory and "
    "CPU/GPU and may crash it. Run it only on a trusted network (a private LAN or a VPN), never on a public "
    "address; firewall the port to the machines that run chorus.")


def security_warning(host: str, port: int) -> str | None:
    """The loud warning for a worker that listens beyond this machine; None on loopback."""
    return None if is_loopback(host) else SECURITY_WARNING.format(host=host, port=port)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_worker(args: argparse.Namespace) -> int:
    warning = security_warning(args.host, args.port)
    if warning:
        bar = "!" * 100
        print(f"{bar}\n{warning}\n{bar}", file=sys.stderr, flush=True)
    binary = find_rpc_server()
    log_path = Path(args.log) if args.log else None
    worker = start_worker(binary, args.host, args.port, mem_mb=args.mem, threads=args.threads,
                          log_path=log_path, dies_with_parent=True)
    try:
        mem = query_memory(worker.endpoint)
        cap = f", address space capped at {args.mem} MiB" if args.mem else ""
        print(f"RPC worker on {worker.endpoint} (pid {worker.process.pid}, protocol {mem.version}): reports "
              f"{fmt_bytes(mem.free_bytes)} free of {fmt_bytes(mem.total_bytes)}{cap}. Name it in models.yaml "
              f"as  rpc: [\"{worker.endpoint}\"]. Ctrl-C stops it.", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            worker.process.wait()
        return 0 if worker.process.returncode in (None, 0, -signal.SIGTERM) else 1
    finally:
        worker.stop()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("worker", parents=[common],
                       help="run a llama.cpp RPC worker here: other machines' models put layers on it "
                            "(trusted networks only: the protocol has no authentication)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything else must be a trusted network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--mem", type=int, metavar="MB", default=None,
                   help="cap the worker's memory at MB MiB (its address space; rpc-server itself has no limit)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the worker's computations")
    p.add_argument("--log", default=None, metavar="FILE", help="append rpc-server's output to FILE")
    p.set_defaults(func=cmd_worker)
