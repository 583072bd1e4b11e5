"""Retrieval figures: index time and query latency at 10k chunks, recall@5 for BM25 vs hybrid.

1. Scale: a generated corpus of about 10,000 chunks (400 files of paragraphs on six overlapping topics,
   words Zipf-distributed as in real text, seeded) is indexed into a fresh docs.db; then 200 keyword
   queries are searched with BM25 (FTS5) and p50/p95 latency measured (target: p95 <= 50 ms). Queries of
   only the most common words (each in a sixth or more of all chunks) are timed too: FTS5 scores every
   matching chunk, so that is the worst case, reported beside the target. The same corpus indexed with
   random 640-dimensional vectors gives the dense scan and fusion latency at that size (the query's own
   embedding call is measured apart).
2. Recall@5: twelve facts written for this bench, each in its own file among 24 filler files, each with a
   question whose answer is known (a phrase of the fact). Some questions share the fact's words, some
   paraphrase them. A question counts as found when one of the top 5 passages contains its answer phrase.
   BM25 alone, then hybrid (BM25 + dense by reciprocal rank fusion) with a real embedding model: the demo
   Gemma 3 270M run as `llama-server --embeddings --pooling mean` through chorus's own runtime (a chat model
   pooled: weak vectors, a mechanics check, not a quality claim). `--no-embed` skips hybrid.

Prints a summary and ends with ONE JSON line (figures, targets, pass/fail). Servers it starts are stopped
on every way out (runtime.close in finally; SIGTERM/SIGHUP handled by launcher's cleanup).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.process.server import install_signal_cleanup  # noqa: E402
from orchestrator.rag.retrieval import search  # noqa: E402
from orchestrator.rag.store import DocStore  # noqa: E402

TARGET_BM25_P95_MS = 50.0
CHUNK_CHARS, OVERLAP = 800, 100
TOPICS = {
    "network": "server port socket daemon listen connection firewall address protocol packet latency proxy",
    "storage": "disk backup snapshot volume restore archive copy retention compression checksum file",
    "people": "team manager holiday contract salary office meeting training onboarding review badge",
    "kitchen": "lunch cafeteria menu coffee kettle fridge dinner breakfast canteen snack oven",
    "security": "password token certificate key audit login account permission access policy encryption",
    "hardware": "printer laptop monitor cable battery charger keyboard dock screen fan power",
}
COMMON = ["the", "a", "of", "to", "and", "in", "is", "for", "on", "with", "as", "by", "at", "from", "that", "this",
          "it", "be", "are", "was", "can", "will", "should", "may", "each", "every", "new", "old", "main", "other",
          "system", "user", "process", "service"]

# Facts written for this bench: (fact text, question, answer phrase that must be in a retrieved passage).
FACTS = [
    ("The ingest daemon listens on TCP port 7431 and refuses connections from outside the VPN.",
     "Which TCP port does the ingest daemon listen on?", "7431"),
    ("Nightly snapshots of the archive volume are kept for 45 days before deletion.",
     "How long are archive snapshots retained?", "45 days"),
    ("New employees receive their office badge from the front desk on their second morning.",
     "When do newcomers get their access card for the building?", "second morning"),
    ("The canteen serves vegetarian lasagne every Thursday at lunch.",
     "On which weekday is vegetarian lasagne on the menu?", "Thursday"),
    ("API tokens expire after 90 days and must be rotated by the account owner.",
     "How long is an API token valid before it expires?", "90 days"),
    ("The third-floor printer jams when loaded with paper heavier than 120 gsm.",
     "What paper weight makes the third-floor printer jam?", "120 gsm"),
    ("Backups are compressed with zstd at level 9 before upload to cold storage.",
     "Which compression algorithm is used before backups go to cold storage?", "zstd"),
    ("Firewall changes need two approvals from the security team before deployment.",
     "How many approvals does a firewall change require?", "two approvals"),
    ("Laptop chargers are replaced free of charge once per year through the hardware desk.",
     "How often can I get a new power adapter for my notebook at no cost?", "once per year"),
    ("The coffee machine on level two is descaled every Monday by the facilities crew.",
     "When is the level two coffee machine descaled?", "every Monday"),
    ("Performance reviews happen in March and September, with the manager and one peer.",
     "In which months do performance reviews take place?", "March and September"),
    ("Passwords must be at least 14 characters long and are checked against breached lists.",
     "What is the minimum length of a password?", "14 characters"),
]


def vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    """Made-up words from syllables: a corpus vocabulary beyond the topic words, used with Zipf frequencies."""
    syllables = ["ka", "lo", "mi", "ren", "tu", "vas", "do", "pel", "sin", "gra", "mor", "te", "qui", "bal", "nor",
                 "fe", "zu", "ost", "lan", "dri"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


class Corpus:
    """Paragraphs whose words follow a Zipf law (as text does): a few very common words, a long tail of rare ones.

    A paragraph mixes function words (about a third), its topic's words and the Zipf vocabulary; a query is
    two or three topic words and two to four content words drawn from the same law past its 100 most frequent
    words (which play the part of function words, left out of real queries).
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocabulary(self.rng)
        weights = np.array([1.0 / (rank ** 1.1) for rank in range(1, len(self.vocab) + 1)])
        self.cum = np.cumsum(weights / weights.sum())

    def zipf(self) -> str:
        return self.vocab[min(int(np.searchsorted(self.cum, self.rng.random())), len(self.vocab) - 1)]

    def paragraph(self, topic: str) -> str:
        words = TOPICS[topic].split()
        sentences = []
        for _ in range(self.rng.randint(5, 8)):
            sentence = [self.rng.choice(COMMON) if (r := self.rng.random()) < 0.35 else
                        self.rng.choice(words) if r < 0.5 else self.zipf() for _ in range(self.rng.randint(8, 16))]
            sentences.append(" ".join(sentence).capitalize() + ".")
        return " ".join(sentences)

    def query(self) -> str:
        """Keywords as a user types them: content words, not the 100 most frequent (function words in real text)."""
        topic = TOPICS[self.rng.choice(list(TOPICS))].split()
        content: list[str] = []
        while len(content) < self.rng.randint(2, 4):
            word = self.zipf()
            if self.vocab.index(word) >= 100:
                content.append(word)
        return " ".join(self.rng.sample(topic, self.rng.randint(2, 3)) + content) + "?"


def write_corpus(root: Path, files: int, paragraphs: int, seed: int) -> Corpus:
    corpus = Corpus(seed)
    rng = corpus.rng
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        topic = rng.choice(list(TOPICS))
        body = "\n\n".join(f"## {topic} note {j}\n\n{corpus.paragraph(topic)}" for j in range(paragraphs))
        (root / f"doc{i:04d}.md").write_text(f"# {topic} {i}\n\n{body}\n")
    return corpus


class RandomEmbedder:
    """Unit-free random vectors seeded by the text: dense scan and fusion cost at scale, nothing about quality."""

    model = "random-640"

    def __init__(self, dims: int = 640) -> None:
        self.dims = dims

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dims).tolist() for t in texts]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def latency(store: DocStore, name: str, queries: list[str], vectors: list[list[float]] | None) -> dict[str, float]:
    """Wall time per query, and this process's CPU time per query (what the query costs when the cores are
    shared with other work: on a loaded machine wall time mostly measures waiting for a core)."""
    times, cpu = [], []
    for i, q in enumerate(queries):
        started, cpu0 = time.perf_counter(), time.process_time()
        search(store, name, q, 5, vectors[i] if vectors else None)
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu0) * 1000)
    return {"p50_ms": round(pct(times, 50), 2), "p95_ms": round(pct(times, 95), 2), "max_ms": round(max(times), 2),
            "cpu_p50_ms": round(pct(cpu, 50), 2), "cpu_p95_ms": round(pct(cpu, 95), 2)}


def recall(store: DocStore, name: str, embed: Callable[[str], list[float]] | None) -> tuple[float, list[bool]]:
    hits = []
    for _, question, answer in FACTS:
        vector = embed(question) if embed else None
        hits.append(any(answer in p.text for p in search(store, name, question, 5, vector)))
    return sum(hits) / len(hits), hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=400, help="files of the scale corpus (default 400)")
    parser.add_argument("--paragraphs", type=int, default=25, help="paragraphs per file (default 25)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries (default 200)")
    parser.add_argument("--no-embed", action="store_true", help="skip hybrid recall (no llama-server)")
    args = parser.parse_args()
    install_signal_cleanup()
    work = Path(tempfile.mkdtemp(prefix="chorus-bench-rag-"))
    try:
        return run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> int:
    # ---------------------------------------------------------------- scale: 10k chunks
    corpus = write_corpus(work / "scale", args.files, args.paragraphs, seed=1)
    store = DocStore(work / "sessions" / "docs.db")
    report = store.add("scale", [work / "scale"], chunk_chars=CHUNK_CHARS, overlap_chars=OVERLAP)
    chunks = report.chunks
    print(f"indexed {report.files} files → {chunks} chunks in {report.seconds:.2f}s "
          f"({chunks / report.seconds:.0f} chunks/s), BM25 only")
    queries = [corpus.query() for _ in range(args.queries)]
    latency(store, "scale", queries[:10], None)  # warm the page cache and the connection path
    bm25 = latency(store, "scale", queries, None)
    print(f"BM25 query latency at {chunks} chunks: p50 {bm25['p50_ms']} ms, p95 {bm25['p95_ms']} ms "
          f"(target p95 <= {TARGET_BM25_P95_MS:g} ms); CPU per query p50 {bm25['cpu_p50_ms']} ms, "
          f"p95 {bm25['cpu_p95_ms']} ms (load average {os.getloadavg()[0]:.1f})")
    # the worst case, reported, not the target: only topic words, each in a sixth or more of all chunks
    common = [" ".join(corpus.rng.sample(TOPICS[t].split(), 5)) for t in list(TOPICS) * 5]
    bm25_common = latency(store, "scale", common, None)
    print(f"BM25 with only very common words (5 terms each in >= 1/6 of the chunks): p50 {bm25_common['p50_ms']} ms, "
          f"p95 {bm25_common['p95_ms']} ms")
    dense_report = store.add("scale-dense", [work / "scale"], chunk_chars=CHUNK_CHARS, overlap_chars=OVERLAP,
                             embedder=RandomEmbedder())
    rand = RandomEmbedder()
    qvecs = rand.embed(queries)
    latency(store, "scale-dense", queries[:5], qvecs[:5])  # loads the matrix once (cached per collection version)
    hybrid_lat = latency(store, "scale-dense", queries, qvecs)
    print(f"hybrid (BM25 + {rand.dims}-d dense scan via {store.vector_backend} + RRF) at {dense_report.chunks} "
          f"chunks: p50 {hybrid_lat['p50_ms']} ms, p95 {hybrid_lat['p95_ms']} ms (query embedding not included)")

    # ---------------------------------------------------------------- recall@5
    facts_dir = work / "facts"
    write_corpus(facts_dir, 24, 2, seed=2)
    for i, (fact, _, _) in enumerate(FACTS):
        (facts_dir / f"fact{i:02d}.txt").write_text(fact + "\n")
    store.add("facts", [facts_dir], chunk_chars=CHUNK_CHARS, overlap_chars=OVERLAP)
    r_bm25, hits_bm25 = recall(store, "facts", None)
    print(f"recall@5 BM25:   {r_bm25:.2f}  {['x' if h else '.' for h in hits_bm25]}")
    result: dict[str, object] = {
        "bench": "retrieval", "chunks": chunks, "index_s": round(report.seconds, 3),
        "index_chunks_per_s": round(chunks / report.seconds, 1), "bm25_query_ms": bm25,
        "bm25_query_ms_common_words_only": bm25_common,
        "hybrid_query_ms_random_vectors": hybrid_lat, "vector_backend": store.vector_backend,
        "recall_at_5": {"questions": len(FACTS), "bm25": round(r_bm25, 3), "hybrid": None},
        "embedding_model": None}
    if not args.no_embed:
        hybrid = hybrid_recall(work, store, facts_dir)
        result["recall_at_5"].update(hybrid.pop("recall"))  # type: ignore[attr-defined]
        result.update(hybrid)
        print(f"recall@5 hybrid: {result['recall_at_5']['hybrid']}  ({result['embedding_model']}; "  # type: ignore[index]
              f"query embedding p50 {result.get('query_embed_ms_p50')} ms)")
    ok = bm25["p95_ms"] <= TARGET_BM25_P95_MS and chunks >= 9_000
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)  # a shared machine inflates every latency above
    result["bm25_cpu_p95_within_target"] = bm25["cpu_p95_ms"] <= TARGET_BM25_P95_MS  # reported, not the pass
    result.update({"target_bm25_p95_ms_max": TARGET_BM25_P95_MS, "target_chunks_min": 9_000, "pass": ok})
    print(json.dumps(result))
    return 0 if ok else 1


def hybrid_recall(work: Path, store: DocStore, facts_dir: Path) -> dict[str, object]:
    """Recall@5 with the demo model as the embedding model, through chorus's runtime (pool, admission)."""
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime, runtime_embedder

    cdir = work / "config"
    cdir.mkdir()
    (cdir / "app.yaml").write_text(yaml.safe_dump({"models_dir": str(REPO / "models"),
                                                   "sessions_dir": str(work / "sessions"),
                                                   "logs_dir": str(work / "logs")}))
    (cdir / "models.yaml").write_text(yaml.safe_dump({"models": {"gemma-embed": {
        "file": "gemma-3-270m-q4_k_m.gguf", "role": "embedding", "default_n_ctx": 2048,
        "extra_args": ["--pooling", "mean", "-ub", "2048", "-b", "2048"]}}}))
    runtime = Runtime(load_config(cdir))
    try:
        with runtime_embedder(runtime, "gemma-embed") as embedder:
            started = time.perf_counter()
            added = store.add("facts-hybrid", [facts_dir], chunk_chars=CHUNK_CHARS, overlap_chars=OVERLAP,
                              embedder=embedder)
            embed_s = time.perf_counter() - started
            times: list[float] = []

            def embed(question: str) -> list[float]:
                t = time.perf_counter()
                vec = embedder.embed([question])[0]
                times.append((time.perf_counter() - t) * 1000)
                return vec

            r_hybrid, hits = recall(store, "facts-hybrid", embed)
            r_dense_only = dense_only_recall(store, "facts-hybrid", embedder)
    finally:
        runtime.close()
    print(f"embedded {added.embedded} chunks in {embed_s:.1f}s; hits {['x' if h else '.' for h in hits]}; "
          f"dense alone recall@5 {r_dense_only:.2f}")
    return {"recall": {"hybrid": round(r_hybrid, 3), "dense_only": round(r_dense_only, 3)},
            "embedding_model": "gemma-3-270m (--pooling mean)", "embed_chunks": added.embedded,
            "embed_s": round(embed_s, 2), "query_embed_ms_p50": round(statistics.median(times), 1)}


def dense_only_recall(store: DocStore, name: str, embedder: object) -> float:
    hits = 0
    for _, question, answer in FACTS:
        vector = embedder.embed([question])[0]  # type: ignore[attr-defined]
        ids = [cid for cid, _ in store.dense(name, vector, 5)]
        hits += any(answer in row["text"] for row in store.chunks(ids).values())
    return hits / len(FACTS)


if __name__ == "__main__":
    sys.exit(main())
