"""History on disk and in SQLite: the recorder driven by hand-made events, and real runs on the demo model.

`record_run` and `recorded_session` are the helpers the history fault tests share: they drive a Recorder
with the events the engine emits (RunStarted, StageFinished..., RunFinished), no llama-server needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launcher.fileio import write_text_atomic
from orchestrator.config.schema import PipelineSpec
from orchestrator.engine.events import RunFinished, RunStarted, StageFinished
from orchestrator.history import recorder as recorder_module
from orchestrator.history.recorder import Recorder
from orchestrator.history.store import SessionStore, normalise_id
from orchestrator.records import (
    AggregationRecord,
    ResponseRecord,
    RunRecord,
    StageRecord,
    run_from_dict,
    to_dict,
)
from orchestrator.runs import Runner
from orchestrator.runtime import Runtime
from tests.conftest import REPO, ConfigDir, small_pipeline

# ---------------------------------------------------------------- the recorder, from hand-made events


def make_stages(text: str = "blue light scatters more") -> list[StageRecord]:
    """A one-model stage and a three-model stage merged by concat, as the engine records them."""
    one = StageRecord(1, "analyse", system_prompt="Be brief.", prompt="Question: why?", params={"temperature": 0.3},
                      responses=[ResponseRecord("gemma3-270m", "gemma3-270m", prompt="Question: why?", text=text,
                                                status="ok", completion_tokens=5, total_s=0.4, tokens_per_s=12.5,
                                                finish_reason="stop", server_timings={"predicted_n": 5},
                                                server="http://127.0.0.1:9")],
                      output=text, status="ok", started_at=100.0, finished_at=101.5)
    labels = ["facts", "clarity", "skeptic"]
    two = StageRecord(2, "review", prompt="Review: " + text,
                      responses=[ResponseRecord(label, "gemma3-270m", text=f"{label} says {text}", status="ok")
                                 for label in labels],
                      aggregation=AggregationRecord("concat", inputs=[{"label": lb, "text": lb} for lb in labels],
                                                    output="merged " + text),
                      output="merged " + text, status="ok", started_at=102.0, finished_at=104.0)
    return [one, two]


def record_run(recorder: Recorder, stages: list[StageRecord], *, question: str = "Why is the sky blue?",
               status: str = "completed", finish: bool = True, close: bool = True) -> RunRecord:
    """Feed `recorder` the events of a run made of `stages`, as the engine emits them."""
    run = RunRecord(question=question, mode="manual", pipeline={"stages": [{"name": s.name} for s in stages]})
    recorder(RunStarted(run, None))  # type: ignore[arg-type]  # the recorder does not read the plan
    for stage in stages:
        run.stages.append(stage)
        recorder(StageFinished(run, stage))
    if finish:
        run.status = status  # type: ignore[assignment]
        run.final = stages[-1].output if status == "completed" else ""
        run.finished_at = 105.0
        recorder(RunFinished(run))
    if close:
        assert recorder.close() is None
    return run


def test_an_atomic_write_reaches_the_disk_before_it_replaces_the_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fast tier's conftest skips elsewhere: the new text is fsynced, then renamed over the file."""
    steps: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: steps.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}"))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (steps.append(f"replace {dst}"), replace(src, dst)))
    write_text_atomic(tmp_path / "session.json", "{}")
    assert len(steps) == 2 and steps[0].startswith(f"fsync {tmp_path}/.session.json.")
    assert steps[1] == f"replace {tmp_path / 'session.json'}" and (tmp_path / "session.json").read_text() == "{}"


def recorded_session(sessions_dir: Path, question: str = "Why is the sky blue?", **kwargs: object) -> str:
    """A complete two-stage session on disk (and in the index); returns its id."""
    store = SessionStore(sessions_dir)
    recorder = store.create({"mode": "manual", "question": question, "pipeline": {"stages": []}})
    record_run(recorder, make_stages(**kwargs), question=question)  # type: ignore[arg-type]
    return recorder.id


def test_the_recorder_writes_the_seed_layout_and_loads_back_the_same_records(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create({"mode": "manual", "question": "Why is the sky blue?", "pipeline": {"stages": []}})
    run = record_run(recorder, make_stages())
    d = recorder.dir
    assert sorted(p.name for p in d.iterdir()) == sorted([
        "config_snapshot.json", "session.json", "step1.json", "step2.json", "step2_facts.json",
        "step2_clarity.json", "step2_skeptic.json", "aggregation.json", "final.txt"])
    step1 = json.loads((d / "step1.json").read_text())
    assert step1["response"]["text"] == step1["output"] and step1["duration_s"] == 1.5
    assert step1["response"]["finish_reason"] == "stop" and step1["response"]["server_timings"] == {"predicted_n": 5}
    assert json.loads((d / "step2.json").read_text())["responses"] == ["facts", "clarity", "skeptic"]
    assert json.loads((d / "step2_facts.json").read_text())["text"] == "facts says blue light scatters more"
    assert [a["step"] for a in json.loads((d / "aggregation.json").read_text())] == [2]
    assert (d / "final.txt").read_text() == run.final
    meta = json.loads((d / "session.json").read_text())
    assert meta["status"] == "completed" and meta["stages"] == ["analyse", "review"]

    session = store.load(recorder.id)
    assert session.problems == []
    assert [to_dict(s) for s in session.stages] == [to_dict(s) for s in run.stages]  # one serializer, both ways
    again = session.to_run()
    assert again.question == run.question and again.final == run.final and again.status == "completed"
    assert run_from_dict(to_dict(run)) == run


def test_every_stage_is_on_disk_before_the_run_finishes(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create({"mode": "manual", "question": "q", "pipeline": {"stages": []}})
    stages = make_stages()
    record_run(recorder, stages[:1], finish=False, close=False)
    assert recorder.flush() is None
    assert json.loads((recorder.dir / "step1.json").read_text())["output"] == stages[0].output
    assert store.load(recorder.id).meta["status"] == "running"
    assert [r["status"] for r in store.list()] == ["running"]  # this process is alive: not interrupted
    recorder.close()


def test_the_observer_only_queues_the_writer_thread_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SessionStore(tmp_path)
    recorder = store.create({"mode": "manual", "question": "q", "pipeline": {"stages": []}})
    writers: list[str] = []
    real = recorder_module.write_text_atomic

    def tracking(path: Path, text: str) -> None:
        writers.append(threading.current_thread().name)
        real(path, text)

    monkeypatch.setattr(recorder_module, "write_text_atomic", tracking)
    record_run(recorder, make_stages())
    assert writers and set(writers) == {f"chorus-recorder-{recorder.id}"}


def test_the_index_is_updated_from_the_record_not_from_the_files(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the recorder read a session file back")

    monkeypatch.setattr("orchestrator.history.store.read_json", no_reading)
    sid = recorded_session(tmp_path, "Tell me about the ocean", text="waves and salt")
    monkeypatch.undo()
    index = SessionStore(tmp_path).index
    assert [(r["id"], r["status"], r["stages"]) for r in index.list()] == [(sid, "completed", 2)]
    assert [h["id"] for h in index.search("salt")] == [sid]


def test_recording_and_indexing_a_run_never_imports_sqlite_utils(tmp_path: Path) -> None:
    """The writer thread runs beside the run's first llama-server loading: sqlite-utils (and what it pulls
    in) cost a cold run tens of ms there and a process ~80 MiB; plain sqlite3 writes the index, readers
    still query it through sqlite-utils."""
    script = f"""
import sys
from tests.test_sessions import make_stages, record_run
from orchestrator.history.store import SessionStore
store = SessionStore({str(tmp_path)!r})
recorder = store.create({{"mode": "manual", "question": "Why is the sea salty?", "pipeline": {{"stages": []}}}})
record_run(recorder, make_stages("rivers carry salt"))
assert "sqlite_utils" not in sys.modules, "the recorder imported sqlite_utils"
assert [h["id"] for h in store.index.search("rivers")] == [recorder.id]
assert "sqlite_utils" in sys.modules  # reading goes through it
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_reading_the_index_in_a_fresh_process_does_not_import_pandas(tmp_path: Path) -> None:
    """sqlite-utils imports pandas and numpy where they are installed: 0.5 s of CPU in every `chorus history`
    command, for DataFrame column types chorus never uses. Blocked while it is imported; importable after."""
    store = SessionStore(tmp_path)
    recorder = store.create({"mode": "manual", "question": "Why is the sea salty?", "pipeline": {"stages": []}})
    record_run(recorder, make_stages("rivers carry salt"))
    script = f"""
import sys
from orchestrator.history.store import SessionStore
index = SessionStore({str(tmp_path)!r}).index
assert [r["id"] for r in index.list()] == [{recorder.id!r}]
assert [h["id"] for h in index.search("rivers")] == [{recorder.id!r}]
assert "sqlite_utils" in sys.modules
assert "pandas" not in sys.modules and "numpy" not in sys.modules, "reading the index imported pandas"
import pandas  # noqa: F401  (still importable afterwards)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_rerun_records_its_copied_stages_and_its_parent(tmp_path: Path) -> None:
    parent = recorded_session(tmp_path)
    store = SessionStore(tmp_path)
    prior = store.load(parent).stages[:1]
    prior[0].status = "copied"
    recorder = store.create({"mode": "manual", "question": "Why is the sky blue?", "pipeline": {"stages": []}})
    run = RunRecord(question="Why is the sky blue?", mode="manual", pipeline={}, parent_session=parent,
                    rerun_from_stage=2)
    recorder(RunStarted(run, None))  # type: ignore[arg-type]
    for stage in [*prior, make_stages("again")[1]]:
        run.stages.append(stage)
        recorder(StageFinished(run, stage))
    run.status, run.final = "completed", "merged again"
    recorder(RunFinished(run))
    assert recorder.close() is None
    child = store.load(recorder.id)
    assert child.meta["parent_session"] == parent and child.meta["rerun_from_stage"] == 2
    assert [s.status for s in child.stages] == ["copied", "ok"]
    assert child.stages[0].output == store.load(parent).stages[0].output


# ---------------------------------------------------------------- real runs


def tiny(max_tokens: int = 6, **params: object) -> PipelineSpec:
    return PipelineSpec.model_validate({"stages": [{"name": "answer", "models": ["gemma3-270m"],
                                                    "max_tokens": max_tokens, "n_ctx": 512, **params}]})


def own_history(runtime: Runtime, tmp_path: Path) -> Runner:
    """A Runner on the session's warm runtime that saves into this test's own sessions folder."""
    return Runner(runtime, store=SessionStore(tmp_path / "sessions"))


@pytest.mark.integration
def test_a_real_run_writes_the_seed_layout(shared_runtime: Runtime, tmp_path: Path) -> None:
    outcome = own_history(shared_runtime, tmp_path).run(small_pipeline(), "Why is the sky blue?", mode="base")
    assert outcome.run.status == "completed" and outcome.session_dir
    d = outcome.session_dir
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["config_snapshot.json", "session.json", "step1.json", "step2.json", "step3.json",
                            "step3_reviewer-facts.json", "step3_reviewer-clarity.json",
                            "step3_reviewer-skeptic.json", "aggregation.json", "final.txt"])
    snap = json.loads((d / "config_snapshot.json").read_text())
    assert snap["mode"] == "base" and snap["pipeline"]["stages"][0]["name"] == "analyse"
    model = snap["models"]["gemma3-270m"]
    assert model["size_bytes"] > 0 and model["mtime_ns"] > 0
    assert "chorus-lcp" in snap["versions"]["llama_server"] and snap["versions"]["chorus"]
    step1 = json.loads((d / "step1.json").read_text())
    assert "Why is the sky blue?" in step1["prompt"]  # the analyse stage's template, rendered
    assert step1["system_prompt"] and step1["response"]["text"] == step1["output"]
    assert step1["params"]["models"][0]["temperature"] == 0.3  # the resolved plan of the stage
    assert step1["status"] == "ok" and step1["duration_s"] > 0
    one = json.loads((d / "step3_reviewer-facts.json").read_text())
    assert one["text"] and one["completion_tokens"] and one["total_s"] and one["error"] is None
    aggs = json.loads((d / "aggregation.json").read_text())
    syn = next(a for a in aggs if a["kind"] == "synthesis")
    assert syn["step"] == 3 and len(syn["inputs"]) == 3 and syn["details"]["synthesis_prompt"]
    call = syn["details"]["synthesis_calls"][0]
    assert call["status"] == "ok" and call["completion_tokens"] and call["total_s"] > 0
    assert (d / "final.txt").read_text() == outcome.run.final
    meta = json.loads((d / "session.json").read_text())
    assert meta["status"] == "completed" and meta["mode"] == "base" and meta["question"] == "Why is the sky blue?"


@pytest.mark.integration
def test_eight_parallel_runs_get_eight_distinct_complete_sessions(runtime: Runtime) -> None:
    runner = Runner(runtime)
    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(lambda i: runner.run(tiny(), f"question number {i}"), range(8)))
    ids = {o.session_id for o in outcomes}
    assert len(ids) == 8
    for o in outcomes:
        assert o.run.status == "completed"
        meta = json.loads((o.session_dir / "session.json").read_text())  # type: ignore[operator]
        assert meta["status"] == "completed" and (o.session_dir / "final.txt").exists()  # type: ignore[operator]
    assert runner.store.index.count() == 8
    assert runtime.pool.starts == 1


@pytest.mark.integration
def test_a_run_killed_mid_stage_leaves_valid_json(config_dir: ConfigDir, llama_server_bin: Path,
                                                 tmp_path: Path) -> None:
    spec = tmp_path / "manual.yaml"
    spec.write_text("stages:\n  - {name: quick, models: [gemma3-270m], max_tokens: 4, n_ctx: 1024}\n"
                    "  - {name: slow, models: [gemma3-270m], max_tokens: 3000, n_ctx: 4096,"
                    " prompt: 'Count: 1, 2, 3,'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "q", "--manual", str(spec),
                             "--config-dir", str(config_dir.path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = config_dir.sessions_dir / "session_001"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (session / "step1.json").exists():
        time.sleep(0.05)
    time.sleep(0.5)  # into stage 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for f in session.glob("*.json"):
        json.loads(f.read_text())  # every file is whole
    assert not list(session.glob(".*tmp"))
    meta = json.loads((session / "session.json").read_text())
    assert meta["status"] == "running" and meta["stages"] == ["quick"]
    loaded = SessionStore(config_dir.sessions_dir).load("1")
    assert [s.name for s in loaded.stages] == ["quick"] and loaded.final is None
    assert loaded.meta["status"] == "interrupted" and loaded.problems == []  # its writer is gone


@pytest.mark.integration
def test_reindex_after_deleting_the_database_finds_the_same_sessions(shared_runtime: Runtime, tmp_path: Path) -> None:
    runner = own_history(shared_runtime, tmp_path)
    for q in ("alpha question", "beta question"):
        runner.run(tiny(), q)
    before = runner.store.index.list()
    db = runner.store.dir / "index.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    runner.store.index.rebuild()
    after = runner.store.index.list()
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert [r["question"] for r in after] == [r["question"] for r in before]


@pytest.mark.integration
def test_a_corrupt_database_is_rebuilt_not_fatal(shared_runtime: Runtime, tmp_path: Path) -> None:
    runner = own_history(shared_runtime, tmp_path)
    runner.run(tiny(), "gamma question")
    (runner.store.dir / "index.db").write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{runner.store.dir / 'index.db'}{suffix}").unlink(missing_ok=True)
    assert [r["question"] for r in runner.store.index.list()] == ["gamma question"]


@pytest.mark.integration
def test_search_finds_a_question_by_a_word_of_its_final_answer(shared_runtime: Runtime, tmp_path: Path) -> None:
    runner = own_history(shared_runtime, tmp_path)
    outcome = runner.run(tiny(12, temperature=0, seed=3), "Tell me about the ocean")  # deterministic words
    runner.run(tiny(), "something unrelated")
    words = re.findall(r"[A-Za-z]{4,}", outcome.run.final)
    assert words, f"need a word in the answer: {outcome.run.final!r}"
    hits = runner.store.index.search(words[0])
    assert outcome.session_id in [h["id"] for h in hits]
    hit = next(h for h in hits if h["id"] == outcome.session_id)
    assert hit["question"] == "Tell me about the ocean" and "[" in hit["snippet"]


@pytest.mark.integration
def test_rerun_changes_only_the_stages_from_n_on(shared_runtime: Runtime, tmp_path: Path) -> None:
    runtime = shared_runtime
    runner = own_history(runtime, tmp_path)
    first = runner.run(small_pipeline(), "What is rain?", mode="base")
    starts = runtime.pool.starts
    again = runner.rerun(first.session_id, 2, overrides=["draft.seed=99", "draft.temperature=1.2"])  # type: ignore
    assert again.run.status == "completed" and again.session_id != first.session_id
    meta = json.loads((again.session_dir / "session.json").read_text())  # type: ignore[operator]
    assert meta["parent_session"] == first.session_id and meta["rerun_from_stage"] == 2
    parent = runner.store.load(first.session_id)  # type: ignore[arg-type]
    child = runner.store.load(again.session_id)  # type: ignore[arg-type]
    assert child.stages[0].output == parent.stages[0].output and child.stages[0].status == "copied"
    assert child.stages[1].status == "ok" and child.stages[1].responses[0].params["seed"] == 99
    assert json.loads((again.session_dir / "config_snapshot.json").read_text())[  # type: ignore[operator]
        "pipeline"]["stages"][1]["seed"] == 99
    assert runtime.pool.starts == starts  # servers stayed warm


def test_session_ids_are_flexible() -> None:
    assert normalise_id("7") == normalise_id("session_007") == normalise_id(7) == "session_007"
