"""The systemd units shipped for a two-machine set-up (scripts/chorus-*.service) are valid and start chorus
with arguments it accepts: `systemd-analyze verify` where systemd is installed, and always chorus's own
parser on the ExecStart line with the unit's Environment= values put in."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
UNITS = {"chorus-worker.service": "worker", "chorus-api.service": "api"}
INSTALLED = "/opt/chorus/.venv/bin/chorus"


def _unit(name: str) -> str:
    return (REPO / "scripts" / name).read_text()


def _environment(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in re.findall(r"^Environment=(.*)$", text, flags=re.M):
        env.update(item.split("=", 1) for item in shlex.split(line))
    return env


def _exec_start(text: str) -> list[str]:
    line = re.search(r"^ExecStart=(.*)$", text, flags=re.M)
    assert line, "no ExecStart"
    env = _environment(text)
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line.group(1))
    return shlex.split(expanded)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_starts_chorus_with_arguments_it_accepts(name: str) -> None:
    argv = _exec_start(_unit(name))
    assert argv[0] == INSTALLED and argv[1] == UNITS[name]
    args = build_parser().parse_args(argv[1:])
    assert args.command == UNITS[name] and callable(args.func)
    assert args.host not in ("127.0.0.1", "0.0.0.0")  # a private address of its own, set in the unit
    if name == "chorus-api.service":
        assert args.api_key_file == "/etc/chorus/api-key"  # never the key itself on the command line
        assert "--api-key" not in argv


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_says_the_rpc_protocol_has_no_authentication(name: str) -> None:
    assert "no authentication" in _unit(name).lower()


def test_worker_unit_lets_only_the_chorus_machine_in() -> None:
    text = _unit("chorus-worker.service")
    assert re.search(r"^IPAddressDeny=any$", text, flags=re.M)
    allow = re.search(r"^IPAddressAllow=localhost((?: \d+\.\d+\.\d+\.\d+)+)$", text, flags=re.M)
    assert allow, "IPAddressAllow= must list addresses"
    host = _exec_start(text)[_exec_start(text).index("--host") + 1]
    assert host in allow.group(1).split()  # the worker probes itself on its own address at start


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    chorus = Path(sys.executable).parent / "chorus"
    if not chorus.is_file():
        pytest.skip(f"{chorus} not installed (pip install -e .)")
    # the installed paths of the unit, pointed at this checkout: verify checks that ExecStart can run
    text = _unit(name).replace(INSTALLED, str(chorus)).replace("WorkingDirectory=/opt/chorus",
                                                               f"WorkingDirectory={REPO}")
    unit = tmp_path / name
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    help_run = subprocess.run([str(chorus), UNITS[name], "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--host" in help_run.stdout
