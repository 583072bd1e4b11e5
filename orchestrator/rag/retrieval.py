"""Ranking and the passages later stages see: BM25, dense, hybrid by reciprocal rank fusion, numbered [n].

Reciprocal rank fusion (Cormack et al., 2009): each list gives a chunk 1 / (k + rank); the sums rank the
union. It needs no score calibration between BM25 and cosine, which have unrelated scales.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # an annotation only: the rendering helpers every run uses load no sqlite or chunking
    from orchestrator.rag.store import DocStore

RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
CITE_INSTRUCTION = ("Answer from the numbered sources below. Cite every claim with the number of its source in "
                    "brackets, like [1] or [2][3]. If the sources do not contain the answer, say so.")
_CITATION = re.compile(r"\[(\d{1,3})\]")


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk as a stage and the session see it; `n` is its source label [n]."""

    n: int
    chunk_id: int
    file: str
    kind: str
    page: int | None
    heading: str | None
    byte_start: int
    byte_end: int
    text: str
    score: float
    bm25_rank: int | None = None
    dense_rank: int | None = None

    @property
    def source(self) -> str:
        """'guide.md, "Install"' or 'manual.pdf, page 3': where a reader finds it."""
        where = Path(self.file).name
        if self.page is not None:
            where += f", page {self.page}"
        if self.heading:
            where += f', "{self.heading}"'
        return where

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "source": self.source}


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked id lists: (id, fused score), best first; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def search(store: DocStore, collection: str, query: str, top_k: int = 5,
           query_vector: Sequence[float] | None = None) -> list[Passage]:
    """The best `top_k` passages: BM25 alone, or fused with dense ranking when a query vector is given."""
    store.require(collection)  # CollectionNotFound before an empty result could hide a typo
    if not query.strip():  # nothing to look for: no passage (a hybrid ranking gave arbitrary ones)
        return []
    lexical = store.bm25(collection, query, max(CANDIDATES, top_k))
    bm25_rank = {cid: i for i, (cid, _) in enumerate(lexical, start=1)}
    dense_rank: dict[int, int] = {}
    if query_vector is not None:
        dense = store.dense(collection, query_vector, max(CANDIDATES, top_k))
        dense_rank = {cid: i for i, (cid, _) in enumerate(dense, start=1)}
        ranked = rrf([[c for c, _ in lexical], [c for c, _ in dense]])[:top_k]
    else:
        ranked = lexical[:top_k]
    rows = store.chunks(cid for cid, _ in ranked)
    out: list[Passage] = []
    for cid, score in ranked:
        r = rows.get(cid)
        if r is None:  # removed between the ranking and this read
            continue
        out.append(Passage(len(out) + 1, cid, r["path"], r["kind"], r["page"], r["heading"], r["byte_start"],
                           r["byte_end"], r["text"], round(score, 6), bm25_rank.get(cid), dense_rank.get(cid)))
    return out


def format_context(passages: Sequence[Passage]) -> str:
    """What `{{ context }}` renders: the citing instruction, then each passage under its label and source."""
    if not passages:
        return "(No passage of the documents matched the question.)"
    blocks = [f"[{p.n}] {p.source}\n{p.text}" for p in passages]
    return CITE_INSTRUCTION + "\n\n" + "\n\n".join(blocks)


def stage_output(context: str, question: str) -> str:
    """A retrieve stage's output (`previous` of the next stage): the sources, then the question they answer."""
    return f"{context}\n\nQuestion: {question}"


def cited(text: str, passages: int) -> list[int]:
    """The source numbers [n] an answer cites, in first-cited order (numbers past the passages are left out)."""
    return list(dict.fromkeys(int(n) for n in _CITATION.findall(text or "") if 1 <= int(n) <= passages))


def sources_in_prompt(stages: Sequence[Any], prompt: str) -> list[dict[str, Any]]:
    """Per earlier retrieve stage, which of its passages a rendered prompt contains (session record)."""
    out = []
    for stage in stages:
        agg = getattr(stage, "aggregation", None)
        if agg is None or agg.kind != "retrieve":
            continue
        used = [p["n"] for p in agg.details.get("passages", []) if p.get("text") and p["text"] in prompt]
        if used:
            out.append({"step": stage.index, "stage": stage.name, "passages": used})
    return out
