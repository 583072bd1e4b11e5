"""Issue 12, item 8: a custom aggregator could name any installed `module:function`, so whoever could edit
a stage (the UI's manual mode, `--set`) could make the host import and call arbitrary code (`os:system`).

Now a function must be in the config folder's aggregators/ or listed in app.yaml's aggregators.allowed;
anything else is refused with an error naming the field and the allowed functions, before any import.
A sentinel module on sys.path, outside the allowed places, proves nothing was imported: it leaves a file
behind when it is.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from orchestrator.config.aggregators import allowed_functions
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.schema import AggregationSpec, PipelineSpec
from orchestrator.engine.aggregation import AggregationError, Candidate, aggregate
from orchestrator.errors import ConfigError
from tests.conftest import ConfigDir
from tests.faults.conftest import DEMO, assert_clean_failure, chorus

SENTINEL = "chorus_door_sentinel"


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`chorus_door_sentinel.py` on sys.path; returns the file it creates when imported."""
    site, marker = tmp_path / "site", tmp_path / "sentinel-imported"
    site.mkdir()
    (site / f"{SENTINEL}.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                         "def fn(question, responses):\n    return 'pwned'\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, SENTINEL, raising=False)
    return marker


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config folder with one allowed function in aggregators/."""
    cdir = tmp_path / "config"
    (cdir / "aggregators").mkdir(parents=True)
    (cdir / "aggregators" / "votes.py").write_text("def pick(question, responses):\n    return responses[0]['text']\n")
    return cdir


def merge(function: str, config_dir: Path) -> str:
    spec = AggregationSpec(type="custom", function=function)
    return asyncio.run(aggregate(spec, "q", [Candidate("m1", "m", "answer")], config_dir=config_dir)).output


@pytest.mark.parametrize("function", ["os:system", "subprocess:run", "builtins:exec", f"{SENTINEL}:fn"])
def test_a_module_name_is_refused_naming_the_field_and_the_allowed_functions(config: Path, sentinel: Path,
                                                                              function: str) -> None:
    with pytest.raises(AggregationError) as err:
        merge(function, config)
    message = str(err.value)
    assert f"aggregation.function '{function}' is not an allowed aggregator" in message
    assert "allowed: votes:pick" in message and "aggregators.allowed in app.yaml" in message
    assert err.value.details["allowed"] == ["votes:pick"]
    assert SENTINEL not in sys.modules and not sentinel.exists()


def test_a_file_beside_app_yaml_is_no_longer_loaded(config: Path, sentinel: Path) -> None:
    (config / "loose.py").write_text(f"import {SENTINEL}\ndef fn(question, responses):\n    return 'x'\n")
    with pytest.raises(AggregationError, match="'loose:fn' is not an allowed aggregator"):
        merge("loose:fn", config)
    assert not sentinel.exists()


def test_the_allowed_ones_still_work(config: Path, sentinel: Path) -> None:
    assert merge("votes:pick", config) == "answer"
    (config / "app.yaml").write_text(f"aggregators:\n  allowed: ['{SENTINEL}:fn']\n")
    assert merge(f"{SENTINEL}:fn", config) == "pwned"  # the operator listed it: now it may be imported
    assert sentinel.exists()


def test_listing_the_allowed_functions_runs_none_of_them(config: Path, sentinel: Path) -> None:
    (config / "aggregators" / "noisy.py").write_text(f"import {SENTINEL}\nasync def merge(question, responses):\n"
                                                     "    return ''\n")
    (config / "app.yaml").write_text("aggregators:\n  allowed: ['mypkg.votes:fn']\n")
    assert [f.name for f in allowed_functions(config)] == ["mypkg.votes:fn", "noisy:merge", "votes:pick"]
    assert not sentinel.exists()


def test_set_override_naming_os_system_is_refused_before_anything_is_imported(config: Path, sentinel: Path) -> None:
    pipeline = PipelineSpec.model_validate({"stages": [{"name": "answer", "models": [DEMO]}]})
    for function in ("os:system", f"{SENTINEL}:fn"):
        with pytest.raises(ConfigError) as err:
            apply_overrides(pipeline, ["answer.aggregation.type=custom", f"answer.aggregation.function={function}"],
                            config_dir=config)
        assert err.value.field == "stages.answer.aggregation.function"
        assert f"'{function}' is not an allowed aggregator" in str(err.value)
        assert "allowed: votes:pick" in str(err.value)
    assert SENTINEL not in sys.modules and not sentinel.exists()
    allowed = apply_overrides(pipeline, ["answer.aggregation.type=custom", "answer.aggregation.function=votes:pick"],
                              config_dir=config)
    assert allowed.stages[0].aggregation.function == "votes:pick"


def test_chorus_run_set_os_system_is_refused_before_any_model_starts(config_dir: ConfigDir, sentinel: Path) -> None:
    """End to end: `chorus run --set` names the field, lists what is allowed, imports nothing, starts nothing.

    Needs cli/run.py to pass `config_dir=config.paths.config_dir` to apply_overrides.
    """
    config_dir.write_pipeline({"stages": [{"name": "answer", "models": [DEMO], "max_tokens": 4, "n_ctx": 512}]})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sentinel.parent / "site"), *sys.path])}
    for function in ("os:system", f"{SENTINEL}:fn"):
        proc = chorus(config_dir, "run", "Say hi", "--set", "answer.aggregation.type=custom",
                      "--set", f"answer.aggregation.function={function}", env=env, timeout=120)
        assert_clean_failure(proc)
        said = " ".join(proc.stderr.split())  # the CLI wraps long lines
        assert f"'{function}' is not an allowed aggregator" in said, proc.stderr
        assert "field 'stages.answer.aggregation.function'" in said and "allowed: none" in said
    assert not sentinel.exists()
    logs = config_dir.path.parent / "logs"
    assert not (logs.is_dir() and [p for p in logs.glob("*.log") if not p.name.startswith("chorus.log")]), \
        "a model server was started for a refused pipeline"
    assert not (config_dir.sessions_dir.is_dir() and list(config_dir.sessions_dir.glob("session_*")))
