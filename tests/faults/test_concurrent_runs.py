"""Fault 10: eight runs at once against one pool. Every session is complete and no server starts twice."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from launcher.process.server import ModelServer
from orchestrator.config.overrides import apply_overrides
from orchestrator.history.store import SessionStore, write_json_atomic
from orchestrator.runs import Runner, RunOutcome
from tests.conftest import ConfigDir, small_pipeline
from tests.faults.conftest import assert_session_valid, chorus_main, make_runtime

RUNS = 8


@pytest.mark.integration
def test_eight_concurrent_runs_complete_every_session_and_share_one_server_per_key(
        config_dir: ConfigDir, llama_server_bin, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple] = []
    real_start = ModelServer.start

    def counting_start(self: ModelServer, **kwargs: Any) -> ModelServer:
        started.append(self.spec.key)
        return real_start(self, **kwargs)

    monkeypatch.setattr(ModelServer, "start", counting_start)
    runtime = make_runtime(config_dir)  # cold: the eight runs race for the first start
    runner = Runner(runtime)
    # the base pipeline (3 stages, 3 parallel reviewers), merged by concat: a synthesis of 4 tokens
    # model may come back empty, which fails the run for reasons that have nothing to do with concurrency
    spec = apply_overrides(small_pipeline(max_tokens=4), ["review.aggregation.type=concat"])
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(RUNS)]
    try:
        with ThreadPoolExecutor(RUNS) as pool:
            outcomes: list[RunOutcome] = list(pool.map(lambda q: runner.run(spec, q, mode="base"), questions))
        servers = runtime.pool.servers()
    finally:
        runtime.close()

    assert [o.run.status for o in outcomes] == ["completed"] * RUNS, [o.run.error for o in outcomes]
    assert all(o.history_error is None for o in outcomes), [o.history_error for o in outcomes]
    assert not [key for key, n in Counter(started).items() if n > 1], started  # no key started twice
    models = set(spec.model_names())  # the two demo models: one server each, shared by all eight runs
    assert runtime.pool.starts == len(started) == len(servers) == len(models) == 2

    ids = [o.session_id for o in outcomes]
    assert len(set(ids)) == RUNS and None not in ids
    for outcome, question in zip(outcomes, questions, strict=True):
        saved = assert_session_valid(config_dir.sessions_dir, outcome.session_id)  # type: ignore[arg-type]
        assert saved["question"] == question  # no run wrote into another's session
        assert saved["final"] == outcome.run.final
        assert [s["name"] for s in saved["steps"]] == ["analyse", "draft", "review"]
        assert len(saved["steps"][2]["responses"]) == 3
        assert all(r["status"] == "ok" for step in saved["steps"] for r in step["responses"])

    indexed = {row["id"] for row in SessionStore(config_dir.sessions_dir).index.list(limit=100)}
    assert indexed == set(ids)  # the search index lost none of them either
    listed = chorus_main(config_dir, "history", "search", "plus")
    assert listed.returncode == 0 and all(sid in listed.stdout for sid in ids), listed.stdout


def _fake_sessions(sessions_dir: Path, n: int) -> list[str]:
    ids = []
    for i in range(n):
        folder = sessions_dir / f"session_{i + 1:03d}"
        folder.mkdir(parents=True)
        write_json_atomic(folder / "session.json", {"id": folder.name, "question": f"what is {i} plus {i}",
                                                    "status": "completed", "stages": [], "mode": "manual"})
        (folder / "final.txt").write_text(f"answer {i}")
        ids.append(folder.name)
    return ids


def _index_one(args: tuple[str, str]) -> None:
    SessionStore(Path(args[0])).index_session(args[1])


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_concurrent_index_updates_lose_nothing_and_never_rebuild(tmp_path: Path, workers: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Regression: 'database is locked' was taken for corruption, the index moved aside and rebuilt under the
    other writers, and racing schema creation left an FTS table without triggers (search found nothing)."""
    ids = _fake_sessions(tmp_path, RUNS)
    jobs = [(str(tmp_path), sid) for sid in ids]
    with caplog.at_level(logging.WARNING):
        if workers == "threads":
            barrier = threading.Barrier(RUNS)

            def index(job: tuple[str, str]) -> None:
                barrier.wait()
                _index_one(job)

            with ThreadPoolExecutor(RUNS) as pool:
                list(pool.map(index, jobs))
        else:
            with multiprocessing.get_context("fork").Pool(RUNS) as pool:
                pool.map(_index_one, jobs)
                # the workers exit by themselves: once, the block's terminate() left a worker waiting on the
                # task queue's lock (gdb: sem_wait in the worker loop) and the test joined it forever
                pool.close()
                pool.join()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not list(tmp_path.glob("index.db*.corrupt-*"))
    index = SessionStore(tmp_path).index
    assert {row["id"] for row in index.list()} == set(ids)
    assert {hit["id"] for hit in index.search("plus", limit=100)} == set(ids)
