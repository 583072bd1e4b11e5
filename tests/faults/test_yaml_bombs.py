"""Issue 24, item 5: YAML anchor bombs in config files and `--set` values.

Before: a 567-byte pipeline file with 9 levels of 9 aliases under `defaults.json_schema` (387 M nodes once
expanded) kept `chorus plan` busy past 90 s at 3 GB: PyYAML shares aliased nodes, but validation copies
them out. The same value given with `--set` did the same. Now every file and every `--set` value is
counted while loading, aliases expanded (memoized, so the count itself is cheap), and refused past
MAX_YAML_NODES with the file and line.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.config.overrides import apply_overrides
from orchestrator.config.schema import load_app_config, load_models_file, load_pipeline
from orchestrator.config.yamlio import MAX_YAML_NODES, read_yaml
from orchestrator.errors import ConfigError
from tests.conftest import ConfigDir
from tests.faults.conftest import assert_clean_failure, chorus_main, manual


def _anchor_levels(indent: str, levels: int = 9) -> list[str]:
    """`a0: &a0 [x * 9]`, then `aN: &aN [*aN-1 * 9]`: 9 ** levels nodes from a few hundred bytes."""
    lines = [f"{indent}a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return lines


PIPELINE_BOMB = "\n".join(["name: bomb", "defaults:", "  json_schema:", *_anchor_levels("    "),
                           "stages:", "  - name: s", "    models: [{model: gemma3-270m}]", ""])
FIRST_OVER_LIMIT = 9  # a5 (line 9) expands to 597,871 nodes, the first over 100,000


def test_the_issue_pipeline_file_is_refused_at_once_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE_BOMB)
    assert len(PIPELINE_BOMB) < 700
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert time.monotonic() - started < 1.0
    assert err.value.file == str(path) and err.value.line == FIRST_OVER_LIMIT
    assert f"more than {MAX_YAML_NODES:,} nodes" in err.value.detail and "aliases" in (err.value.hint or "")


@pytest.mark.parametrize("name", ["app.yaml", "models.yaml"])
def test_every_config_file_is_bounded(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n".join(["junk:", *_anchor_levels("  "), ""]))
    with pytest.raises(ConfigError) as err:
        load_app_config(tmp_path) if name == "app.yaml" else load_models_file(path)
    assert err.value.file == str(path) and err.value.line == 7 and "more than" in err.value.detail


def test_an_alias_inside_its_own_anchor_is_refused_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("name: loop\ndefaults:\n  json_schema: &s\n    items: [*s]\nstages: []\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert "anchored on line 3 contains an alias (*name) of itself" in err.value.detail and err.value.line == 3


def test_the_same_bomb_given_with_set_is_refused_naming_the_assignment() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    value = "{" + ", ".join(levels) + "}"
    pipeline = manual([{"name": "s", "models": [{"model": "m"}]}])
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        apply_overrides(pipeline, [f"defaults.json_schema={value}"])
    assert time.monotonic() - started < 1.0
    assert err.value.file == "--set" and err.value.field == "defaults.json_schema"
    assert "defaults.json_schema=..." in err.value.detail and f"more than {MAX_YAML_NODES:,}" in err.value.detail


def test_ordinary_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("name: merged\ndefaults: &d {max_tokens: 8, seed: 1}\nstages:\n"
                    "  - name: s\n    models: [{model: m, <<: *d, seed: 2}]\n")
    spec = load_pipeline(path)
    assert spec.defaults.max_tokens == 8
    assert spec.stages[0].models[0].seed == 2  # a merged key overridden in place is not a duplicate


def test_set_values_that_are_not_yaml_stay_plain_strings() -> None:
    pipeline = manual([{"name": "s", "models": [{"model": "m"}]}])
    result = apply_overrides(pipeline, ["s.prompt=Answer: {{ question }} [done"])
    assert result.stages[0].prompt == "Answer: {{ question }} [done"


def test_chorus_plan_refuses_the_bomb_quickly_without_a_traceback(config_dir: ConfigDir) -> None:
    config_dir.write_pipeline(PIPELINE_BOMB)
    started = time.monotonic()
    proc = chorus_main(config_dir, "plan")
    assert time.monotonic() - started < 30
    assert_clean_failure(proc)
    message = " ".join(proc.stderr.split())  # the CLI wraps long lines
    assert "pipeline.yaml, line 9:" in message and "more than 100,000 nodes" in message
