"""Every command's arguments, and which function runs it: all that `chorus --help`, `chorus CMD --help` and an
argument error need, without the engine. A command is named by module and function (`Lazy`) and imported
when it runs: a command loads its own module only, and `chorus api` and `chorus ui`, which supervise a child
that imports the engine itself, never load orchestrator.app."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from cli import api as cli_api
from cli import ui as cli_ui
from cli.output import positive_int
from orchestrator.limits import JUDGE_MAX_TOKENS, MIN_N_CTX, RPC_DEFAULT_PORT

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

Command = Callable[[argparse.Namespace], int]


class Lazy:
    """A command named by its module and function, imported when it is called."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def resolve(self) -> Command:
        command: Command = getattr(importlib.import_module(self.module), self.name)
        return command

    def __call__(self, args: argparse.Namespace) -> int:
        return self.resolve()(args)

    def __repr__(self) -> str:
        return f"Lazy({self.module!r}, {self.name!r})"


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Every command, in the order `chorus --help` lists them."""
    for add in (add_models, add_servers, add_init, add_run, add_ui, add_eval, add_api, add_docs, add_worker):
        add(sub, common)


# ---------------------------------------------------------------- argument types

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


def _duration(text: str) -> float:
    from orchestrator.history.export import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------- commands

def add_models(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common],
                       help="list configured models and whether they are usable, and .gguf files not yet added")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=Lazy("cli.models", "cmd_models"))
    actions = p.add_subparsers(dest="models_command", metavar="[list | add FILE]")
    a = actions.add_parser("list", parents=[common], help="the same as `chorus models`")
    a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print a JSON list")
    a.set_defaults(func=Lazy("cli.models", "cmd_models"))
    a = actions.add_parser("add", parents=[common], help="add a .gguf file to models.yaml (comments kept)")
    a.add_argument("file", help="a .gguf file: a name in models_dir or a path")
    a.add_argument("--name", default=None, help="the model's name in models.yaml (default: from the file name)")
    a.set_defaults(func=Lazy("cli.models", "cmd_models_add"))


def add_servers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """check, serve, ps, stop and plan."""
    p = sub.add_parser("check", parents=[common],
                       help="show the registry, the base pipeline's status and free RAM/VRAM")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=Lazy("cli.servers", "cmd_check"))

    p = sub.add_parser("serve", parents=[common], help="run one model's llama-server in the foreground")
    p.add_argument("model", help="a model name from models.yaml")
    p.add_argument("--n-ctx", type=_int_at_least(MIN_N_CTX), default=None,
                   help=f"context per slot, at least {MIN_N_CTX} (default: the model's)")
    p.add_argument("--n-gpu-layers", type=_int_at_least(-1), default=None,
                   help="layers on the GPU, -1 for all (default: the model's)")
    p.add_argument("--slots", type=_int_at_least(1), default=1, help="parallel request slots (at least 1)")
    p.set_defaults(func=Lazy("cli.servers", "cmd_serve"))

    p = sub.add_parser("ps", parents=[common], help="list running llama-server processes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=Lazy("cli.servers", "cmd_ps"))

    p = sub.add_parser("stop", parents=[common], help="stop the llama-servers of a model (or all) that chorus started")
    p.add_argument("model", nargs="?", help="a model name, as `chorus ps` lists it")
    p.add_argument("--all", action="store_true", help="stop every llama-server chorus started (this user's)")
    p.set_defaults(func=Lazy("cli.stop", "cmd_stop"), parser=p)

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
    p.set_defaults(func=Lazy("cli.servers", "cmd_plan"))


def add_init(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common],
                       help="write the default config (app.yaml, models.yaml, pipeline.yaml) into a folder")
    p.add_argument("dir", nargs="?", type=Path, default=None,
                   help="the folder (default: $CHORUS_HOME/config, else ~/.config/chorus)")
    p.add_argument("--force", action="store_true", help="overwrite config files that are already there")
    p.set_defaults(func=Lazy("cli.init", "cmd_init"))


def add_run(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """run and history."""
    p = sub.add_parser("run", parents=[common], help="run the base pipeline (or a manual one) for a question")
    p.add_argument("question", help="the question; - reads it from stdin")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pipeline", type=Path, help="a base-mode pipeline file instead of config/pipeline.yaml")
    src.add_argument("--manual", type=Path, help="a manual pipeline file (runs with whatever models are available)")
    _run_options(p)
    p.set_defaults(func=Lazy("cli.run", "cmd_run"))

    h = sub.add_parser("history", parents=[common],
                       help="list, show, search, rerun, export and remove saved sessions")
    hs = h.add_subparsers(dest="history_command", metavar="ACTION")
    hs.required = True
    p = hs.add_parser("list", parents=[common], help="saved sessions, newest first")
    p.add_argument("--limit", type=_int_at_least(1), default=50, help="the newest N sessions (default 50)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_list"))
    p = hs.add_parser("show", parents=[common], help="every step of one session")
    p.add_argument("id", help="e.g. 7 or session_007")
    p.add_argument("--json", action="store_true")
    p.add_argument("--png", type=Path, metavar="FILE",
                   help="also write the run's timeline (one bar per model call, with tokens/s) as a PNG image")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_show"))
    p = hs.add_parser("search", parents=[common], help="full-text search in questions, answers and steps")
    p.add_argument("text")
    p.add_argument("--limit", type=_int_at_least(1), default=20, help="the best N matches (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_search"))
    p = hs.add_parser("rerun", parents=[common], help="run a session again from stage N (a new linked session)")
    p.add_argument("id")
    p.add_argument("--stage", type=int, required=True, help="first stage to run again (1-based)")
    _run_options(p)
    p.set_defaults(func=Lazy("cli.run", "cmd_history_rerun"))
    p = hs.add_parser("reindex", parents=[common], help="rebuild the SQLite index from the session files")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_reindex"))
    p = hs.add_parser("export", parents=[common], help="one session as a Markdown report or as JSON",
                      description="Write one session as a readable Markdown report (question, each step and each "
                                  "model's answer, the aggregation, the final answer) or as JSON (what "
                                  "`history show --json` prints).")
    p.add_argument("id", help="e.g. 7 or session_007")
    p.add_argument("--format", choices=["md", "json"], default="md", help="md (default) or json")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write to FILE (a folder: chorus-session_NNN.md in it); default: stdout")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_export"))
    p = hs.add_parser("rm", parents=[common], help="remove sessions (their folders and index rows)",
                      description="Remove sessions: their folders and their rows in the index. A session that a "
                                  "running chorus still writes is refused. Session ids are never reused.")
    p.add_argument("ids", nargs="+", metavar="ID", help="e.g. 7 or session_007 (several allowed)")
    p.add_argument("--force", action="store_true",
                   help="remove a session marked running whose writer cannot be checked (another host)")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_rm"))
    p = hs.add_parser("prune", parents=[common], help="remove sessions older than a duration",
                      description="Remove every session created more than --older-than ago (sessions still "
                                  "running are kept), and drop index rows of sessions whose files are gone.")
    p.add_argument("--older-than", type=_duration, required=True, metavar="DURATION",
                   help="e.g. 30d, 12h, 90m, 2w, 1d12h")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="print what was removed as JSON")
    p.set_defaults(func=Lazy("cli.run", "cmd_history_prune"))


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="override a stage parameter, e.g. review.temperature=0.2 (repeatable; 'defaults.' for all)")
    p.add_argument("--json", action="store_true", help="print the run as JSON")
    p.add_argument("--allow-sequential", action="store_true",
                   help="in manual mode, run a stage's models one after another when they do not fit together")


def add_ui(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ui", parents=[common], help="start the Streamlit UI")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; any other needs "
                        "--allow-remote and a token)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host beyond loopback (other machines can then reach the UI; a token is required)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"file holding the token each browser session must give (default: ${cli_ui.TOKEN_ENV}, else "
                        "asked for on a terminal when needed); optional on loopback")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused with a hint: `ps` shows argv
    p.set_defaults(func=Lazy("cli.ui", "cmd_ui"))


def add_eval(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common],
                       help="evaluate the pipeline against its member models on a question set (list, show, resume)",
                       description="chorus eval [QUESTIONS.jsonl] runs every question through the pipeline and each "
                                   "of its models alone, scores the answers and stores the eval in "
                                   "<sessions_dir>/eval.db. Without a file the bundled basic set is used. "
                                   "`chorus eval list`, `chorus eval show ID`, `chorus eval resume ID` (runs what "
                                   "is missing as the eval was started: only --concurrency may be given; refused "
                                   "while another process runs it). A file named like an action: write ./list.")
    p.add_argument("target", nargs="?", default=None, metavar="QUESTIONS.jsonl | list | show | resume",
                   help="a JSONL question file (default: the bundled basic set), or an action")
    p.add_argument("id", nargs="?", default=None, help="the eval id for show and resume (e.g. 3 or eval_003)")
    p.add_argument("--pipeline", default=None, help="'base' (config/pipeline.yaml, the default) or a pipeline file")
    p.add_argument("--baselines", choices=["members", "none"], default=None,
                   help="members: each model of the pipeline alone, same generation parameters (default)")
    p.add_argument("--judge", default=None, metavar="MODEL",
                   help="a judge model: rubric score of every answer, and pipeline vs each baseline in both orders")
    p.add_argument("--judge-max-tokens", type=positive_int, default=None,
                   help=f"the judge's max_tokens (default {JUDGE_MAX_TOKENS})")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions (list: N evals)")
    p.add_argument("--concurrency", type=positive_int, default=None,
                   help="runs and judge calls at once; they share each server's slots (default: as many as fit "
                        "in memory, at most app.yaml's server.max_slots; each start still passes the memory check)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="override a pipeline parameter, e.g. defaults.max_tokens=64 (repeatable)")
    p.add_argument("--items", action="store_true", help="show: every item with its answers and sessions")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=Lazy("cli.eval", "cmd_eval"))


def add_api(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("api", parents=[common],
                       help="serve every pipeline and model through an OpenAI-compatible HTTP API",
                       description="Serve the OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions "
                                   "and /v1/completions. Pipelines are the models chorus/base and "
                                   "chorus/<name> (config dir's pipelines/<name>.yaml); registered models are "
                                   "proxied to their llama-server.")
    p.add_argument("--host", default=cli_api.DEFAULT_HOST,
                   help="address to listen on (default: 127.0.0.1, this machine only; any other needs a key)")
    p.add_argument("--port", type=positive_int, default=cli_api.DEFAULT_PORT,
                   help=f"port (default: {cli_api.DEFAULT_PORT})")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help=f"file holding the key clients must send as 'Authorization: Bearer KEY' (default: "
                        f"${cli_api.ENV_KEY}, else asked for on a terminal); required when --host is not a loopback "
                        "address")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused with a hint: `ps` shows argv
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host: name to answer besides localhost, 127.0.0.1 and [::1] (repeatable; '*' = any); "
                        "default: app.yaml's api.allowed_hosts. Other names get 403 (DNS rebinding)")
    p.add_argument("--max-runs", type=positive_int, default=cli_api.DEFAULT_MAX_RUNS,
                   help="pipeline runs and model requests going at once, sharing the servers' slots; more wait "
                        f"in the queue (a model request in its server's own) (default: {cli_api.DEFAULT_MAX_RUNS})")
    p.add_argument("--max-queue", type=int, default=cli_api.DEFAULT_MAX_QUEUE,
                   help="requests waiting for a place; more answer 429 with Retry-After (0: no queue; "
                        f"default: {cli_api.DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-body-kib", type=positive_int, default=cli_api.DEFAULT_MAX_BODY_KIB,
                   help=f"largest request body in KiB; larger answer 413 (default: {cli_api.DEFAULT_MAX_BODY_KIB})")
    p.set_defaults(func=Lazy("cli.api", "cmd_api"))


def add_docs(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("docs", parents=[common], help="document collections for the retrieve stage (add, list, "
                                                      "show, rm, search)",
                       description="Index your documents (txt, md, html, pdf) into collections in "
                                   "<sessions_dir>/docs.db; a pipeline stage `kind: retrieve` gives later stages "
                                   "their best passages as {{ context }}, to cite as [n].")
    docs = p.add_subparsers(dest="docs_command", metavar="ACTION")
    docs.required = True

    a = docs.add_parser("add", parents=[common], help="index files or folders into a collection (incremental)")
    a.add_argument("name", help="collection name (letters, digits, . _ -)")
    a.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    a.add_argument("--embed", metavar="MODEL", default=None,
                   help="an embedding model from models.yaml (role: embedding) for hybrid search "
                        "(default: the collection's, else app.yaml docs.embedding_model)")
    a.add_argument("--no-embed", action="store_true", help="BM25 only, even if app.yaml names an embedding model")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    a.set_defaults(func=Lazy("cli.docs", "cmd_add"))

    ls = docs.add_parser("list", parents=[common], help="the collections")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=Lazy("cli.docs", "cmd_list"))

    s = docs.add_parser("show", parents=[common], help="one collection and its files")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=Lazy("cli.docs", "cmd_show"))

    r = docs.add_parser("rm", parents=[common], help="delete a collection from docs.db (the files are not touched)")
    r.add_argument("name")
    r.set_defaults(func=Lazy("cli.docs", "cmd_rm"))

    q = docs.add_parser("search", parents=[common], help="the best passages of a collection for a query")
    q.add_argument("name")
    q.add_argument("query")
    q.add_argument("-k", "--top-k", type=positive_int, default=5, help="passages to show (default 5)")
    q.add_argument("--bm25", action="store_true", help="BM25 only, even if the collection has vectors")
    q.add_argument("--chars", type=positive_int, default=400, help="characters of each passage to print")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=Lazy("cli.docs", "cmd_search"))


def add_worker(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("worker", parents=[common],
                       help="run a llama.cpp RPC worker here: other machines' models put layers on it "
                            "(trusted networks only: the protocol has no authentication)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything else must be a trusted network)")
    p.add_argument("--port", type=int, default=RPC_DEFAULT_PORT, help=f"port (default {RPC_DEFAULT_PORT})")
    p.add_argument("--mem", type=int, metavar="MB", default=None,
                   help="cap the worker's memory at MB MiB (its address space; rpc-server itself has no limit)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the worker's computations")
    p.add_argument("--log", default=None, metavar="FILE", help="append rpc-server's output to FILE")
    p.set_defaults(func=Lazy("cli.worker", "cmd_worker"))
