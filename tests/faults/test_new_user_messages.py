"""Issue 24 item 11: messages a new user tripped on, each said once and in the user's terms.

A refused connection said "no answer" once with the reason (not "no answer (no answer ([Errno 111] …))");
a missing model's MODE is what its config says or "-", not a guessed "chat"; `models add` of a file already
registered says as what and adds nothing; typos in `--set` and in options get "did you mean"; a missing
`--manual` file is missing where the user pointed, not in a config folder; the README's custom aggregator
is where and what the code loads; the run's progress lines and its end agree on what their times count.
(The API stream's single `run_started` is in tests/test_api.py, beside the other stream tests.)
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
from pathlib import Path

import pytest

from cli.main import main
from cli.progress import ProgressPrinter
from cli.run import emit_outcome
from launcher.errors import ServerCrashed, ServerUnreachable
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from launcher.process.rpc import RpcError
from launcher.process.server import ServerSpec
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.registry import Registry
from orchestrator.config.schema import AggregationSpec, PipelineSpec, load_config
from orchestrator.engine.aggregation import Candidate, aggregate
from orchestrator.engine.events import ModelFinished, ModelStarted, Token
from orchestrator.errors import ConfigError
from orchestrator.plan.memory import check_rpc_workers
from orchestrator.records import ResponseRecord, RunRecord
from orchestrator.runs import RunOutcome
from tests import yamlfile
from tests.conftest import DEMO_MODEL_NAME, REPO, ConfigDir


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_paragraph(text: str) -> str:
    """CLI errors are wrapped at 100 columns: compare them as one line."""
    return " ".join(text.split())


@pytest.fixture
def bare_config(tmp_path: Path) -> ConfigDir:
    """The shipped config over an empty models dir (no demo model needed)."""
    models = tmp_path / "models"
    models.mkdir()
    return ConfigDir(tmp_path, models)


# ---------------------------------------------------------------- a refused connection, said once


def test_a_refused_remote_model_says_no_answer_once_with_the_reason_and_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"

    async def ask() -> None:
        async with GenerationClient(timeout_s=5) as client:
            await client.generate(Endpoint("far", url, "chat", None, remote=True), GenerationRequest(prompt="hi"))

    with pytest.raises(ServerUnreachable) as caught:
        asyncio.run(ask())
    message = str(caught.value)
    assert caught.value.message == f"model 'far': no answer: connection refused at {url}/chat/completions"
    assert message.count("no answer") == 1 and "Errno" not in message and "lost" not in message
    assert f"Is the server at {url} running" in message  # a remote server is not restarted by chorus
    assert isinstance(caught.value, ServerCrashed)  # still a dead endpoint: replicas are marked down, servers replaced


def test_a_refused_rpc_worker_is_named_once_with_the_reason(demo_model: Path) -> None:
    worker = f"127.0.0.1:{closed_port()}"
    spec = ServerSpec("split", demo_model, n_ctx=512, n_gpu_layers=99, rpc=(worker,))
    with pytest.raises(RpcError) as caught:
        check_rpc_workers(spec)
    message = caught.value.message
    assert message.count("no answer") == 1, message  # was "no answer (no answer ([Errno 111] Connection refused))"
    assert "connection refused" in message and "Errno" not in message and worker in message


def test_chorus_run_on_a_refused_remote_model_shows_one_no_answer_per_line(
        bare_config: ConfigDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    bare_config.write_models({"models": {"far": {"url": url}}})
    spec = tmp_path / "far.yaml"
    spec.write_text(yamlfile.dump({"stages": [{"name": "ask", "models": ["far"]}]}))
    code = main(["run", "Why?", "--manual", str(spec), "--config-dir", str(bare_config.path)])
    err = capsys.readouterr().err
    assert code == 1
    failed = [line for line in err.splitlines() if "no answer" in line]
    assert failed and all(line.count("no answer") == 1 for line in failed), err
    assert f"no answer: connection refused at {url}/chat/completions" in err and "Errno" not in err


# ---------------------------------------------------------------- MODE of a model that is not there


def test_a_missing_model_shows_the_mode_its_config_says_or_none(bare_config: ConfigDir,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bare_config.write_models({"models": {
        "plain": {"file": "gone.gguf"},                         # nothing says: not a guessed "chat"
        "base": {"file": "gone-base.gguf", "mode": "completion"},
        "templated": {"file": "gone-chat.gguf", "chat_template": "chatml"},
    }})
    records = Registry(load_config(bare_config.path)).records
    assert {n: (r.status, r.known_mode) for n, r in records.items()} == {
        "plain": ("missing", None), "base": ("missing", "completion"), "templated": ("missing", "chat")}
    assert main(["models", "--json", "--config-dir", str(bare_config.path)]) == 0
    listed = {m["name"]: m["mode"] for m in yamlfile.load(capsys.readouterr().out) if m["name"]}
    assert listed == {"plain": None, "base": "completion", "templated": "chat"}
    assert main(["models", "--config-dir", str(bare_config.path)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    # NAME FILE SIZE ARCH PARAMS QUANT MAX-CTX MODE STATUS ...: the unknown header's cells are "-"
    assert rows["plain"][7:9] == ["-", "missing"] and rows["base"][7:9] == ["completion", "missing"]


# ---------------------------------------------------------------- models add of a registered file


def test_models_add_of_a_registered_file_adds_nothing_and_says_as_what(config_dir: ConfigDir,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = (config_dir.path / "models.yaml").read_text()
    target = (config_dir.models_dir / DEMO_MODEL_NAME).resolve()  # the demo file or its synthetic stand-in
    for given in (DEMO_MODEL_NAME, str(target)):  # by name, and by the link's target
        assert main(["models", "add", given, "--config-dir", str(config_dir.path)]) == 0
        out = capsys.readouterr().out
        assert "already registered as 'gemma3-270m'" in out and "nothing was added" in out
        assert (config_dir.path / "models.yaml").read_text() == before


def test_models_add_with_a_name_adds_a_second_entry_and_says_the_first(config_dir: ConfigDir,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "add", DEMO_MODEL_NAME, "--name", "gemma-long", "--config-dir",
                 str(config_dir.path)]) == 0
    assert "also registered as 'gemma3-270m'" in capsys.readouterr().out
    assert {"gemma3-270m", "gemma-long"} <= set(load_config(config_dir.path).models)


# ---------------------------------------------------------------- typos: --set and options


def base_pipeline() -> PipelineSpec:
    from orchestrator.config.schema import load_pipeline

    return load_pipeline(REPO / "config" / "pipeline.yaml")


@pytest.mark.parametrize(("assignment", "field", "meant"), [
    ("reveiw.temperature=0.2", "reveiw", "review"),
    ("defaults.max_token=5", "defaults.max_token", "max_tokens"),
    ("review.max_token=5", "review.max_token", "max_tokens"),
    ("review.reviewer-facts.repeat_penaltyy=1.3", "review.reviewer-facts.repeat_penaltyy", "repeat_penalty"),
    ("review.aggregation.tpye=concat", "review.aggregation.tpye", "type"),
])
def test_a_typo_in_set_names_the_setting_it_is_closest_to(assignment: str, field: str, meant: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(base_pipeline(), [assignment])
    assert caught.value.field == field
    assert caught.value.hint is not None and caught.value.hint.startswith(f"Did you mean '{meant}'?")


def test_set_without_a_close_name_lists_what_there_is_and_correct_keys_still_apply() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(base_pipeline(), ["review.zzz=1"])
    assert caught.value.hint is not None and "max_tokens" in caught.value.hint
    with pytest.raises(ConfigError) as caught:  # STAGE.X.PARAM: X may be a model call's label too
        apply_overrides(base_pipeline(), ["review.facts.top_k=3"])
    assert caught.value.hint is not None and "by label: reviewer-facts" in caught.value.hint
    spec = apply_overrides(base_pipeline(), ["defaults.max_tokens=5", 'defaults.logit_bias={"15043": -100}',
                                             "review.reviewer-facts.repeat_penalty=1.3",
                                             "review.aggregation.type=concat"])
    review = next(s for s in spec.stages if s.name == "review")
    assert spec.defaults.max_tokens == 5 and spec.defaults.logit_bias == {"15043": -100}
    assert review.models[0].repeat_penalty == 1.3 and review.aggregation.type == "concat"


@pytest.mark.parametrize(("argv", "meant"), [
    (["run", "q", "--maunal", "x.yaml"], "--manual"),
    (["run", "q", "--maunal=x.yaml"], "--manual"),
    (["models", "--jsno"], "--json"),
    (["rn", "q"], "'run'"),
    (["history", "shw", "3"], "'show'"),
])
def test_a_mistyped_option_or_command_gets_did_you_mean(argv: list[str], meant: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert f"(did you mean {meant}?)" in capsys.readouterr().err


# ---------------------------------------------------------------- a missing --manual file


def test_a_missing_manual_file_is_missing_where_the_user_pointed(bare_config: ConfigDir, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "q", "--manual", "nothere.yaml", "--config-dir", str(bare_config.path)]) == 2
    err = one_paragraph(capsys.readouterr().err)
    assert f"nothere.yaml: the --manual file was not found (relative to the current directory, {tmp_path})" in err
    assert "CHORUS_CONFIG_DIR" not in err and "--config-dir" not in err and "config" not in err.lower()
    assert not bare_config.sessions_dir.exists()  # refused before a session was made


# ---------------------------------------------------------------- the README's custom aggregator


def test_the_readme_custom_aggregator_runs_as_written_from_the_aggregators_folder(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `custom` |"))
    assert "<config dir>/aggregators/votes.py" in row and '{"label", "model", "text"}' in row
    assert "<config dir>/module.py" not in readme
    example = re.search(r"`<config dir>/aggregators/(\w+)\.py`, used as `aggregation: \{type: custom, "
                        r"function: (\w+:\w+)\}`:\n\n```python\n(.*?)```", readme, re.S)
    assert example is not None
    module, function, code = example.groups()
    (tmp_path / "aggregators").mkdir()
    (tmp_path / "aggregators" / f"{module}.py").write_text(code)
    answers = [Candidate("a", "m1", "short"), Candidate("b", "m2", "the longest answer")]
    record = asyncio.run(aggregate(AggregationSpec(type="custom", function=function), "q", answers,
                                   config_dir=tmp_path))
    assert record.output == "the longest answer"
    assert record.details["function_details"] == {"picked": "b"}


# ---------------------------------------------------------------- what the run's times count


def test_a_finished_model_line_counts_from_the_same_start_as_its_live_line() -> None:
    now = [0.0]
    err = io.StringIO()
    printer = ProgressPrinter(err, live=True, clock=lambda: now[0], tick=False)
    printer(ModelStarted("draft", "a", "m"))
    now[0] = 30.0  # the server took 30 s to load: the first token comes then
    printer(Token("draft", "a", "x"))
    now[0] = 34.0
    printer(Token("draft", "a", "y"))  # the live line, drawn now, says 34.0s
    live = err.getvalue().rsplit("\x1b[J", 1)[1]
    assert live.split()[-1] == "34.0s"
    printer(ModelFinished("draft", ResponseRecord(label="a", model="m", status="ok", completion_tokens=2,
                                                  total_s=4.0, first_token_s=0.5, tokens_per_s=0.6)))
    done = next(line for line in err.getvalue().splitlines() if "tokens in" in line)
    assert done.endswith("  a: 2 tokens in 34.0s, 0.6 tok/s (30.0s of it waiting for its server)")
    printer.close()


def test_the_run_ends_with_its_whole_time_labelled(capsys: pytest.CaptureFixture[str]) -> None:
    run = RunRecord(question="q", mode="manual", pipeline={}, status="completed", final="answer")
    run.started_at, run.finished_at = 100.0, 141.25
    assert emit_outcome(RunOutcome(run, None, None), as_json=False) == 0
    err = capsys.readouterr().err
    assert "status: completed\n" in err
    assert "time: 41.2s for the whole run, server starts included" in err
