"""`chorus stop MODEL|--all`: stop llama-servers that any chorus process of this user started.

`chorus serve`, the UI, the API and runs record their servers in `<logs_dir>/running/`; this stops the
recorded ones (the whole process group, SIGTERM then SIGKILL after the grace of app.yaml's
`server.stop_grace_s`) and says what it stopped. The owning process sees its server gone and starts a
fresh one when it needs it again.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.app import Chorus, ServerRecord

_DONE = {"stopped": "stopped", "killed": "killed (it did not stop within the grace period)",
         "gone": "had already exited", "not ours": "skipped: run by another user"}


def cmd_stop(args: argparse.Namespace) -> int:
    if args.all == bool(args.model):
        args.parser.error("give a model name or --all (one of them)")
    chorus = Chorus.from_dir(args.config_dir)
    running = chorus.servers()
    chosen = running if args.all else [r for r in running if r.model == args.model]
    if not chosen:
        if args.all:
            print("no llama-server running")
            return 0
        others = sorted({r.model for r in running})
        print(f"no llama-server of '{args.model}' is running"
              + (f" (running: {', '.join(others)})" if others else ""), file=sys.stderr)
        return 1
    failed = 0
    for record in chosen:
        result = chorus.stop_server(record)
        failed += result == "not ours"
        print(f"{_what(record)}: {_DONE[result]}")
    return 1 if failed else 0


def _what(r: ServerRecord) -> str:
    return f"{r.model} (pid {r.pid}, port {r.port}, started by pid {r.owner_pid})"
