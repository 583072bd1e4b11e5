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
