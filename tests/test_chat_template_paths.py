"""`chat_template` in models.yaml: a template file is found relative to the config folder, whatever the current
directory, and a missing file or an unknown built-in name makes the model invalid when the config is loaded
(orchestrator/config/registry.py), not when its server starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.process.server import chat_template_args
from orchestrator.config.registry import Registry, check_chat_template
from orchestrator.config.schema import load_config
from tests.clirun import run_main
from tests.conftest import ConfigDir

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def with_template(config_dir: ConfigDir, template: str) -> None:
    models = config_dir.models()
    models["models"]["gemma3-270m"]["chat_template"] = template
    config_dir.write_models(models)


def test_a_relative_template_file_is_resolved_against_the_config_folder(config_dir: ConfigDir, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (config_dir.path / "tmpl.jinja").write_text(TEMPLATE)
    with_template(config_dir, "tmpl.jinja")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # chorus started from another folder
    record = Registry(load_config(config_dir.path)).records["gemma3-270m"]
    assert record.status == "available", record.reason
    assert record.entry.chat_template == str(config_dir.path.resolve() / "tmpl.jinja")
    assert chat_template_args(record.entry.chat_template) == ["--jinja", "--chat-template-file",
                                                              str(config_dir.path.resolve() / "tmpl.jinja")]


@pytest.mark.parametrize(("template", "reason"), [
    ("missing.jinja", "chat_template: file not found: "),
    ("chatmll", "'chatmll' is not one of llama.cpp's built-in templates (did you mean 'chatml'?)"),
])
def test_a_bad_template_makes_the_model_invalid_at_load(config_dir: ConfigDir, template: str, reason: str) -> None:
    with_template(config_dir, template)
    record = Registry(load_config(config_dir.path)).records["gemma3-270m"]
    assert record.status == "invalid" and reason in (record.reason or "")
    assert "models.yaml, model 'gemma3-270m'" in (record.reason or "")
    listed = run_main("models", "--config-dir", config_dir.path)
    assert listed.returncode == 0 and "invalid" in listed.stdout
    assert reason.split(" (")[0] in " ".join((listed.stdout + listed.stderr).split())


def test_names_text_and_absolute_files_are_kept(tmp_path: Path) -> None:
    absolute = tmp_path / "t.jinja"
    absolute.write_text(TEMPLATE)
    assert check_chat_template("chatml", tmp_path) == ("chatml", None)
    assert check_chat_template(TEMPLATE, tmp_path) == (TEMPLATE, None)
    assert check_chat_template(str(absolute), Path("/nowhere")) == (str(absolute), None)
