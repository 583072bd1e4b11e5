"""The CLI's words: shell-safe `models add` suggestions, judge failures in the eval report, Ctrl-C while
chorus imports, the `Hint:` label, what `init` says it wrote, `check`'s folders, `--config-dir FILE`,
`serve --slots` too many."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cli.main import format_error
from cli.models import add_command
from orchestrator.errors import ConfigError
from orchestrator.eval.items import EvalItem
from orchestrator.eval.report import build_report
from orchestrator.eval.store import EvalStore
from tests.clirun import run_main
from tests.conftest import REPO, SECOND_MODEL_NAME, ConfigDir

# ---------------------------------------------------------------- bug 7: shell-safe suggestions


@pytest.mark.parametrize("name", ["My Model (v2).gguf", "-dash.gguf", "it's.gguf", "plain.gguf"])
def test_the_add_command_survives_a_shell(name: str) -> None:
    command = add_command(name)
    argv = shlex.split(command)
    assert argv[:3] == ["chorus", "models", "add"] and len(argv) == 4
    assert argv[-1] == (f"./{name}" if name.startswith("-") else name)


def test_models_prints_a_quoted_suggestion_that_adds_the_file(config_dir: ConfigDir) -> None:
    source = config_dir.models_dir / SECOND_MODEL_NAME
    for name in ("My Model (v2).gguf", "-dash.gguf"):
        shutil.copy(source, config_dir.models_dir / name)
    out = run_main("models", "--config-dir", config_dir.path)
    assert out.returncode == 0, out.stderr
    suggested = [line.split("`")[1] for line in out.stdout.splitlines() if "`chorus models add" in line]
    assert "chorus models add 'My Model (v2).gguf'" in suggested and "chorus models add ./-dash.gguf" in suggested
    for command in suggested:  # each runs as printed, through a shell's word splitting
        argv = shlex.split(command)[1:]
        added = run_main(*argv, "--config-dir", config_dir.path)
        assert added.returncode == 0 and "added '" in added.stdout, added.stderr
    files = {m["file"] for m in config_dir.models()["models"].values()}
    assert {"My Model (v2).gguf", "-dash.gguf"} <= files


# ---------------------------------------------------------------- bug 8: judge failures in the text report


def test_the_text_report_says_the_judge_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.eval import print_items, print_report

    store = EvalStore(tmp_path)
    items = [EvalItem(0, "a", "What is 40 + 2?", number=42.0), EvalItem(1, "b", "Say hi.")]
    systems = [{"name": "pipeline", "kind": "pipeline"}, {"name": "m", "kind": "baseline"}]
    eval_id = store.create({"systems": systems, "judge": {"model": "smollm2-135m"}}, items, source="t",
                           pipeline="manual.yaml")
    for it in items:
        for s in systems:
            store.put_answer(eval_id, it.index, s["name"], session_id=None, status="completed", answer="42",
                             error=None, prompt_tokens=1, completion_tokens=1, wall_s=0.1)
    bad = {"error": {"type": "JudgeError", "message": "the judge gave no score 0-10 (said: 'Sure')"}}
    store.put_score(eval_id, 0, "pipeline", "judge", None, bad)
    store.put_score(eval_id, 0, "m", "judge", None, bad)
    store.put_score(eval_id, 1, "pipeline", "judge", 7.0, {"reason": "fine"})
    store.put_score(eval_id, 1, "m", "judge", 0.0, {"note": "no answer (run failed): scored 0 without the judge"})
    store.put_pair(eval_id, 0, "m", points=0.5, outcome="error", consistent=None, detail=bad)
    store.set_status(eval_id, "completed")
    report = build_report(store, eval_id)
    assert (report.judge.asked, report.judge.failed) == (4, 3)
    assert report.to_dict()["judge"]["first_error"] == "the judge gave no score 0-10 (said: 'Sure')"
    out = io.StringIO()
    print_report(report, out)
    text = out.getvalue()
    assert "judge: 3 of 4 verdict(s) failed: the judge gave no score 0-10 (said: 'Sure')" in text
    assert "(1 failed)" in text
    items_out = io.StringIO()
    print_items(report, items_out)
    assert "failed" in items_out.getvalue()


# ---------------------------------------------------------------- bug 10: Ctrl-C while importing


@pytest.mark.parametrize("module", ["cli.commands", "orchestrator.logs"])
def test_ctrl_c_while_chorus_imports_exits_130_without_a_traceback(module: str, tmp_path: Path) -> None:
    """SIGINT arrives while `module` is being imported: before main() runs (cli.commands, imported by
    cli.main itself) or inside it (orchestrator.logs)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    os.kill(os.getpid(), signal.SIGINT)
                return None
        sys.meta_path.insert(0, Interrupt())
        from cli.main import main
        sys.exit(main(["check", "--config-dir", {str(tmp_path)!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.strip() == "chorus: interrupted"


def test_after_the_imports_ctrl_c_is_a_keyboard_interrupt_again() -> None:
    import signal

    import cli.main  # imported above already: its handler is put back once the imports are done

    assert signal.getsignal(signal.SIGINT) is not cli.main._interrupted_while_importing


# ---------------------------------------------------------------- bug 11: the Hint: label


def test_an_error_line_labels_its_hint() -> None:
    exc = ConfigError("config/models.yaml", "Extra inputs are not permitted", line=5, field="models.x.n_gpu_layer",
                      hint="Remove the key or check its spelling; unknown keys are rejected.")
    text = " ".join(format_error(exc).split())
    assert text.endswith("Extra inputs are not permitted Hint: Remove the key or check its spelling; unknown keys "
                         "are rejected.")
    assert "Hint: Hint:" not in " ".join(format_error(ConfigError("f", "m", hint="Hint: x")).split())


def test_a_config_error_on_the_command_line_shows_hint(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    next(iter(models["models"].values()))["n_gpu_layer"] = 3
    config_dir.write_models(models)
    out = run_main("check", "--config-dir", config_dir.path)
    assert out.returncode == 2 and "Hint: " in out.stderr and "Extra inputs are not permitted" in out.stderr


# ---------------------------------------------------------------- bug 12: init names what it wrote


def test_init_names_every_entry_it_wrote(tmp_path: Path) -> None:
    out = run_main("init", tmp_path / "cfg")
    assert out.returncode == 0, out.stderr
    names = list(yaml.safe_load((tmp_path / "cfg" / "models.yaml").read_text())["models"])
    assert len(names) == 2 and "its one entry" not in out.stdout
    assert f"its 2 entries are the demo models, {names[0]} and {names[1]}" in out.stdout


# ---------------------------------------------------------------- bug 13: check, --config-dir FILE, serve --slots


def test_check_prints_every_folder_in_use(config_dir: ConfigDir) -> None:
    out = run_main("check", "--config-dir", config_dir.path)
    assert out.returncode == 0, out.stderr
    assert f"sessions:   {config_dir.sessions_dir}" in out.stdout
    assert f"logs:       {config_dir.path.parent / 'logs'}" in out.stdout
    as_json = run_main("check", "--json", "--config-dir", config_dir.path)
    assert f'"sessions_dir": "{config_dir.sessions_dir}"' in as_json.stdout and '"logs_dir"' in as_json.stdout


def test_config_dir_naming_a_file_says_so(config_dir: ConfigDir) -> None:
    out = run_main("check", "--config-dir", config_dir.path / "app.yaml")
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and "is a file, not a folder" in text
    assert "not found" not in text and f"(perhaps {config_dir.path})" in text


def test_serve_with_too_many_slots_says_how_many_fit(config_dir: ConfigDir) -> None:
    """Each slot holds its own n_ctx of KV cache: the hint led with "use a smaller quantization"."""
    out = run_main("serve", "gemma3-270m", "--slots", "100000", "--n-ctx", "4096", "--config-dir", config_dir.path)
    text = " ".join(out.stderr.split())
    assert out.returncode == 2, text
    hint = text.split("Hint:", 1)[1]
    assert re.match(r" use \d+ slots? or fewer", hint), hint
    assert "quantization" not in hint.split(";")[0]
