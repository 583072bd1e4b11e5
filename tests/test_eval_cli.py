"""`chorus eval` on the command line, QA bugs 4 (what the number scoring found is shown), 5 (an embedding
model as the judge), 9 (resume options it does not apply) and 14 (a missing --pipeline file's hint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.registry import Registry
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.fake import FakeBackend, Script
from orchestrator.eval.items import EvalItem
from orchestrator.eval.run import EvalError, EvalRunner, build_spec
from orchestrator.eval.store import EvalStore
from orchestrator.runtime import Runtime
from tests.clirun import run_main
from tests.conftest import ConfigDir


@pytest.fixture
def eval_runtime(config_dir: ConfigDir):
    models = config_dir.models()
    models["models"]["embed"] = {**models["models"]["gemma3-270m"], "role": "embedding"}
    config_dir.write_models(models)
    config = load_config(config_dir.path)
    rt = Runtime(config, Registry(config))
    yield rt
    rt.close()


def one_stage() -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "one", "stages": [
        {"name": "a", "models": ["gemma3-270m"], "prompt": "{{ question }}"}]})


def questions(tmp_path: Path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "What is 2+2?", "number": 4}\n')
    return path


def test_an_embedding_model_as_judge_is_refused_before_anything_runs(eval_runtime: Runtime, config_dir: ConfigDir,
                                                                      tmp_path: Path) -> None:
    """QA bug 5: `--judge <role: embedding>` ran the whole eval, then every verdict failed."""
    with pytest.raises(EvalError, match="role: embedding"):
        build_spec(eval_runtime, one_stage(), judge="embed")
    done = run_main("eval", questions(tmp_path), "--judge", "embed", "--config-dir", config_dir.path)
    assert done.returncode == 2, done.stderr
    assert "the judge model 'embed' cannot judge: an embedding model (role: embedding)" in " ".join(
        done.stderr.split())
    assert EvalStore(config_dir.sessions_dir).list() == []  # no eval was recorded
    nosuch = run_main("eval", questions(tmp_path), "--judge", "nosuch", "--config-dir", config_dir.path)
    assert nosuch.returncode == 2 and "'nosuch' is not available" in nosuch.stderr


def finished_eval(runtime: Runtime) -> str:
    runner = EvalRunner(runtime, backend=FakeBackend(default=Script("2 + 2 = 4 [1]")))
    eval_id = runner.start(build_spec(runtime, one_stage(), mode="manual"), [
        EvalItem(0, "a", "What is 2 + 2?", number=4.0), EvalItem(1, "b", "Say hi.")], source="test")
    runner.run(eval_id)
    return eval_id


@pytest.mark.parametrize(("options", "named"), [
    (["--judge", "smollm2-135m", "--pipeline", "p1.yaml", "--set", "a.bogus=1", "--limit", "1"],
     "--judge, --pipeline, --set, --limit cannot be changed"),
    (["--baselines", "none"], "--baselines cannot be changed"),
    (["--judge-max-tokens", "7"], "--judge-max-tokens cannot be changed"),
])
def test_resume_refuses_the_options_of_a_new_eval(eval_runtime: Runtime, config_dir: ConfigDir,
                                                  options: list[str], named: str) -> None:
    """QA bug 9: they were accepted (rc 0) and silently ignored."""
    eval_id = finished_eval(eval_runtime)
    done = run_main("eval", "resume", eval_id.removeprefix("eval_"), *options, "--config-dir", config_dir.path)
    assert done.returncode == 2, done.stderr
    assert f"resume continues {eval_id} as it was started: {named}" in " ".join(done.stderr.split())


def test_resume_honours_concurrency(eval_runtime: Runtime, config_dir: ConfigDir,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    eval_id = finished_eval(eval_runtime)
    seen: list[Any] = []
    run = EvalRunner.run

    def recording(self: EvalRunner, eval_id: str, **kwargs: Any) -> Any:
        seen.append(kwargs.get("concurrency"))
        return run(self, eval_id, **kwargs)

    monkeypatch.setattr(EvalRunner, "run", recording)
    done = run_main("eval", "resume", eval_id, "--concurrency", "3", "--json", "--config-dir", config_dir.path)
    assert done.returncode == 0, done.stderr
    assert seen == [3] and json.loads(done.stdout)["eval"]["status"] == "completed"


def test_a_resume_runs_as_many_at_once_as_it_is_told(eval_runtime: Runtime) -> None:
    backend = FakeBackend(default=Script("4", delay_s=0.2))
    runner = EvalRunner(eval_runtime, backend=backend)
    spec = build_spec(eval_runtime, one_stage(), mode="manual", baselines=False, concurrency=1)
    eval_id = runner.start(spec, [EvalItem(i, str(i), f"Say {i}.") for i in range(4)], source="test")
    at_once = most = 0
    arun = runner.runner.arun

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal at_once, most
        at_once += 1
        most = max(most, at_once)
        try:
            return await arun(*args, **kwargs)
        finally:
            at_once -= 1

    runner.runner.arun = counting  # type: ignore[method-assign]
    assert runner.run(eval_id, concurrency=4).eval["status"] == "completed"
    assert most == 4


def test_show_says_which_number_the_answer_was_read_as(eval_runtime: Runtime, config_dir: ConfigDir) -> None:
    """QA bug 4: `show --items` and `--json` show what the scoring found (here 4, not the citation's 1)."""
    eval_id = finished_eval(eval_runtime)
    shown = run_main("eval", "show", eval_id, "--json", "--config-dir", config_dir.path)
    systems = json.loads(shown.stdout)["items"][0]["systems"]
    assert systems["pipeline"]["found"] == "4" and systems["pipeline"]["correct"] is True
    assert json.loads(shown.stdout)["items"][1]["systems"]["pipeline"]["found"] is None  # no reference
    items = run_main("eval", "show", eval_id, "--items", "--config-dir", config_dir.path).stdout
    lines = items.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ITEM"))
    assert lines[start].split()[:5] == ["ITEM", "SYSTEM", "RUN", "REFERENCE", "FOUND"]
    assert lines[start + 2].split()[:5] == ["a", "pipeline", "completed", "ok", "4"]


def test_a_missing_pipeline_file_is_said_to_be_relative_to_the_current_directory(
        config_dir: ConfigDir, tmp_path: Path) -> None:
    """QA bug 14: the hint blamed the config folder (`point CHORUS_CONFIG_DIR / --config-dir at...`)."""
    done = run_main("eval", questions(tmp_path), "--pipeline", "nofile.yaml", "--config-dir", config_dir.path,
                    cwd=tmp_path)
    assert done.returncode == 2
    err = " ".join(done.stderr.split())
    assert f"nofile.yaml: the --pipeline file was not found (relative to the current directory, {tmp_path})" in err
    assert "CHORUS_CONFIG_DIR" not in err
    run = run_main("run", "--manual", "nofile.yaml", "hi", "--config-dir", config_dir.path, cwd=tmp_path)
    assert run.returncode == 2 and "(relative to the current directory" in run.stderr  # the same words as run's
