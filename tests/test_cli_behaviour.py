"""The CLI as a new user meets it: global options in either place, the answer streamed to stdout, a live
progress display on stderr, `run -`, `| head`, and check/plan that name what is missing.

The display is tested on the fake backend (milliseconds) and by feeding it events with a fake clock;
tests/test_cli_run.py runs it in a pseudo-terminal against the real llama-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import subprocess
import sys

import pytest

from cli.main import OneLineFormatter, build_parser, setup_stderr_logging
from cli.progress import AnswerStream, ProgressPrinter, answer_call
from cli.run import emit_outcome, read_question
from orchestrator.config.registry import Registry
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.events import Event, ModelFinished, ModelStarted, RunFinished, StageStarted, Token
from orchestrator.engine.fake import FakeBackend
from orchestrator.engine.run import Engine
from orchestrator.plan.resolve import Machine, RunPlan, build_plan
from orchestrator.records import ResponseRecord, RunRecord
from orchestrator.runs import RunOutcome
from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir


def chorus(*args: str) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS`, its main() in this process (tests/clirun.py); `| head` below runs a real process."""
    return run_main(*args)


@pytest.fixture
def registry(config_dir: ConfigDir) -> Registry:
    """The demo model, and the same file under a second name (so the fake backend can script each)."""
    models = config_dir.models()
    models["models"]["second"] = {**models["models"]["gemma3-270m"]}
    config_dir.write_models(models)
    return Registry(load_config(config_dir.path))


def plan_of(registry: Registry, stages: list[dict]) -> RunPlan:
    pipeline = PipelineSpec.model_validate({"name": "t", "stages": stages})
    return build_plan(pipeline, registry, Machine(), mode="manual")


SYNTHESIS_RUN = [
    {"name": "draft", "models": ["gemma3-270m"]},
    {"name": "review", "models": ["gemma3-270m", {"model": "gemma3-270m", "label": "two"}],
     "aggregation": {"type": "synthesis", "synthesis_model": "second"}},
]


class Recording(io.StringIO):
    """A stream that also notes, in a shared log, when each write happened relative to the events."""

    def __init__(self, log: list[str], tty: bool = False) -> None:
        super().__init__()
        self.log = log
        self.tty = tty

    def write(self, text: str) -> int:
        self.log.append(f"out:{text}")
        return super().write(text)

    def isatty(self) -> bool:
        return self.tty


def run_with(printer: ProgressPrinter, plan: RunPlan, backend: FakeBackend,
             log: list[str] | None = None) -> RunRecord:
    def note(event: Event) -> None:
        if log is not None:
            log.append(f"event:{event.type}")

    engine = Engine(backend, observers=[printer, note], allow_sequential=True)
    return asyncio.run(engine.run(plan, "q"))


# ---------------------------------------------------------------- global options


@pytest.mark.parametrize("argv", [
    ["--config-dir", "X", "check"], ["check", "--config-dir", "X"],
    ["--config-dir", "X", "history", "list"], ["history", "list", "--config-dir", "X"],
    ["--config-dir", "X", "models", "add", "f.gguf"], ["--config-dir", "X", "stop", "--all"],
])
def test_config_dir_is_kept_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert str(build_parser().parse_args(argv).config_dir) == "X"


@pytest.mark.parametrize("argv", [["-v", "run", "q"], ["run", "q", "-v"], ["-v", "history", "rerun", "1",
                                                                           "--stage", "2"]])
def test_verbose_is_kept_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args([a for a in argv if a != "-v"]).verbose is False


def test_check_uses_the_config_dir_given_before_the_subcommand(config_dir: ConfigDir) -> None:
    """The bug: `chorus --config-dir X check` silently used ./config."""
    out = chorus("--config-dir", str(config_dir.path), "check", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["config_dir"] == str(config_dir.path.resolve())


# ---------------------------------------------------------------- logging on stderr


@pytest.fixture
def clean_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("chorus").level)
    root.handlers.clear()
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("chorus").setLevel(saved[2])


def test_verbose_shows_chorus_debug_lines_but_not_the_http_libraries(clean_logging, capsys) -> None:
    setup_stderr_logging(verbose=True)
    logging.getLogger("chorus.pool").debug("pool detail")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")
    err = capsys.readouterr().err
    assert "chorus: DEBUG: pool detail" in err
    assert "connect_tcp" not in err and "selector" not in err


def test_default_level_shows_no_debug_or_info_lines(clean_logging, capsys) -> None:
    setup_stderr_logging(verbose=False)
    logging.getLogger("chorus.pool").info("starting llama-server")
    logging.getLogger("chorus.memory").debug("no per-process VRAM from NVML")
    logging.getLogger("chorus.runtime").warning("running on the CPU")
    assert capsys.readouterr().err == "chorus: WARNING: running on the CPU\n"


def test_a_debug_traceback_is_one_line_on_stderr() -> None:
    """NVML missing was a multi-line traceback under -v: now its exception's text on the same line."""
    try:
        raise OSError("NVML Shared Library Not Found")
    except OSError:
        record = logging.getLogger("chorus.memory").makeRecord(
            "chorus.memory", logging.DEBUG, __file__, 1, "no per-process VRAM from NVML", None, sys.exc_info())
    text = OneLineFormatter("chorus: %(levelname)s: %(message)s").format(record)
    assert text == "chorus: DEBUG: no per-process VRAM from NVML (OSError: NVML Shared Library Not Found)"


# ---------------------------------------------------------------- the answer on stdout


def test_the_synthesis_answer_streams_to_stdout_while_it_is_generated(registry: Registry) -> None:
    log: list[str] = []
    out, err = Recording(log), io.StringIO()
    backend = FakeBackend().script("gemma3-270m", "draft words here").script("second", "the final answer")
    printer = ProgressPrinter(err, answer_out=out, live=False)
    run = run_with(printer, plan_of(registry, SYNTHESIS_RUN), backend, log)
    assert run.status == "completed" and run.final == "the final answer"
    assert out.getvalue() == "the final answer\n"  # only the answer: no draft, no reviewer text
    first_piece = log.index("out:the")
    assert first_piece < log.index("event:model_finished", first_piece) < log.index("event:run_finished")
    assert printer.answer_shown(run.final)
    assert "draft words" not in err.getvalue() and "final answer" not in err.getvalue()


def test_a_streamed_answer_is_not_printed_again(registry: Registry, capsys) -> None:
    backend = FakeBackend().script("gemma3-270m", "draft").script("second", "  the final answer  ")
    printer = ProgressPrinter(io.StringIO(), answer_out=sys.stdout, live=False)
    run = run_with(printer, plan_of(registry, SYNTHESIS_RUN), backend)
    assert emit_outcome(RunOutcome(run, None, None), False, printer) == 0
    captured = capsys.readouterr()
    assert captured.out == "the final answer\n" and "status: completed" in captured.err


def test_a_stage_merged_from_several_answers_prints_the_merged_text_at_the_end(registry: Registry,
                                                                              capsys) -> None:
    stages = [{"name": "both", "models": ["gemma3-270m", "second"], "aggregation": {"type": "concat"}}]
    plan = plan_of(registry, stages)
    assert answer_call(plan) is None
    backend = FakeBackend().script("gemma3-270m", "one").script("second", "two")
    printer = ProgressPrinter(io.StringIO(), answer_out=sys.stdout, live=False)
    run = run_with(printer, plan, backend)
    assert capsys.readouterr().out == ""  # nothing while it ran: the merge is not one model's tokens
    emit_outcome(RunOutcome(run, None, None), False, printer)
    shown = capsys.readouterr().out
    assert "one" in shown and "two" in shown and shown.strip() == run.final.strip()


def test_a_single_call_last_stage_streams_its_tokens(registry: Registry) -> None:
    plan = plan_of(registry, [{"name": "only", "models": ["gemma3-270m"]}])
    assert answer_call(plan) == ("only", "gemma3-270m")
    out = io.StringIO()
    run = run_with(ProgressPrinter(io.StringIO(), answer_out=out, live=False), plan,
                   FakeBackend().script("gemma3-270m", "Paris is the capital"))
    assert out.getvalue() == "Paris is the capital\n" == run.final + "\n"


def test_json_mode_streams_nothing_to_stdout(registry: Registry) -> None:
    from cli.run import terminal_printer

    printer = terminal_printer(as_json=True)
    assert printer.answer is None
    run_with(printer, plan_of(registry, SYNTHESIS_RUN), FakeBackend())
    assert printer.streamed == "" and not printer.answer_shown("ok")


def test_an_answer_whose_reader_left_stops_quietly_and_main_ends_with_141() -> None:
    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    stream = AnswerStream(Gone())
    stream.write("Paris ")
    stream.write("is")  # no exception reaches the engine (it would log one warning per token)
    assert stream.broken_pipe
    printer = ProgressPrinter(io.StringIO(), answer_out=Gone(), live=False)
    printer.answer.broken_pipe = True  # type: ignore[union-attr]
    with pytest.raises(BrokenPipeError):
        emit_outcome(RunOutcome(RunRecord(question="q", mode="manual", pipeline={}), None, None), False, printer)


def test_piping_into_a_reader_that_left_ends_quietly(config_dir: ConfigDir) -> None:
    """`chorus models | head -0`: the reader is gone before chorus writes; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "models", "--config-dir",
                             str(config_dir.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` that has read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_run_dash_reads_the_question_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Why is the sky blue?\nIn one line.\n"))
    assert read_question("-") == "Why is the sky blue?\nIn one line."
    assert read_question("plain") == "plain"


def test_run_dash_with_empty_stdin_is_a_clear_error_before_anything_runs(config_dir: ConfigDir) -> None:
    out = run_main("run", "-", "--config-dir", str(config_dir.path), input="  \n")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "question" in out.stderr.lower()
    assert not config_dir.sessions_dir.exists() or not any(config_dir.sessions_dir.iterdir())


# ---------------------------------------------------------------- the progress display


def started(stage: str, label: str) -> ModelStarted:
    return ModelStarted(stage, label, "gemma3-270m")


def finished(stage: str, label: str, tokens: int) -> ModelFinished:
    return ModelFinished(stage, ResponseRecord(label=label, model="gemma3-270m", status="ok", text="x",
                                               completion_tokens=tokens, total_s=4.0, tokens_per_s=tokens / 4))


def test_live_display_redraws_each_running_model_in_place() -> None:
    now = [100.0]
    err = Recording([], tty=True)
    printer = ProgressPrinter(err, live=True, refresh_s=0.5, clock=lambda: now[0], tick=False)
    printer(StageStarted(3, "review", ["facts", "skeptic"]))
    printer(started("review", "facts"))
    printer(started("review", "skeptic"))
    now[0] += 1.0
    printer(Token("review", "facts", "The"))  # first token at t+1
    for _ in range(20):
        printer(Token("review", "facts", " sky"))
    now[0] += 1.0  # t+2: 21 tokens in 1 s of generating
    printer(Token("review", "skeptic", "No"))
    screen = err.getvalue()
    assert "The" not in screen and " sky" not in screen  # counts, not interleaved tokens
    assert "\x1b[2F\x1b[J" in screen  # the two-line live area moved up over and redrawn
    last = screen.rsplit("\x1b[2F\x1b[J", 1)[1].splitlines()
    assert last[0].split() == ["facts", "(gemma3-270m):", "21", "tokens", "21.0", "tok/s", "2.0s"]
    assert last[1].split()[:3] == ["skeptic", "(gemma3-270m):", "1"]
    printer(finished("review", "facts", 22))
    after = err.getvalue()[len(screen):]
    assert after.startswith("\x1b[2F\x1b[J  facts: 22 tokens in 4.0s, 5.5 tok/s\n")  # scrolls above the area
    assert after.endswith("\x1b[J  skeptic (gemma3-270m):     1 tokens     0.0 tok/s    2.0s\n")
    printer.close()
    assert err.getvalue().endswith("\x1b[1F\x1b[J")  # the terminal is left clean


def test_waiting_for_the_first_token_shows_the_elapsed_time() -> None:
    now = [0.0]
    err = Recording([], tty=True)
    printer = ProgressPrinter(err, live=True, clock=lambda: now[0], tick=False)
    printer(started("s", "a"))
    now[0] = 7.5
    printer(StageStarted(2, "t", ["b"]))  # any redraw
    assert "a (gemma3-270m): waiting for the first token    7.5s" in err.getvalue()


def test_the_ticker_keeps_elapsed_time_moving_without_tokens() -> None:
    import time

    err = Recording([], tty=True)
    printer = ProgressPrinter(err, live=True, refresh_s=0.05)
    printer(started("s", "a"))
    time.sleep(0.4)
    printer(RunFinished(RunRecord(question="q", mode="manual", pipeline={})))
    assert err.getvalue().count("waiting for the first token") >= 3
    ticker = printer._ticker
    assert ticker is not None
    ticker.join(timeout=2)
    assert not ticker.is_alive()  # the run's end stops the redraws
    assert err.getvalue().endswith("\x1b[1F\x1b[J")  # and leaves the terminal clean


def test_progress_to_a_file_is_plain_lines(registry: Registry) -> None:
    err = io.StringIO()
    run = run_with(ProgressPrinter(err, answer_out=io.StringIO()), plan_of(registry, SYNTHESIS_RUN),
                   FakeBackend().script("gemma3-270m", "draft words").script("second", "final"))
    assert run.status == "completed"
    text = err.getvalue()
    assert "\x1b" not in text and "\r" not in text and "draft words" not in text and "final" not in text
    lines = text.splitlines()
    assert lines[0] == "[1/2] draft: gemma3-270m" and lines[1].startswith("  gemma3-270m: 2 tokens in ")
    assert lines[2] == "[2/2] review: gemma3-270m-1, two"
    assert sorted(line.split(":")[0] for line in lines[3:5]) == ["  gemma3-270m-1", "  two"]
    assert lines[5].startswith("  second-synthesis: 1 tokens in ") and lines[6] == "  merged by synthesis"
    assert len(lines) == 7  # one line per step: no "waiting" lines, no tokens


# ---------------------------------------------------------------- check and plan


def test_check_says_base_mode_is_unavailable_without_llama_server(config_dir: ConfigDir) -> None:
    config_dir.write_app(llama_server=str(config_dir.path / "no-such-llama-server"))
    out = chorus("check", "--config-dir", str(config_dir.path))
    assert out.returncode == 0, out.stderr
    assert "base mode is unavailable" in out.stdout and "llama-server: not found" in out.stdout
    data = json.loads(chorus("check", "--json", "--config-dir", str(config_dir.path)).stdout)
    assert data["base_pipeline"]["available"] is False and "llama-server" in data["base_pipeline"]["missing"]


def test_plan_says_missing_for_a_missing_model_not_does_not_fit(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["ghost"] = {"file": "ghost.gguf"}
    config_dir.write_models(models)
    pipeline = config_dir.pipeline()
    pipeline["stages"][-1]["aggregation"]["synthesis_model"] = "ghost"
    config_dir.write_pipeline(pipeline)
    out = chorus("plan", "--config-dir", str(config_dir.path))
    assert "does NOT fit" not in out.stdout and "does not fit" not in out.stdout
    assert "missing: file not found" in out.stdout and "ghost" in out.stdout
    assert "blocked" in out.stdout
    assert out.returncode == 1  # base mode cannot run it
    data = json.loads(chorus("plan", "--json", "--config-dir", str(config_dir.path)).stdout)
    assert data["fits"] is True and data["blocked"] is not None  # missing is not "too big"


# ---------------------------------------------------------------- a retrieve stage; tables on a redirected stdout

RETRIEVE_RUN = [{"name": "sources", "kind": "retrieve", "collection": "kb", "top_k": 3},
                {"name": "answer", "models": ["gemma3-270m"]}]


def test_progress_names_the_collection_a_retrieve_stage_reads(registry: Registry, tmp_path) -> None:
    from orchestrator.rag.store import DocStore

    (tmp_path / "guide.md").write_text("# Install\n\nThe daemon listens on port 8125.\n")
    DocStore.beside(registry.config.sessions_dir).add("kb", [tmp_path / "guide.md"])
    err = io.StringIO()
    run = run_with(ProgressPrinter(err, live=False), plan_of(registry, RETRIEVE_RUN),
                   FakeBackend().script("gemma3-270m", "8125 [1]"))
    assert run.status == "completed", run.error
    lines = err.getvalue().splitlines()
    assert lines[0] == "[1/2] sources: retrieve from kb (top_k 3)"
    assert lines[1] == "[2/2] answer: gemma3-270m"


def test_plan_prints_what_a_retrieve_stage_reads_instead_of_an_empty_model_table(config_dir: ConfigDir) -> None:
    path = config_dir.path / "rag.yaml"
    path.write_text(json.dumps({"name": "rag", "stages": RETRIEVE_RUN}))
    out = chorus("plan", "--pipeline", str(path), "--config-dir", str(config_dir.path))
    assert out.returncode == 0, out.stderr
    block = out.stdout.split("stage 'sources'")[1].split("stage 'answer'")[0]
    assert block.strip() == ": retrieve from kb (top_k 3)"  # no MODEL header, no table
    assert "MODEL" in out.stdout.split("stage 'answer'")[1]


def test_print_table_writes_to_stdout_as_it_is_when_called(capsys) -> None:
    from cli.output import print_table

    print_table([("a", 1), ("bb", None)], ["NAME", "N"])
    assert capsys.readouterr().out.splitlines() == ["NAME  N", "----  -", "a     1", "bb    -"]
    redirected = io.StringIO()
    with contextlib.redirect_stdout(redirected):
        print_table([("x", 2)], ["K", "V"])
    assert redirected.getvalue() == "K  V\n-  -\nx  2\n"
