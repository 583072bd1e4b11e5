"""Documents and the retrieve stage: chunking, incremental re-index, ranking, the stage in the engine and the
session, the CLI and the API (fast, on the fake backend); then the whole chain on the demo model with real
embeddings from its own `llama-server --embeddings` (integration)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
from pathlib import Path

import pytest

from orchestrator.config.registry import Registry
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.fake import FakeBackend, Script
from orchestrator.engine.run import Engine
from orchestrator.engine.templates import build_context, render
from orchestrator.plan.resolve import Machine, build_plan
from orchestrator.rag.chunking import Document, Section, chunk_document, read_document
from orchestrator.rag.retrieval import cited, format_context, rrf, search
from orchestrator.rag.store import CollectionNotFound, DocStore, EmbeddingMismatch, fts_query
from tests import yamlfile
from tests.conftest import ConfigDir

# ---------------------------------------------------------------- fixtures: documents the tests write

GUIDE = """# Install

Run the installer with sudo. The daemon listens on port 8125 by default.

## Upgrade

Stop the daemon first, then replace the binary and start it again.
"""
OPS_HTML = """<html><head><title>Operations</title><script>var secret = "do not index";</script></head>
<body><h1>Backups</h1><p>Backups run nightly at 02:00 and keep fourteen copies.</p>
<h2>Restore</h2><p>Use restore --from DATE to bring back a copy.</p></body></html>"""
LUNCH = "The cafeteria serves lunch from noon until two o'clock.\n"


def write_docs(root: Path) -> Path:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "guide.md").write_text(GUIDE)
    (root / "sub" / "ops.html").write_text(OPS_HTML)
    (root / "lunch.txt").write_text(LUNCH)
    return root


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (offsets computed, so no repair needed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               "<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
               + f"] /Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


class TopicEmbedder:
    """A deterministic embedder for mechanics tests: one dimension per topic, set by the topic's words.

    It knows synonyms BM25 does not ('feline' is about cats), which is what dense ranking adds.
    """

    model = "topics"
    TOPICS = (("cat", "cats", "feline", "kitten"), ("port", "ports", "network", "socket"),
              ("lunch", "food", "meal", "cafeteria"))

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        out = []
        for text in texts:
            words = text.lower().replace(".", " ").split()
            out.append([sum(w in topic for w in words) + 0.01 for topic in self.TOPICS])
        return out


# ---------------------------------------------------------------- chunking


def test_markdown_chunks_carry_their_heading_and_the_files_byte_range(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_text("# Título\n\nÜber " + "wörter " * 120 + "\n\n## Second\n\n" + "plain words here " * 40)
    data = path.read_bytes()
    chunks = chunk_document(read_document(path), chunk_chars=300, overlap_chars=60)
    assert {c.heading for c in chunks} == {"Título", "Second"}
    for c in chunks:  # multi-byte text: the byte range is the file's own bytes of the chunk
        assert data[c.byte_start:c.byte_end].decode("utf-8") == c.text
        assert len(c.text) <= 300
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_neighbouring_chunks_overlap_and_start_at_a_word(tmp_path: Path) -> None:
    text = " ".join(f"word{i}" for i in range(600))
    chunks = chunk_document(Document("text", [Section(text)]), chunk_chars=200, overlap_chars=50)
    assert len(chunks) > 5
    for a, b in itertools.pairwise(chunks):
        assert b.byte_start < a.byte_end  # they share bytes
        shared = text[b.byte_start:a.byte_end]
        assert len(shared) >= 30 and b.text.startswith(shared.strip())
        assert b.text.split()[0].startswith("word")  # not cut mid-word
    assert "word599" in chunks[-1].text and "word0" in chunks[0].text


def test_html_is_split_at_headings_without_script_text(tmp_path: Path) -> None:
    path = tmp_path / "ops.html"
    path.write_text(OPS_HTML)
    doc = read_document(path)
    assert [s.heading for s in doc.sections] == ["Backups", "Restore"]
    text = " ".join(s.text for s in doc.sections)
    assert "fourteen copies" in text and "do not index" not in text
    for c in chunk_document(doc):
        assert doc.text.encode()[c.byte_start:c.byte_end].decode() == c.text


def test_pdf_chunks_know_their_page(tmp_path: Path) -> None:
    path = tmp_path / "manual.pdf"
    path.write_bytes(pdf_bytes(["The pump needs oil every month.", "Replace the filter after a year."]))
    chunks = chunk_document(read_document(path))
    assert [(c.page, c.text) for c in chunks] == [(1, "The pump needs oil every month."),
                                                  (2, "Replace the filter after a year.")]


# ---------------------------------------------------------------- the store: incremental, unreadable files


def test_readd_is_incremental_by_content_hash(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs")
    store = DocStore(tmp_path / "docs.db")
    first = store.add("kb", [docs], chunk_chars=300, overlap_chars=50)
    assert (first.added, first.updated, first.unchanged, first.removed) == (3, 0, 0, 0)

    again = store.add("kb", [docs])
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 3, 0)

    (docs / "lunch.txt").write_text("The cafeteria now serves dinner at seven.\n")  # changed
    (docs / "sub" / "ops.html").unlink()                                            # deleted
    (docs / "new.md").write_text("# Parking\n\nVisitors park in lot C.\n")           # new
    third = store.add("kb", [docs])
    assert (third.added, third.updated, third.unchanged, third.removed) == (1, 1, 1, 1)
    assert sorted(Path(f["path"]).name for f in store.files("kb")) == ["guide.md", "lunch.txt", "new.md"]
    assert store.bm25("kb", "backups nightly", 5) == []          # the deleted file's chunks are gone (FTS too)
    assert store.bm25("kb", "lunch noon", 5) == []               # the old text of the changed file as well
    assert [p.file for p in search(store, "kb", "dinner", 1)] == [str(docs / "lunch.txt")]


def test_a_file_outside_the_readded_paths_is_kept(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "one.txt").write_text("alpha document")
    (b / "two.txt").write_text("beta document")
    store = DocStore(tmp_path / "docs.db")
    store.add("kb", [a])
    report = store.add("kb", [b])
    assert report.removed == 0 and store.collection("kb")["n_files"] == 2


def test_an_unreadable_file_is_reported_and_the_rest_indexed(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf at all")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    report = DocStore(tmp_path / "docs.db").add("kb", [docs, tmp_path / "nowhere"])
    assert report.added == 3
    assert set(report.skipped) == {str(docs / "broken.pdf"), str(docs / "binary.txt"), str(tmp_path / "nowhere")}
    assert "PDF" in report.skipped[str(docs / "broken.pdf")] and report.skipped[str(tmp_path / "nowhere")] == \
        "not found"


def test_docs_db_is_owner_only(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "sessions" / "docs.db")
    store.add("kb", [write_docs(tmp_path / "docs")])
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_collections_list_show_and_remove(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "docs.db")
    store.add("kb", [write_docs(tmp_path / "docs")], chunk_chars=500, overlap_chars=100)
    [row] = store.collections()
    assert (row["name"], row["n_files"], row["chunk_chars"], row["overlap_chars"]) == ("kb", 3, 500, 100)
    assert store.remove("kb") == 3
    assert store.collections() == []
    with pytest.raises(CollectionNotFound):
        search(store, "kb", "anything")


# ---------------------------------------------------------------- ranking


def test_bm25_ranks_the_passage_that_answers_first(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "docs.db")
    store.add("kb", [write_docs(tmp_path / "docs")])
    top = search(store, "kb", "Which port does the daemon listen on?", 3)
    assert top[0].heading == "Install" and "8125" in top[0].text
    assert [p.n for p in top] == list(range(1, len(top) + 1))
    assert search(store, "kb", "restore a backup copy", 1)[0].heading == "Restore"


def test_queries_with_fts_syntax_are_words_not_operators() -> None:
    assert fts_query('NEAR("a" b) AND -x* "quoted"') == '"near" OR "b" OR "x" OR "quoted"'
    assert fts_query("?!") is None


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    fused = [item for item, _ in rrf([[1, 2, 3], [3, 1, 4]])]
    assert fused[:2] == [1, 3]  # in both lists near the top
    assert set(fused) == {1, 2, 3, 4}


def test_hybrid_finds_what_bm25_cannot_and_keeps_what_it_can(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pets.txt").write_text("Cats sleep most of the day.")
    (docs / "net.txt").write_text("The daemon listens on port 8125.")
    (docs / "food.txt").write_text("The cafeteria serves lunch at noon.")
    store = DocStore(tmp_path / "docs.db")
    embedder = TopicEmbedder()
    report = store.add("kb", [docs], embedder=embedder)
    assert report.embedded == 3
    query = "how long does a feline rest"
    assert search(store, "kb", query, 3) == []  # no shared word: BM25 alone finds nothing
    hybrid = search(store, "kb", query, 3, embedder.embed([query])[0])
    assert Path(hybrid[0].file).name == "pets.txt" and hybrid[0].dense_rank == 1
    lexical_hit = search(store, "kb", "daemon port", 1, embedder.embed(["daemon port"])[0])
    assert Path(lexical_hit[0].file).name == "net.txt" and lexical_hit[0].bm25_rank == 1


def test_a_collection_keeps_its_embedding_model(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "docs.db")
    docs = write_docs(tmp_path / "docs")
    store.add("kb", [docs], embedder=TopicEmbedder())
    with pytest.raises(EmbeddingMismatch, match="topics"):
        store.add("kb", [docs])  # BM25-only chunks would be missing from dense ranking


def test_the_context_numbers_sources_and_asks_for_citations(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "docs.db")
    store.add("kb", [write_docs(tmp_path / "docs")])
    passages = search(store, "kb", "daemon port backups", 2)
    context = format_context(passages)
    assert len(passages) == 2 and "cite" in context.lower()
    for p in passages:
        assert f"[{p.n}] {p.source}\n{p.text}" in context
    assert cited("Port 8125 [1], nightly [2][1], bogus [9]", len(passages)) == [1, 2]


# ---------------------------------------------------------------- the stage: schema, plan, engine, session


def _registry_with_embedder(config_dir: ConfigDir) -> Registry:
    models = config_dir.models()
    models["models"]["embedder"] = {**models["models"]["gemma3-270m"], "role": "embedding",
                                    "extra_args": ["--pooling", "mean"], "default_n_ctx": 1024}
    config_dir.write_models(models)
    return Registry(load_config(config_dir.path))


RAG_PIPELINE = {"name": "rag", "stages": [
    {"name": "retrieve", "kind": "retrieve", "collection": "kb", "top_k": 2},
    {"name": "answer", "models": ["gemma3-270m"], "max_tokens": 16},
]}


def test_retrieve_stage_schema_needs_a_collection_and_no_models() -> None:
    with pytest.raises(ValueError, match="needs 'collection'"):
        PipelineSpec.model_validate({"stages": [{"name": "r", "kind": "retrieve"}]})
    with pytest.raises(ValueError, match="runs no model"):
        PipelineSpec.model_validate({"stages": [{"name": "r", "kind": "retrieve", "collection": "kb",
                                                 "models": ["m"]}]})
    with pytest.raises(ValueError, match="at least 1 model"):
        PipelineSpec.model_validate({"stages": [{"name": "g"}]})
    spec = PipelineSpec.model_validate(RAG_PIPELINE)
    assert spec.stages[0].passages == 2 and spec.model_names() == ["gemma3-270m"]


def test_plan_resolves_the_collections_embedder_with_embeddings_flag(config_dir: ConfigDir) -> None:
    registry = _registry_with_embedder(config_dir)
    store = DocStore.beside(registry.config.sessions_dir)
    docs = write_docs(config_dir.path.parent / "docs")
    store.add("kb", [docs])
    plain = build_plan(PipelineSpec.model_validate(RAG_PIPELINE), registry, Machine())
    assert plain.stages[0].calls == () and plain.stages[0].retrieval.embedder is None  # type: ignore[union-attr]
    store.remove("kb")
    store.add("kb", [docs], embedder=type("E", (TopicEmbedder,), {"model": "embedder"})())
    plan = build_plan(PipelineSpec.model_validate(RAG_PIPELINE), registry, Machine())
    retrieval = plan.stages[0].retrieval
    assert retrieval is not None and retrieval.top_k == 2 and retrieval.db == store.path
    server = retrieval.embedder.server  # type: ignore[union-attr]
    assert server is not None and server.extra_args[0] == "--embeddings" and "--pooling" in server.extra_args
    assert "--embeddings" not in plan.stages[1].calls[0].target.server.extra_args  # type: ignore[union-attr]
    assert plan.to_dict()["stages"][0]["retrieval"]["collection"] == "kb"


def test_later_stages_get_numbered_passages_and_the_session_records_them(config_dir: ConfigDir) -> None:
    from orchestrator.runs import Runner
    from orchestrator.runtime import Runtime

    DocStore.beside(config_dir.sessions_dir).add("kb", [write_docs(config_dir.path.parent / "docs")])
    pipeline = PipelineSpec.model_validate({"name": "rag", "stages": [
        RAG_PIPELINE["stages"][0],
        {"name": "answer", "models": ["gemma3-270m"]},  # default prompt: the retrieve stage's output
        {"name": "check", "models": ["gemma3-270m"], "prompt": "Sources:\n{{ context }}\nDraft: {{ previous }}"},
    ]})
    backend = FakeBackend(default=Script("The daemon uses port 8125 [1]."))
    runtime = Runtime(load_config(config_dir.path))
    outcome = asyncio.run(Runner(runtime).arun(pipeline, "Which port does the daemon listen on?", backend=backend))
    assert outcome.run.status == "completed", outcome.run.error
    first_prompt, second_prompt = (req.prompt for _, req in backend.requests)
    assert "[1] guide.md" in first_prompt and "8125" in first_prompt
    assert "Question: Which port does the daemon listen on?" in first_prompt
    assert "[1] guide.md" in second_prompt and "Draft: The daemon uses port 8125 [1]." in second_prompt

    session = Path(outcome.session_dir)
    retrieved = json.loads((session / "step1_retrieve.json").read_text())
    assert retrieved["collection"] == "kb" and retrieved["ranking"] == "bm25"
    assert retrieved["query"] == "Which port does the daemon listen on?"
    assert retrieved["passages"][0]["n"] == 1 and retrieved["passages"][0]["heading"] == "Install"
    assert stat.S_IMODE(os.stat(session / "step1_retrieve.json").st_mode) & 0o077 == 0
    step2 = json.loads((session / "step2.json").read_text())
    assert step2["params"]["sources"] == [{"step": 1, "stage": "retrieve",
                                           "passages": [p["n"] for p in retrieved["passages"]]}]
    loaded = Runner(runtime).store.load(outcome.session_id)  # read back: the passages are on the stage
    assert not loaded.problems
    assert loaded.stages[0].aggregation.details["passages"] == retrieved["passages"]  # type: ignore[union-attr]


def test_query_from_previous_retrieves_with_the_previous_answer(config_dir: ConfigDir) -> None:
    DocStore.beside(config_dir.sessions_dir).add("kb", [write_docs(config_dir.path.parent / "docs")])
    registry = Registry(load_config(config_dir.path))
    pipeline = PipelineSpec.model_validate({"stages": [
        {"name": "draft", "models": ["gemma3-270m"]},
        {"name": "retrieve", "kind": "retrieve", "collection": "kb", "top_k": 1, "query_from": "previous"},
        {"name": "final", "models": ["gemma3-270m"], "prompt": "{{ context }}"},
    ]})
    backend = FakeBackend(default=Script("backups nightly"))
    record = asyncio.run(Engine(backend).run(build_plan(pipeline, registry, Machine()), "unrelated question"))
    assert record.status == "completed"
    assert record.stages[1].prompt == "backups nightly"
    assert record.stages[1].aggregation.details["passages"][0]["heading"] == "Backups"  # type: ignore[union-attr]


def test_a_missing_collection_fails_the_stage_with_its_name(config_dir: ConfigDir) -> None:
    registry = Registry(load_config(config_dir.path))
    plan = build_plan(PipelineSpec.model_validate(RAG_PIPELINE), registry, Machine())
    record = asyncio.run(Engine(FakeBackend()).run(plan, "q"))
    assert record.status == "failed" and record.error is not None
    assert record.error.type == "CollectionNotFound" and "'kb'" in record.error.message


def test_templates_see_the_latest_retrieve_stages_context() -> None:
    from orchestrator.records import AggregationRecord, StageRecord

    def retrieved(index: int, context: str) -> StageRecord:
        return StageRecord(index, f"r{index}", output=context, aggregation=AggregationRecord(
            "retrieve", details={"context": context}))

    draft = StageRecord(2, "draft", output="d", aggregation=AggregationRecord("concat"))
    assert render("[{{ context }}]", build_context("q", "", []), where="t") == "[]"
    stages = [retrieved(1, "[1] a"), draft, retrieved(3, "[1] b")]
    assert render("{{ context }}", build_context("q", "", stages[:2]), where="t") == "[1] a"
    assert render("{{ context }}", build_context("q", "", stages), where="t") == "[1] b"


# ---------------------------------------------------------------- the CLI and the API


def test_docs_cli_add_list_show_search_rm(config_dir: ConfigDir, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    docs = write_docs(config_dir.path.parent / "docs")
    cfg = ["--config-dir", str(config_dir.path)]
    assert main(["docs", "add", "kb", str(docs), *cfg]) == 0
    assert "3 added" in capsys.readouterr().out
    assert main(["docs", "list", "--json", *cfg]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n_files"] == 3
    assert main(["docs", "show", "kb", *cfg]) == 0
    assert "guide.md" in capsys.readouterr().out
    assert main(["docs", "search", "kb", "daemon port", "--json", *cfg]) == 0
    assert json.loads(capsys.readouterr().out)[0]["heading"] == "Install"
    assert main(["docs", "rm", "kb", *cfg]) == 0
    assert main(["docs", "show", "kb", *cfg]) == 2
    assert "no document collection 'kb'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["docs", "--help"])
    assert exc.value.code == 0 and "search" in capsys.readouterr().out


def test_the_api_serves_a_pipeline_with_a_retrieve_stage(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import ApiSettings
    from orchestrator.app import Chorus

    root = tmp_path / "config"
    (root / "pipelines").mkdir(parents=True)
    (root / "app.yaml").write_text(yamlfile.dump({"models_dir": str(tmp_path), "sessions_dir":
                                                   str(tmp_path / "sessions"), "logs_dir": str(tmp_path / "logs")}))
    (root / "models.yaml").write_text(yamlfile.dump({"models": {"alpha": {"url": "http://upstream.test/v1"}}}))
    (root / "pipeline.yaml").write_text(yamlfile.dump({"stages": [{"name": "a", "models": ["alpha"]}]}))
    (root / "pipelines" / "rag.yaml").write_text(yamlfile.dump({"stages": [
        {"name": "retrieve", "kind": "retrieve", "collection": "kb", "top_k": 1},
        {"name": "answer", "models": ["alpha"]}]}))
    DocStore.beside(tmp_path / "sessions").add("kb", [write_docs(tmp_path / "docs")])
    backend = FakeBackend(default=Script(lambda req: "port 8125 [1]" if "8125" in req.prompt else "no source"))
    app = create_app(Chorus(load_config(root)), ApiSettings(), backend_factory=lambda: backend)
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host (DNS-rebinding guard)
        r = client.post("/v1/chat/completions", json={"model": "chorus/rag", "messages": [
            {"role": "user", "content": "Which port does the daemon listen on?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "port 8125 [1]"
    session = tmp_path / "sessions" / r.headers["X-Chorus-Session"]
    assert json.loads((session / "step1_retrieve.json").read_text())["passages"][0]["heading"] == "Install"


# ---------------------------------------------------------------- integration: the demo model, real embeddings


@pytest.mark.integration
def test_hybrid_rag_run_on_the_demo_model(config_dir: ConfigDir, llama_server_bin: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`chorus docs add --embed` through a real `llama-server --embeddings`, then a run whose retrieve stage
    embeds the question with it (hybrid) and whose answer prompt holds the passages; session recorded."""
    from cli.main import main
    from orchestrator.runs import Runner
    from orchestrator.runtime import Runtime

    _registry_with_embedder(config_dir)
    docs = write_docs(config_dir.path.parent / "docs")
    assert main(["docs", "add", "kb", str(docs), "--embed", "embedder", "--json",
                 "--config-dir", str(config_dir.path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 3 and report["embedded"] == report["chunks"] > 0
    runtime = Runtime(load_config(config_dir.path))
    try:
        pipeline = PipelineSpec.model_validate({"name": "rag", "stages": [
            {"name": "retrieve", "kind": "retrieve", "collection": "kb", "top_k": 2},
            {"name": "answer", "models": ["gemma3-270m"], "max_tokens": 8, "n_ctx": 1024, "seed": 7,
             "prompt": "{{ context }}\n\nQuestion: {{ question }}\nAnswer:"}]})
        outcome = Runner(runtime).run(pipeline, "Which port does the daemon listen on?")
    finally:
        runtime.close()
    assert outcome.run.status == "completed", outcome.run.error
    retrieve, answer = outcome.run.stages
    assert retrieve.aggregation is not None and retrieve.aggregation.details["ranking"] == "hybrid"
    assert retrieve.params["embedding_model"] == "embedder"
    passages = retrieve.aggregation.details["passages"]
    assert any(p["dense_rank"] is not None for p in passages)
    assert passages[0]["text"] in answer.prompt and "[1]" in answer.prompt
    assert answer.responses[0].completion_tokens
    session = Path(outcome.session_dir)
    assert json.loads((session / "step1_retrieve.json").read_text())["passages"] == passages


# ---------------------------------------------------------------- the Documents page and sources in a session


@pytest.fixture
def ui_config(config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config_dir.path))
    yield config_dir
    from ui.common import _chorus

    _chorus.clear()


def _page(name: str):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page(f"views/{name}.py")
    at.run()
    return at


def test_documents_page_adds_a_folder_and_searches_it(ui_config: ConfigDir) -> None:
    docs = write_docs(ui_config.path.parent / "docs")
    ui_config.write_app(docs={"allowed_roots": [str(docs)]})  # the page indexes only allowed folders (24.1)
    at = _page("documents")
    assert not at.exception and at.title[0].value == "Documents"
    at.text_input(key="docs-add-name").input("kb")
    at.selectbox(key="docs-add-root").set_value(str(docs))
    at.button(key="docs-add-submit").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("3 added" in s.value for s in at.success)
    at.text_input(key="docs-search-query").input("which port does the daemon use")
    at.run()
    assert not at.exception
    assert any("8125" in t.value for t in at.text)


def test_a_saved_rag_session_shows_its_cited_sources_beside_the_answer(ui_config: ConfigDir) -> None:
    from orchestrator.runs import Runner
    from orchestrator.runtime import Runtime

    DocStore.beside(ui_config.sessions_dir).add("kb", [write_docs(ui_config.path.parent / "docs")])
    runtime = Runtime(load_config(ui_config.path))
    outcome = asyncio.run(Runner(runtime).arun(PipelineSpec.model_validate(RAG_PIPELINE), "daemon port?",
                                               backend=FakeBackend(default=Script("Port 8125 [1]."))))
    assert outcome.run.status == "completed"
    at = _page("history")
    assert not at.exception, [e.value for e in at.exception]
    assert any(h.value == "Sources" for h in at.subheader)
    assert any("· cited" in e.label and "guide" in e.label for e in at.expander)  # (labels are md-escaped)
    assert any(c.value.startswith("file:///") for c in at.code)
