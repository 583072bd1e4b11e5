"""`chorus docs add | list | show | rm | search`: document collections for the retrieve stage.

Collections live in `<sessions_dir>/docs.db`. `add` is incremental (content hash); with an embedding model
(`--embed MODEL`, or app.yaml `docs.embedding_model`, or the one the collection was made with) every chunk
also gets a vector from that model's own `llama-server --embeddings`, and search is hybrid.

`add` takes any path: whoever runs the CLI is the operator (docs/security.md), unlike a visitor of the UI's
Documents page, which is held to app.yaml `docs.allowed_roots`. Inside a folder, only regular files that
stay inside it are read (orchestrator/rag/files.py); each skipped file is printed with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from cli.output import print_table
from orchestrator.app import Chorus, install_signal_cleanup
from orchestrator.config.schema import ChorusConfig, load_config
from orchestrator.errors import ChorusError
from orchestrator.rag.embed import HttpEmbedder
from orchestrator.rag.files import MiB
from orchestrator.rag.retrieval import search
from orchestrator.rag.store import AddReport, DocsPathNotFound, DocStore, Progress, check_name, missing_paths

LARGE = 20  # files: from this many on, `add` shows progress


class SearchRefused(ChorusError):
    """`docs search` with a query or a number it cannot use (exit 2, like any usage error)."""


class ProgressLine:
    """`[#####-----] 120/400  docs/guide.md` on stderr: redrawn on a terminal, else a line per 10%."""

    def __init__(self, out: TextIO | None = None, width: int = 30) -> None:
        self.out = out or sys.stderr
        self.width = width
        self.tty = self.out.isatty()
        self._decile = -1

    def __call__(self, p: Progress) -> None:
        if p.total < LARGE:
            return
        fraction = p.done / p.total if p.total else 1.0
        filled = int(self.width * fraction)
        line = f"[{'#' * filled}{'-' * (self.width - filled)}] {p.done}/{p.total}  {p.path}"
        if self.tty:
            self.out.write("\r" + line[:150].ljust(150) + ("\n" if p.done >= p.total else ""))
            self.out.flush()
        elif int(fraction * 10) != self._decile:
            self._decile = int(fraction * 10)
            print(line, file=self.out, flush=True)


@contextlib.contextmanager
def _embedder(config: ChorusConfig, model: str | None) -> Iterator[HttpEmbedder | None]:
    """The embedding model's server for the block (leased through the runtime's pool), or None."""
    if model is None:
        yield None
        return
    install_signal_cleanup()
    with Chorus(config) as chorus, chorus.embedder(model) as embedder:
        yield embedder


def cmd_add(args: argparse.Namespace) -> int:
    config = load_config(args.config_dir)
    store = DocStore.beside(config.sessions_dir)
    name = check_name(args.name)
    missing = missing_paths(args.paths)
    if missing:  # before anything: a moved folder must not empty the collection, a typo not make a new one
        raise DocsPathNotFound(missing)
    existing = store.find(name)
    model = None if args.no_embed else (
        args.embed or (existing["embed_model"] if existing else config.app.docs.embedding_model))
    with _embedder(config, model) as embedder:
        report = store.add(name, args.paths, chunk_chars=config.app.docs.chunk_chars,
                           overlap_chars=config.app.docs.overlap_chars, embedder=embedder, progress=ProgressLine(),
                           max_file_bytes=config.app.docs.max_file_mib * MiB)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    return 0


def _print_report(r: AddReport) -> None:
    vectors = f", {r.embedded} embedded" if r.embedded else ""
    print(f"{r.collection}: {r.files} file(s): {r.added} added, {r.updated} re-chunked, {r.unchanged} unchanged, "
          f"{r.removed} removed; {r.chunks} chunk(s) written{vectors} in {r.seconds:.1f}s")
    for path, why in r.skipped.items():
        print(f"skipped {path}: {why}", file=sys.stderr)


def cmd_list(args: argparse.Namespace) -> int:
    rows = DocStore.beside(load_config(args.config_dir).sessions_dir).collections()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print("no collection yet: `chorus docs add NAME PATH...`")
    else:
        print_table([(r["name"], r["n_files"], r["n_chunks"], r["embed_model"] or "-", r["chunk_chars"],
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated_at"]))) for r in rows],
                    ["NAME", "FILES", "CHUNKS", "EMBEDDING", "CHUNK_CHARS", "UPDATED"])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = DocStore.beside(load_config(args.config_dir).sessions_dir)
    coll, files = store.collection(args.name), store.files(args.name)
    if args.json:
        print(json.dumps({**coll, "files": files}, indent=2, default=str))
        return 0
    print(f"{coll['name']}: {coll['n_files']} file(s), {coll['n_chunks']} chunk(s) of up to {coll['chunk_chars']} "
          f"characters (overlap {coll['overlap_chars']}); embedding: {coll['embed_model'] or 'none (BM25 only)'}")
    print(f"paths: {', '.join(coll['roots'])}")
    print_table([(f["path"], f["kind"], f["chunks"], f["size"]) for f in files], ["FILE", "KIND", "CHUNKS", "BYTES"])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    n = DocStore.beside(load_config(args.config_dir).sessions_dir).remove(args.name)
    print(f"removed collection '{args.name}' ({n} file(s))")
    return 0


def _check_search(args: argparse.Namespace) -> None:
    if not args.query.strip():
        raise SearchRefused("the query is empty", hint='Give the words to search for: chorus docs search NAME "QUERY".')
    # -k and --chars below 1: refused by the parser (positive_int)


def cmd_search(args: argparse.Namespace) -> int:
    _check_search(args)
    config = load_config(args.config_dir)
    store = DocStore.beside(config.sessions_dir)
    model = None if args.bm25 else store.collection(args.name)["embed_model"]
    with _embedder(config, model) as embedder:
        vector = embedder.embed([args.query])[0] if embedder is not None else None
        started = time.perf_counter()
        passages = search(store, args.name, args.query, args.top_k, vector)
        took = time.perf_counter() - started
    if args.json:
        print(json.dumps([p.to_dict() for p in passages], indent=2))
        return 0
    print(f"{len(passages)} passage(s), {'hybrid' if vector else 'BM25'}, {took * 1000:.0f} ms")
    for p in passages:
        print(f"\n[{p.n}] {p.source}  (bytes {p.byte_start}-{p.byte_end}, score {p.score:.4g})\n"
              f"{p.text[:args.chars]}{'…' if len(p.text) > args.chars else ''}")
    return 0
