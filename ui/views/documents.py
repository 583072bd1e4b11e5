"""Documents page: the collections a retrieve stage can use, adding documents, and a search box.

Documents come only from uploads or the folders app.yaml `docs.allowed_roots` lists: a visitor of the UI
must not read the server's files through search (orchestrator/rag/sources.py, docs/security.md). Logic
lives in orchestrator.rag (sources, store, retrieval, embed); this page only renders and calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import streamlit as st

from orchestrator.app import Chorus
from orchestrator.errors import ChorusError
from orchestrator.rag.chunking import KINDS
from orchestrator.rag.embed import HttpEmbedder
from orchestrator.rag.files import MiB
from orchestrator.rag.retrieval import search
from orchestrator.rag.sources import add_from_page, remove_uploads, uploads_root
from orchestrator.rag.store import DocStore, Progress
from ui.common import chorus, fmt_time, md_escape

st.title("Documents")
rt = chorus()
if rt is None:
    st.stop()
store = DocStore.beside(rt.config.sessions_dir)
docs_cfg = rt.config.app.docs
embedding_models = sorted(name for name, rec in rt.registry.records.items()
                          if rec.available and rec.entry.role == "embedding")


@contextlib.contextmanager
def embedder_for(rt: Chorus, model: str | None) -> Iterator[HttpEmbedder | None]:
    if model is None:
        yield None
        return
    with rt.embedder(model) as embedder:  # the shared pool: its server stays warm for the runs
        yield embedder


try:
    collections = store.collections()
except ChorusError as exc:
    st.error(md_escape(exc))
    st.stop()

st.caption(md_escape(f"Collections in {store.path}. A pipeline stage with kind: retrieve and collection: NAME "
                     "gives later stages the best passages as {{ context }}, to cite as [n]."))
if collections:
    st.dataframe([{"name": c["name"], "files": c["n_files"], "chunks": c["n_chunks"],
                   "embedding": c["embed_model"] or "none (BM25)", "chunk chars": c["chunk_chars"],
                   "updated": fmt_time(c["updated_at"]), "paths": ", ".join(c["roots"])} for c in collections],
                 hide_index=True, width="stretch")
else:
    st.info("No collection yet: add documents below.")

# ---------------------------------------------------------------- add documents
allowed = list(docs_cfg.allowed_roots)
with st.form("docs-add"):
    st.markdown("**Add documents** (txt, md, html, pdf; re-adding updates only what changed)")
    name = st.text_input("Collection", key="docs-add-name", placeholder="e.g. handbook")
    uploaded = st.file_uploader(md_escape(f"Upload files (kept in {uploads_root(rt.config.sessions_dir)})"),
                                type=sorted({k.lstrip(".") for k in KINDS}), accept_multiple_files=True,
                                key="docs-add-files")
    root: str | None = None
    sub = ""
    if allowed:
        c1, c2 = st.columns(2)
        root = c1.selectbox("Or a folder the operator allowed", [None, *(str(a) for a in allowed)],
                            key="docs-add-root", format_func=lambda r: "none" if r is None else r)
        sub = c2.text_input("Subfolder or file inside it (optional)", key="docs-add-sub")
    else:
        st.caption(md_escape("No server folder may be indexed from this page (app.yaml docs.allowed_roots is "
                             "empty): upload the files, or index a folder with `chorus docs add` on the command line."))
    existing = {c["name"]: c for c in collections}
    choices: list[str | None] = [None, *embedding_models]
    default = docs_cfg.embedding_model if docs_cfg.embedding_model in embedding_models else None
    model = st.selectbox("Embedding model (hybrid search)", choices, index=choices.index(default), key="docs-add-embed",
                         format_func=lambda m: "none: BM25 only" if m is None else m,
                         help="Models with role: embedding in models.yaml. An existing collection keeps its own.")
    submitted = st.form_submit_button("Index", key="docs-add-submit")
if submitted:
    if not name.strip() or not (uploaded or root):
        st.error("Give a collection name, and upload files or choose an allowed folder.")
    else:
        bar = st.progress(0.0, text="starting…")

        def on_progress(p: Progress) -> None:
            bar.progress(p.done / p.total if p.total else 1.0, text=md_escape(f"{p.done}/{p.total} {p.path}"))

        name = name.strip()
        use = existing[name]["embed_model"] if name in existing else model
        try:
            with embedder_for(rt, use) as embedder:
                done = add_from_page(store, name, sessions_dir=rt.config.sessions_dir, allowed=allowed,
                                     max_file_bytes=docs_cfg.max_file_mib * MiB,
                                     uploads=[(f.name, f.getvalue()) for f in uploaded or []], root=root,
                                     relative=sub, chunk_chars=docs_cfg.chunk_chars,
                                     overlap_chars=docs_cfg.overlap_chars, embedder=embedder, progress=on_progress)
        except ChorusError as exc:
            st.error(md_escape(exc))
        else:
            for upload, why in done.refused.items():
                st.warning(md_escape(f"not uploaded {upload}: {why}"))
            for report in done.reports:
                st.success(md_escape(f"{name}: {report.added} added, {report.updated} re-chunked, "
                                     f"{report.unchanged} unchanged, {report.removed} removed; {report.chunks} "
                                     f"chunks in {report.seconds:.1f}s"))
                for skipped, why in report.skipped.items():
                    st.warning(md_escape(f"skipped {skipped}: {why}"))
            collections = store.collections()  # the search below offers the new collection at once
            existing = {c["name"]: c for c in collections}

# ---------------------------------------------------------------- search
if collections:
    st.divider()
    c1, c2, c3 = st.columns([2, 4, 1])
    chosen = c1.selectbox("Collection", [c["name"] for c in collections], key="docs-search-collection")
    query = c2.text_input("Search", key="docs-search-query", placeholder="a question or keywords")
    top_k = c3.number_input("Passages", min_value=1, max_value=50, value=5, key="docs-search-k")
    if query.strip():
        try:
            with embedder_for(rt, existing[chosen]["embed_model"]) as embedder:
                vector = embedder.embed([query])[0] if embedder is not None else None
            passages = search(store, chosen, query, int(top_k), vector)
        except ChorusError as exc:
            st.error(md_escape(exc))
            passages = []
        if not passages:
            st.info("No passage matches.")
        for p in passages:
            with st.container(border=True):
                st.markdown(md_escape(f"[{p.n}] {p.source}"))
                st.text(p.text)
                st.caption(md_escape(f"{p.file} · bytes {p.byte_start}-{p.byte_end} · score {p.score:.4g}"
                                     + (" · hybrid" if vector is not None else " · BM25")))
    with st.expander("Remove a collection"):
        doomed = st.selectbox("Collection to remove", [c["name"] for c in collections], key="docs-rm-name")
        if st.button("Remove from docs.db (your folders stay; uploaded copies are deleted)", key="docs-rm"):
            try:
                store.remove(doomed)
                remove_uploads(rt.config.sessions_dir, doomed)
                st.success(md_escape(f"removed '{doomed}'"))
            except ChorusError as exc:
                st.error(md_escape(exc))
