"""Errors on records: typed (`ErrorInfo`) in memory, the same dicts as before on disk and in API bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.errors import error_body, status_of
from launcher.errors import InsufficientMemory, ServerCrashed
from orchestrator.history.serialize import dumps, session_meta, stage_files
from orchestrator.history.store import SessionStore
from orchestrator.records import ErrorInfo, RecordError, ResponseRecord, response_from_dict, to_dict

# Errors as chorus wrote them before ErrorInfo existed: ChorusError.to_dict's key order (the instance's fields,
# then type, then hint), a plain exception without a hint, an error nested in an aggregation's details.
CRASHED = {"message": "model 'gemma': server crashed: connection reset", "model": "gemma",
           "detail": "connection reset", "command": ["llama-server", "-m", "gemma.gguf"], "log_tail": "abort",
           "exit_code": -9, "log_path": "/logs/gemma.log", "type": "ServerCrashed",
           "hint": "The server is restarted on the next request; its log may say why it died."}
PLAIN = {"type": "ValueError", "message": "bad value"}
MERGE_FAILED = {"message": "aggregation 'synthesis' failed: synthesis model x failed", "kind": "synthesis",
                "reason": "synthesis model x failed",
                "details": {"synthesis_model": "x", "synthesis_error": {**PLAIN, "hint": None}},
                "type": "AggregationError", "hint": None}
REFUSED = {"message": "the run does not fit in memory: stage 'a': too big", "reasons": {"a": "too big"},
           "type": "RunRefused", "hint": "Use a smaller n_ctx."}


def _response(label: str, error: dict[str, Any] | None, status: str = "failed") -> dict[str, Any]:
    return {"label": label, "model": "gemma", "system_prompt": "", "prompt": "Q", "params": {}, "text": "",
            "status": status, "error": error, "prompt_tokens": None, "completion_tokens": None,
            "first_token_s": None, "total_s": None, "tokens_per_s": None, "finish_reason": None,
            "server_timings": {}, "server": None, "started_at": 10.0, "finished_at": 11.0}


def _old_session(sessions_dir: Path) -> Path:
    """session_001 as the writer before ErrorInfo laid it out: one failed stage of two models."""
    folder = sessions_dir / "session_001"
    folder.mkdir(parents=True)
    stage = {"index": 1, "name": "review", "system_prompt": "", "prompt": "Q", "params": {}, "execution": "parallel",
             "waves": [["a", "b"]], "wave_servers": [], "aggregation": None, "output": "", "status": "failed",
             "error": MERGE_FAILED, "started_at": 10.0, "finished_at": 12.0, "duration_s": 2.0}
    files = {"step1_a.json": {"step": 1, "stage": "review", **_response("a", CRASHED)},
             "step1_b.json": {"step": 1, "stage": "review", **_response("b", PLAIN)},
             "step1.json": {**stage, "responses": ["a", "b"]},
             "aggregation.json": [],
             "config_snapshot.json": {"mode": "manual", "question": "Q", "pipeline": {"stages": []}},
             "session.json": {"id": "session_001", "created_at": 10.0, "finished_at": 12.0, "mode": "manual",
                              "question": "Q", "status": "failed", "parent_session": None,
                              "rerun_from_stage": None, "stages": ["review"], "error": REFUSED, "warnings": [],
                              "writer": {"pid": 1, "host": "elsewhere", "started_at": 10.0}}}
    for name, data in files.items():
        (folder / name).write_text(dumps(data), encoding="utf-8")
    return folder


def test_a_session_written_before_error_info_loads_its_errors_typed_and_writes_them_back_identical(
        tmp_path: Path) -> None:
    folder = _old_session(tmp_path)
    session = SessionStore(tmp_path).load("session_001")
    assert session.problems == []
    (stage,) = session.stages
    crashed, plain = (r.error for r in stage.responses)
    assert isinstance(crashed, ErrorInfo) and isinstance(plain, ErrorInfo) and isinstance(stage.error, ErrorInfo)
    assert (crashed.type, crashed.model, crashed.exit_code, crashed.log_path) == ("ServerCrashed", "gemma", -9,
                                                                                   "/logs/gemma.log")
    assert crashed.extra == {"command": ["llama-server", "-m", "gemma.gguf"]} and plain.hint is None
    assert stage.error.extra["details"]["synthesis_error"]["type"] == "ValueError"

    for name, data in stage_files(to_dict(stage)):  # the writer's own path: records -> files
        assert dumps(data) == (folder / name).read_text(encoding="utf-8"), name
    run = session.to_run()
    assert isinstance(run.error, ErrorInfo) and run.error.extra == {"reasons": {"a": "too big"}}
    meta = session_meta("session_001", run, created_at=10.0, writer={"pid": 1, "host": "elsewhere",
                                                                    "started_at": 10.0})
    assert dumps(meta) == (folder / "session.json").read_text(encoding="utf-8")
    assert json.loads(dumps(to_dict(run)))["stages"][0]["responses"][0]["error"] == CRASHED


def test_an_error_from_insufficient_memory_keeps_need_and_have_per_device() -> None:
    exc = InsufficientMemory("big", {"ram": 6 << 30, "gpu0": 3 << 30}, {"ram": 2 << 30, "gpu0": 4 << 30},
                             ["use a smaller n_ctx"])
    info = ErrorInfo.of(exc)
    assert info.need == {"ram": 6 << 30, "gpu0": 3 << 30} and info.have == {"ram": 2 << 30, "gpu0": 4 << 30}
    assert info.model == "big" and info.hint == "use a smaller n_ctx"
    assert json.dumps(info.to_dict()) == json.dumps(exc.to_dict())  # the dict chorus stored before, key for key
    assert info.text() == f"{exc.message} Hint: use a smaller n_ctx"

    body = error_body(info)["error"]  # the API's body, from the recorded error as from the live one
    assert body == error_body(exc)["error"] and status_of(info).http == 503
    assert (body["need"], body["have"]) == (info.need, info.have)


def test_a_recorded_error_reads_back_equal_and_a_damaged_one_is_a_record_error() -> None:
    record = ResponseRecord("a", "gemma", status="failed", error=ErrorInfo.of(ServerCrashed("gemma", "reset")))
    assert response_from_dict(to_dict(record)) == record
    assert ErrorInfo("Cancelled", "cancelled by the user").to_dict() == {"type": "Cancelled",
                                                                          "message": "cancelled by the user"}
    odd = {"type": "X", "message": "m", "line": "seven"}  # a field of another type (a newer chorus) stays as it was
    assert ErrorInfo.from_dict(odd).line is None and ErrorInfo.from_dict(odd).to_dict() == odd
    with pytest.raises(RecordError, match="'type' is null"):
        response_from_dict(_response("a", {"type": None, "message": "m"}))
