"""Documents and the retrieve stage at their edges, each found by QA: an embedding model gone since the
collection was made, paths with '..', a path that is not there, a Markdown file with a BOM, an empty query or
a count below 1, a damaged PDF's warnings. Real files, real docs.db, the real CLI and backend."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.rag.chunking import chunk_document, read_document
from orchestrator.rag.retrieval import search
from orchestrator.rag.store import CollectionNotFound, DocStore
from tests.clirun import run_main
from tests.conftest import ConfigDir


class Named:
    """A deterministic embedder under a models.yaml name (the vectors' values do not matter here)."""

    def __init__(self, model: str) -> None:
        self.model = model

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[float(len(t) % 7) + 1.0, 1.0, float("backup" in t)] for t in texts]


class Failing(Named):
    def embed(self, texts: list[str]) -> list[list[float]]:
        from orchestrator.rag.embed import EmbeddingFailed

        raise EmbeddingFailed(self.model, "HTTP 500: pooling type NONE is not supported")


def corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "backups.txt").write_text("Backups run nightly and are kept for fourteen days.\n")
    (root / "guide.md").write_text("# Install\n\nThe daemon listens on port 8125.\n")
    return root


def cli(config_dir: ConfigDir, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr with its lines joined: chorus wraps an error at 100 columns)."""
    out = run_main(*args, "--config-dir", str(config_dir.path))
    return out.returncode, out.stdout, " ".join(out.stderr.split())


# ---------------------------------------------------------------- 2: the collection's embedding model is gone


@pytest.mark.timeout(120)
def test_a_retrieve_stage_whose_embedding_model_is_gone_fails_cleanly(config_dir: ConfigDir) -> None:
    """The collection was indexed with 'gemma-embed', which models.yaml no longer has. The real backend
    raised ValueError out of the run (a traceback, `run failed`, a session without stages); now the stage
    fails with ModelUnavailable naming the model and why, and the session records it."""
    from orchestrator.runs import Runner
    from orchestrator.runtime import Runtime

    store = DocStore.beside(config_dir.sessions_dir)
    store.add("kb", [corpus(config_dir.path.parent / "docs")], embedder=Named("gemma-embed"))
    runtime = Runtime(load_config(config_dir.path))
    try:
        pipeline = PipelineSpec.model_validate({"name": "rag_only", "stages": [
            {"name": "sources", "kind": "retrieve", "collection": "kb", "top_k": 2}]})
        outcome = Runner(runtime).run(pipeline, "How long are backups kept?")
    finally:
        runtime.close()
    assert outcome.run.status == "failed"
    [stage] = outcome.run.stages
    assert stage.status == "failed" and stage.error is not None
    assert stage.error.type == "ModelUnavailable", stage.error
    assert "model 'gemma-embed' is unavailable" in stage.error.message
    assert "models.yaml" in stage.error.message
    step = json.loads((Path(outcome.session_dir) / "step1.json").read_text())
    assert step["status"] == "failed" and step["error"]["type"] == "ModelUnavailable"


def test_the_cli_run_says_which_model_is_gone_without_a_traceback(config_dir: ConfigDir) -> None:
    DocStore.beside(config_dir.sessions_dir).add("kb", [corpus(config_dir.path.parent / "docs")],
                                                 embedder=Named("gemma-embed"))
    (config_dir.path / "pipelines").mkdir(exist_ok=True)
    (config_dir.path / "pipelines" / "rag_only.yaml").write_text(
        "stages:\n  - name: sources\n    kind: retrieve\n    collection: kb\n")
    code, out, err = cli(config_dir, "run", "--pipeline", str(config_dir.path / "pipelines" / "rag_only.yaml"),
                         "How long are backups kept?")
    assert "Traceback" not in err and "ValueError" not in err, err
    assert "gemma-embed" in out + err and "unavailable" in out + err, (out, err)
    assert code != 0


# ---------------------------------------------------------------- 6: '..' and the same file twice


def test_a_file_given_twice_through_dotdot_is_indexed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    store = DocStore(tmp_path / "docs.db")
    report = store.add("de", ["corpus/backups.txt", "./corpus/../corpus/backups.txt", str(docs / "sub" / "..")])
    assert report.added == 2 and report.files == 2, report
    assert sorted(f["path"] for f in store.files("de")) == [str(docs / "backups.txt"), str(docs / "guide.md")]
    again = store.add("de", ["corpus/./backups.txt"])  # the same file, another spelling: nothing new
    assert (again.added, again.unchanged) == (0, 1)
    assert all(".." not in r for r in store.collection("de")["roots"])


def test_a_path_indexed_with_dotdot_before_is_replaced_by_its_normal_path(tmp_path: Path) -> None:
    """A docs.db written before paths were normalised holds 'corpus/../corpus/x': re-adding the folder drops
    that duplicate, keeping the file once under its normal path."""
    docs = corpus(tmp_path / "corpus")
    db = tmp_path / "docs.db"
    store = DocStore(db)
    store.add("de", [docs])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE files SET path = ? WHERE path = ?",
                     (str(docs / ".." / "corpus" / "backups.txt"), str(docs / "backups.txt")))
    conn.close()
    report = store.add("de", [docs])
    assert (report.added, report.removed) == (1, 1)
    assert sorted(f["path"] for f in store.files("de")) == [str(docs / "backups.txt"), str(docs / "guide.md")]


# ---------------------------------------------------------------- 7: a path that is not there


def test_a_folder_moved_away_does_not_empty_the_collection(tmp_path: Path) -> None:
    docs = corpus(tmp_path / "corpus2")
    store = DocStore(tmp_path / "docs.db")
    store.add("u2", [docs])
    docs.rename(tmp_path / "elsewhere")
    report = store.add("u2", [docs])
    assert report.removed == 0 and report.skipped == {str(docs): "not found"}
    assert store.collection("u2")["n_files"] == 2 and search(store, "u2", "backups kept")
    (tmp_path / "elsewhere").rename(docs)  # a file gone from a folder that is there: that one is removed
    (docs / "guide.md").unlink()
    assert store.add("u2", [docs]).removed == 1 and store.collection("u2")["n_files"] == 1


def test_adding_only_paths_that_are_not_there_makes_no_collection(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "docs.db")
    report = store.add("newc", [tmp_path / "nonexistent"])
    assert report.skipped == {str(tmp_path / "nonexistent"): "not found"}
    assert store.collections() == []
    with pytest.raises(CollectionNotFound):
        store.collection("newc")


def test_the_cli_refuses_a_path_that_is_not_there_and_changes_nothing(config_dir: ConfigDir, tmp_path: Path) -> None:
    docs = corpus(tmp_path / "corpus2")
    assert cli(config_dir, "docs", "add", "u2", str(docs))[0] == 0
    moved = tmp_path / "moved"
    docs.rename(moved)
    code, out, err = cli(config_dir, "docs", "add", "u2", str(docs))
    assert code == 2 and f"not found: {docs}" in err and "Traceback" not in err, (out, err)
    assert "removed" not in out
    moved.rename(docs)
    code, out, _ = cli(config_dir, "docs", "show", "u2", "--json")
    assert code == 0 and json.loads(out)["n_files"] == 2  # the collection kept its files

    code, out, err = cli(config_dir, "docs", "add", "newc", str(tmp_path / "nonexistent" / "path"))
    assert code == 2 and "not found" in err and "Nothing was indexed" in err, err
    code, out, err = cli(config_dir, "docs", "add", "u2", str(docs), str(tmp_path / "typo"))  # one of several
    assert code == 2 and str(tmp_path / "typo") in err
    code, out, _ = cli(config_dir, "docs", "list", "--json")
    assert [c["name"] for c in json.loads(out)] == ["u2"]  # no empty 'newc'


def test_a_new_collection_whose_embedding_fails_is_not_left_behind(tmp_path: Path) -> None:
    from orchestrator.rag.embed import EmbeddingFailed

    store = DocStore(tmp_path / "docs.db")
    docs = corpus(tmp_path / "docs")
    with pytest.raises(EmbeddingFailed):
        store.add("emb", [docs], embedder=Failing("gemma-embed"))
    assert store.collections() == []  # not an empty collection bound to gemma-embed
    assert store.add("emb", [docs]).added == 2  # so it can be made again, BM25 only
    assert store.collection("emb")["embed_model"] is None
    store.add("emb2", [docs], embedder=Named("m"))
    (docs / "new.txt").write_text("new text")
    with pytest.raises(EmbeddingFailed):  # an existing collection keeps what it has
        store.add("emb2", [docs], embedder=Failing("m"))
    assert store.collection("emb2")["n_files"] == 2 and store.collection("emb2")["embed_model"] == "m"


# ---------------------------------------------------------------- 10: a BOM


def test_a_markdown_file_with_a_bom_has_its_heading_and_no_bom(tmp_path: Path) -> None:
    path = tmp_path / "title.md"
    path.write_bytes(b"\xef\xbb\xbf# Title\n\nCaf\xc3\xa9 text under the title.\n\n## Next\n\nMore words.\n")
    data = path.read_bytes()
    chunks = chunk_document(read_document(path), chunk_chars=40, overlap_chars=5)
    assert chunks[0].heading == "Title" and chunks[0].text.startswith("# Title")
    assert not any("\ufeff" in c.text for c in chunks)
    for c in chunks:  # byte ranges still point into the file (the BOM's 3 bytes counted)
        assert data[c.byte_start:c.byte_end].decode("utf-8") == c.text
    txt = tmp_path / "plain.txt"
    txt.write_bytes(b"\xef\xbb\xbfplain text")
    [chunk] = chunk_document(read_document(txt))
    assert chunk.text == "plain text" and (chunk.byte_start, chunk.byte_end) == (3, 13)
    html = tmp_path / "page.html"
    html.write_bytes(b"\xef\xbb\xbf<h1>Head</h1><p>Body</p>")
    assert "\ufeff" not in chunk_document(read_document(html))[0].text

    store = DocStore(tmp_path / "docs.db")
    store.add("bom", [path])
    assert search(store, "bom", "title text")[0].heading == "Title"


# ---------------------------------------------------------------- 11: what `docs search` takes


@pytest.mark.parametrize(("args", "says"), [
    (["kb", ""], "the query is empty"),
    (["kb", "   "], "the query is empty"),
    (["kb", "backups", "-k", "0"], "-k/--top-k: must be at least 1, got 0"),
    (["kb", "backups", "-k", "-3"], "must be at least 1, got -3"),
    (["kb", "backups", "--chars", "-5"], "--chars: must be at least 1, got -5"),
    (["kb", "backups", "--chars", "0"], "--chars: must be at least 1, got 0"),
])
def test_docs_search_refuses_an_empty_query_and_counts_below_one(config_dir: ConfigDir, tmp_path: Path,
                                                                 args: list[str], says: str) -> None:
    DocStore.beside(config_dir.sessions_dir).add("kb", [corpus(tmp_path / "docs")])
    code, out, err = cli(config_dir, "docs", "search", *args)
    assert code == 2 and says in err and "Traceback" not in err, (out, err)
    assert out == ""


def test_a_blank_query_finds_nothing_even_in_a_hybrid_collection(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "docs.db")
    store.add("hb", [corpus(tmp_path / "docs")], embedder=Named("e"))
    assert search(store, "hb", "", 3, Named("e").embed([""])[0]) == []  # was: 3 arbitrary passages
    assert search(store, "hb", "  \n", 3) == []
    assert search(store, "hb", "backups", 3, Named("e").embed(["backups"])[0])


def test_docs_search_still_prints_passages(config_dir: ConfigDir, tmp_path: Path) -> None:
    DocStore.beside(config_dir.sessions_dir).add("kb", [corpus(tmp_path / "docs")])
    code, out, err = cli(config_dir, "docs", "search", "kb", "backups kept", "-k", "1", "--chars", "7")
    assert code == 0 and "1 passage(s)" in out and "Backups…" in out, (out, err)


# ---------------------------------------------------------------- 13: a damaged PDF says so once


def test_a_damaged_pdf_is_reported_once_without_pypdfs_warnings(config_dir: ConfigDir, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    docs = corpus(tmp_path / "docs")
    (docs / "broken.pdf").write_bytes(b"this is not a pdf at all, no header and no EOF marker")
    (docs / "truncated.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n")
    pypdf_log = logging.getLogger("pypdf")
    level = pypdf_log.level
    with caplog.at_level(logging.WARNING):
        code, out, err = cli(config_dir, "docs", "add", "kb", str(docs), "--no-embed")
    assert code == 0 and "2 added" in out, (out, err)
    assert f"skipped {docs / 'broken.pdf'}: not a readable PDF" in err
    assert f"skipped {docs / 'truncated.pdf'}: not a readable PDF" in err
    assert "WARNING" not in err and "EOF marker" not in err and "pdf header" not in err, err
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
    assert pypdf_log.level == level  # put back: the quiet is only while chorus reads a PDF


# ---------------------------------------------------------------- 12: generation settings on a retrieve stage


def test_a_retrieve_stage_refuses_generation_settings_as_it_refuses_models() -> None:
    from orchestrator.config.overrides import apply_overrides
    from orchestrator.errors import ConfigError

    stage = {"name": "s", "kind": "retrieve", "collection": "kb"}
    for extra, named in (({"temperature": 0.5}, "'temperature'"), ({"n_ctx": 1024}, "'n_ctx'"),
                         ({"max_tokens": 5, "seed": 1}, "'max_tokens', 'seed'")):
        with pytest.raises(ValueError, match=f"a retrieve stage runs no model: leave out {named}"):
            PipelineSpec.model_validate({"stages": [{**stage, **extra}]})
    spec = PipelineSpec.model_validate({"defaults": {"temperature": 0.3},  # defaults are for generate stages
                                        "stages": [{**stage, "top_k": 3}, {"name": "a", "models": ["m"]}]})
    with pytest.raises(ConfigError, match="leave out 'temperature'"):
        apply_overrides(spec, ["s.temperature=0.5"])
    assert apply_overrides(spec, ["s.top_k=2", "a.temperature=0.5"]).stages[0].passages == 2
