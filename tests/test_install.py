"""chorus installed for real: a wheel built offline, installed outside the checkout, run from elsewhere.

The wheel is built from a copy of the sources (so no build/ or egg-info lands in the working tree) with the
venv's setuptools and no network; it is installed with `pip --target`, and every command runs from a folder
outside the repo with only that folder and the venv's dependencies importable. Also: the llama-server lookup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.errors import BinaryNotFound
from launcher.process import binary
from launcher.process.binary import BUILD_REVISION, PINNED_LLAMA_CPP, cached_builds, find_llama_server
from orchestrator.config.locations import CONFIG_FILES
from tests.clirun import run_main
from tests.conftest import REPO

SOURCES = ("api", "cli", "launcher", "orchestrator", "ui", "config", "pyproject.toml", "README.md")
pytestmark = pytest.mark.xdist_group("installed-wheel")  # one worker builds the wheel (`site`), not each


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet",
                           "--disable-pip-version-check"], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, installed into a folder of its own; returns that folder."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _pip("wheel", "--no-build-isolation", "-w", str(root / "dist"), ".", cwd=src)
    (wheel,) = (root / "dist").glob("gguf_chorus-*.whl")
    _pip("install", "--target", str(root / "site"), str(wheel), cwd=root)
    return root / "site"


@dataclass
class Outside:
    """Runs commands in a folder outside the repo, where only the installed copy of chorus is importable."""

    cwd: Path
    env: dict[str, str]

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    def chorus(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "cli", *args)


@pytest.fixture
def outside(tmp_path: Path, site: Path) -> Outside:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("CHORUS_", "XDG_")) and k not in {"LLAMA_SERVER", "PYTHONPATH"}}
    return Outside(cwd, {**keep, "PYTHONPATH": str(site), "CHORUS_HOME": str(tmp_path / "home"),
                         "CHORUS_CACHE_DIR": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
                         "XDG_DATA_HOME": str(tmp_path / "xdg-data")})


def test_installed_package_is_imported_from_the_install_not_the_checkout(
        site: Path, outside: Outside) -> None:
    code = ("import json, api, cli, launcher, orchestrator, ui; from launcher.process.binary import checkout_bin; "
            "from orchestrator.config.locations import find_config_dir; "
            "print(json.dumps([m.__file__ for m in (api, cli, launcher, orchestrator, ui)] + [str(checkout_bin()), "
            "str(find_config_dir().path)]))")
    done = outside.run(sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    *modules, checkout, config = json.loads(done.stdout)
    assert all(Path(m).is_relative_to(site) for m in modules), modules
    assert checkout == "None"  # an installed copy never looks for a checkout's bin/
    assert Path(config) == site / "orchestrator" / "config" / "defaults"
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["api", "bin", "cli", "launcher", "orchestrator", "ui"]  # the user's top level, no tests/ or bench/
    assert (site / "ui" / "app.py").is_file() and (site / "ui" / "views" / "run.py").is_file()

    helped = outside.chorus("--help")
    assert helped.returncode == 0, helped.stderr
    assert all(cmd in helped.stdout for cmd in ("init", "models", "check", "run"))


def test_installed_console_script_init_writes_the_packaged_config(
        site: Path, outside: Outside, tmp_path: Path) -> None:
    target = tmp_path / "mine" / "config"
    script = site / "bin" / "chorus"  # the [project.scripts] entry point, as pip wrote it
    done = outside.run(script, "init", str(target))
    assert done.returncode == 0, done.stderr
    for name in CONFIG_FILES:
        assert (target / name).read_bytes() == (REPO / "config" / name).read_bytes(), name
        assert f"wrote {target / name}" in done.stdout
    assert str(tmp_path / "mine" / "models") in done.stdout  # where to put the .gguf files
    assert f"chorus check --config-dir {target}" in done.stdout


def test_installed_models_lists_an_init_config(outside: Outside, tmp_path: Path) -> None:
    target = tmp_path / "cfg"
    assert run_main("init", str(target)).returncode == 0  # the same files as the installed init's (above)
    done = outside.chorus("models", "--json", "--config-dir", str(target))
    assert done.returncode == 0, done.stderr
    listed = [(m["name"], m["status"]) for m in json.loads(done.stdout)]
    assert listed == [("gemma3-270m", "missing"), ("smollm2-135m", "missing")]  # tmp_path/models has no .gguf yet


def test_installed_check_on_the_packaged_config_keeps_everything_under_chorus_home(
        site: Path, outside: Outside, tmp_path: Path) -> None:
    home = tmp_path / "home"
    fake = home / "bin" / "llama-server"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'version: 0 (fake-for-install-test)'\n")
    fake.chmod(0o755)
    done = outside.chorus("check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert Path(report["config_dir"]) == site / "orchestrator" / "config" / "defaults"
    assert Path(report["models_dir"]) == home / "models"
    assert report["models_dir_exists"] is False
    assert report["llama_server"] == {"path": str(fake), "version": "0 (fake-for-install-test)", "error": None}
    assert [m["name"] for m in report["models"]] == ["gemma3-270m", "smollm2-135m"]
    assert report["base_pipeline"]["available"] is False


# ---------------------------------------------------------------- the llama-server lookup

def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_llama_server_lookup_order_is_config_env_home_checkout_cache_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configured = _exe(tmp_path / "configured" / "llama-server")
    env = _exe(tmp_path / "env" / "llama-server")
    home = _exe(tmp_path / "home" / "bin" / "llama-server")
    checkout = _exe(tmp_path / "checkout" / "bin" / "llama-server")
    cached = _exe(tmp_path / "cache" / "bin" / f"chorus-lcp{PINNED_LLAMA_CPP}-cpu{BUILD_REVISION}" / "llama-server")
    on_path = _exe(tmp_path / "path" / "llama-server")
    monkeypatch.setenv("LLAMA_SERVER", str(env))
    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHORUS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.setattr(binary, "checkout_bin", lambda: checkout)

    assert find_llama_server(configured) == configured
    for expected in (env, home, checkout, cached, on_path):
        assert find_llama_server(None) == expected
        expected.unlink()
    with pytest.raises(BinaryNotFound) as err:
        find_llama_server(None)
    assert str(home) in err.value.searched and "PATH" in err.value.searched
    assert str(cached) in err.value.searched
    assert "scripts/build_llama_server.sh" in str(err.value) and "$CHORUS_HOME/bin" in str(err.value)


def test_build_cache_offers_the_current_build_this_machine_can_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build(name: str) -> Path:
        return tmp_path / "cache" / "bin" / name / "llama-server"

    cpu, cuda = build(f"chorus-lcp{PINNED_LLAMA_CPP}-cpu{BUILD_REVISION}"), build(
        f"chorus-lcp{PINNED_LLAMA_CPP}-cuda{BUILD_REVISION}")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cached_builds(tmp_path / "cache") == [cpu, cuda]  # no nvidia-smi: a CUDA build would not start
    _exe(tmp_path / "empty" / "nvidia-smi")
    assert cached_builds(tmp_path / "cache") == [cuda, cpu]

    # A build with older flags (another revision) or another pin is never used, even when it is all there is.
    stale = _exe(build(f"chorus-lcp{PINNED_LLAMA_CPP}-cpu"))
    _exe(build("chorus-lcp0.0.1-cpu" + BUILD_REVISION))
    monkeypatch.setenv("CHORUS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.delenv("CHORUS_HOME", raising=False)
    monkeypatch.setattr(binary, "checkout_bin", lambda: None)
    with pytest.raises(BinaryNotFound) as err:
        find_llama_server(None)
    assert str(stale) not in err.value.searched
    assert _exe(cpu) == find_llama_server(None)


def test_binary_pin_and_build_revision_match_the_build_script() -> None:
    script = (REPO / "scripts" / "build_llama_server.sh").read_text()
    pin = re.search(r'^PIN_VERSION="([^"]+)"', script, re.MULTILINE)
    tag = re.search(r'^version_tag="chorus-\$\{tag\}-\$\{variant\}([^"]*)"', script, re.MULTILINE)
    assert pin is not None and tag is not None
    assert (pin.group(1), tag.group(1)) == (PINNED_LLAMA_CPP, BUILD_REVISION)


# ---------------------------------------------------------------- chorus init, in process

def test_init_without_a_folder_writes_to_chorus_home_where_the_lookup_then_finds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from orchestrator.config.locations import find_config_dir

    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHORUS_CONFIG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_config_dir().source.startswith("packaged defaults")
    assert main(["init"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "home" / "config").iterdir()) == sorted(CONFIG_FILES)
    assert find_config_dir().path == tmp_path / "home" / "config"
    assert "chorus check\n" in out and "--config-dir" not in out  # found without the flag
    assert str(tmp_path / "home" / "models") in out


def test_init_refuses_a_folder_that_has_config_files_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "mine" / "config"
    assert run_main("init", str(target)).returncode == 0
    (target / "models.yaml").write_text("models: {}\n")
    again = run_main("init", str(target))
    refusal = " ".join(again.stderr.split())  # the CLI wraps error paragraphs
    assert again.returncode == 2
    assert "already has app.yaml, models.yaml, pipeline.yaml; nothing was written" in refusal and "--force" in refusal
    assert (target / "models.yaml").read_text() == "models: {}\n"  # refused means untouched
    forced = run_main("init", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (target / "models.yaml").read_bytes() == (REPO / "config" / "models.yaml").read_bytes()


def test_init_into_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    (tmp_path / "taken").write_text("not a folder")
    assert main(["init", str(tmp_path / "taken")]) == 2
    assert "exists and is not a folder" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "taken").read_text() == "not a folder"
