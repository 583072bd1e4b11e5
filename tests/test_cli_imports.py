"""What the command line imports: building the parser (`chorus --help`, an argument error) loads no engine,
and a command loads its own module only when it runs, so that `chorus api` and `chorus ui`, which only
supervise a child process that imports everything itself, do not pay for orchestrator.app.

Each check runs in a fresh interpreter: this process has imported everything long ago."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, ConfigDir

HEAVY = {"orchestrator.app", "orchestrator.config.schema", "pydantic", "jinja2", "httpx"}
COMMAND_MODULES = {"cli.servers", "cli.run", "cli.eval", "cli.docs", "cli.models", "cli.init", "cli.stop",
                   "cli.worker"}

# main() with a child that exits at once in place of uvicorn or streamlit; then what was imported, as JSON
_SUPERVISE = """
import json, subprocess, sys
real_popen = subprocess.Popen
subprocess.Popen = lambda command, **kw: real_popen([sys.executable, "-c", "pass"], **kw)
from cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

# the parser built, then help and argument errors (main() exits 0 or 2 before any command runs)
_PARSE = """
import contextlib, io, json, sys
from cli.main import build_parser, main
build_parser()
errors = io.StringIO()
for argv in (["--help"], ["serve", "--help"], ["run", "q", "--maunal", "p.yaml"], ["rn"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors), \\
            contextlib.suppress(SystemExit):
        main(argv)
print(json.dumps({"errors": errors.getvalue(), "modules": sorted(sys.modules)}))
"""


def fresh_interpreter(script: str, *args: str) -> dict:
    """The JSON object the script prints last, run by a new interpreter in the repository."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_help_and_argument_errors_import_no_engine_and_no_command() -> None:
    result = fresh_interpreter(_PARSE)
    assert "(did you mean --manual?)" in result["errors"] and "(did you mean 'run'?)" in result["errors"]
    modules = set(result["modules"])
    assert HEAVY & modules == set()
    assert COMMAND_MODULES & modules == set()


@pytest.mark.parametrize("command", ["api", "ui"])
def test_the_api_and_ui_supervisors_start_their_child_without_orchestrator_app(
        command: str, config_dir: ConfigDir) -> None:
    result = fresh_interpreter(_SUPERVISE, command, "--port", "1", "--config-dir", str(config_dir.path))
    modules = set(result["modules"])
    assert result["code"] == 0  # the child's exit status: it was started
    assert "orchestrator.app" not in modules
    assert f"cli.{command}" in modules and COMMAND_MODULES & modules == set()  # its own module, no other's


def test_every_command_names_a_function_that_exists() -> None:
    """A command is named by module and function until it runs: a misspelt name fails here, not on first use."""
    from cli.commands import Lazy
    from cli.main import build_parser

    def commands(parser: argparse.ArgumentParser) -> dict[str, object]:
        found = {parser.prog: parser._defaults["func"]} if "func" in parser._defaults else {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found.update(commands(sub))
        return found

    found = commands(build_parser())
    assert len(found) >= 25
    for prog, func in found.items():
        assert isinstance(func, Lazy) and callable(func.resolve()), prog
