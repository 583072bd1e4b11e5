"""Config loading: the shipped files validate, and bad input names the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.schema import PipelineSpec, load_config, load_pipeline
from orchestrator.errors import ConfigError
from tests.conftest import REPO, ConfigDir


def test_shipped_config_loads_and_resolves_paths_relative_to_config_dir() -> None:
    cfg = load_config(REPO / "config")
    assert cfg.models_dir == (REPO / "models").resolve()
    assert cfg.sessions_dir == (REPO / "sessions").resolve()
    assert "gemma3-270m" in cfg.models


def test_shipped_pipeline_has_the_seed_shape_with_six_distinct_system_prompts() -> None:
    pipeline = load_pipeline(REPO / "config" / "pipeline.yaml")
    assert [len(s.models) for s in pipeline.stages] == [1, 1, 3]
    assert pipeline.stages[-1].aggregation.type == "synthesis"
    # the draft is a base model's completion: its role is in its prompt, a system prompt would leak into it
    prompts = [pipeline.stages[0].system_prompt, pipeline.stages[1].system_prompt or pipeline.stages[1].prompt]
    prompts += [slot.system_prompt for slot in pipeline.stages[2].models]
    prompts.append(pipeline.stages[2].aggregation.synthesis_prompt)
    assert len(set(prompts)) == 6 and all(prompts)


def test_stage_order_follows_the_file(tmp_path: Path) -> None:
    data = (REPO / "config" / "pipeline.yaml").read_text()
    spec = load_pipeline(REPO / "config" / "pipeline.yaml")
    from tests import yamlfile

    raw = yamlfile.load(data)
    raw["stages"].reverse()
    path = tmp_path / "p.yaml"
    path.write_text(yamlfile.dump(raw))
    assert [s.name for s in load_pipeline(path).stages] == [s.name for s in reversed(spec.stages)]


def test_environment_overrides_models_and_sessions_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHORUS_MODELS_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("CHORUS_SESSIONS_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(REPO / "config"))
    cfg = load_config()
    assert cfg.models_dir == tmp_path / "m"
    assert cfg.sessions_dir == tmp_path / "s"


def test_models_dir_accepts_home_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "app.yaml").write_text("models_dir: ~/gguf\n")
    (cdir / "models.yaml").write_text("models: {}\n")
    assert load_config(cdir).models_dir == tmp_path / "gguf"


@pytest.mark.parametrize(("text", "line", "hint"), [
    ("models:\n  a:\n    file: a.gguf\n   bad: [\n", 4, "indentation"),
    ("models:\n  a:\n\tfile: a.gguf\n", 3, "not tabs"),
])
def test_malformed_models_yaml_names_the_file_and_line(tmp_path: Path, text: str, line: int, hint: str) -> None:
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "models.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cdir)
    assert err.value.file.endswith("models.yaml")
    assert err.value.line == line
    assert f"line {line}" in str(err.value)
    assert err.value.hint is not None and hint in err.value.hint


def test_a_tab_between_key_and_value_is_read_as_the_yaml_spec_says(tmp_path: Path) -> None:
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "models.yaml").write_text("models:\n  a:\n    file:\ta.gguf\n")
    assert load_config(cdir).models["a"].file == "a.gguf"


def test_unknown_key_is_rejected_with_its_field_and_line(tmp_path: Path) -> None:
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "models.yaml").write_text(
        "models:\n  a:\n    file: a.gguf\n    default_n_ctx: 2048\n    n_gpu_layer: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(cdir)
    assert err.value.field == "models.a.n_gpu_layer"
    assert err.value.line == 5
    assert err.value.hint and "unknown keys" in err.value.hint


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "models.yaml").write_text("models:\n  a:\n    file: a.gguf\n    default_n_ctx: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(cdir)
    assert err.value.field == "models.a.default_n_ctx" and err.value.line == 4


def test_model_needs_a_file_or_a_url(tmp_path: Path) -> None:
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "models.yaml").write_text("models:\n  a:\n    description: nothing\n")
    with pytest.raises(ConfigError, match="either 'file'"):
        load_config(cdir)


@pytest.mark.parametrize(
    ("stage_patch", "field", "message"),
    [
        ({"aggregation": {"type": "synthesis"}}, "stages[0].aggregation", "synthesis_model"),
        ({"aggregation": {"type": "custom"}}, "stages[0].aggregation", "module:function"),
        ({"aggregation": {"type": "vote"}}, "stages[0].aggregation.type", "concat"),
        ({"execution": "sometimes"}, "stages[0].execution", "auto"),
        ({"temperature": -1}, "stages[0].temperature", "greater than or equal"),
        ({"prompt": "{{ question "}, "stages[0].prompt", "template syntax error"),
        ({"models": []}, "stages[0].models", "at least 1"),
    ],
)
def test_pipeline_schema_errors_name_the_field(tmp_path: Path, stage_patch: dict, field: str,
                                                message: str) -> None:
    from tests import yamlfile

    stage = {"name": "s", "models": ["m"], **stage_patch}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yamlfile.dump({"stages": [stage]}, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert err.value.field == field
    assert message in err.value.detail
    assert err.value.line is not None


def test_repeated_model_in_a_stage_gets_distinct_labels() -> None:
    spec = PipelineSpec.model_validate({"stages": [{"name": "s", "models": ["m", "m", "x"]}]})
    assert [slot.label for slot in spec.stages[0].models] == ["m-1", "m-2", "x"]


def test_duplicate_stage_names_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages:\n  - {name: a, models: [m]}\n  - {name: a, models: [m]}\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_pipeline(path)


def test_empty_yaml_file_is_a_schema_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert err.value.field == "stages"


def test_missing_config_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config directory not found"):
        load_config(tmp_path / "nope")


def test_config_dir_fixture_points_at_demo_model(config_dir: ConfigDir) -> None:
    cfg = load_config(config_dir.path)
    assert cfg.models_dir == config_dir.models_dir


# ---------------------------------------------------------------- where the config folder is found (#12.7)

def _config_folder(path: Path, models_dir: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "models.yaml").write_text("models: {}\n")
    if models_dir is not None:
        (path / "app.yaml").write_text(f"models_dir: {models_dir}\n")
    return path


@pytest.fixture
def no_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No config-related variables set, XDG folders in tmp, and an empty working directory."""
    for var in ("CHORUS_HOME", "CHORUS_CONFIG_DIR", "CHORUS_MODELS_DIR", "CHORUS_SESSIONS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def test_config_dir_lookup_order_is_flag_env_home_cwd_user_packaged(
        no_locations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config.locations import find_config_dir, packaged_config_dir

    tmp = no_locations
    user = _config_folder(tmp / "xdg-config" / "chorus")
    local = _config_folder(tmp / "cwd" / "config")
    home_config = _config_folder(tmp / "home" / "config")
    direct = _config_folder(tmp / "direct")
    monkeypatch.setenv("CHORUS_HOME", str(tmp / "home"))
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(direct))
    flag = tmp / "flag"

    assert find_config_dir(flag).path == flag
    assert find_config_dir().path == direct
    monkeypatch.delenv("CHORUS_CONFIG_DIR")
    assert find_config_dir().path == home_config
    monkeypatch.delenv("CHORUS_HOME")
    assert find_config_dir().path == local
    (local / "models.yaml").unlink()  # a ./config without app.yaml or models.yaml does not count
    assert find_config_dir().path == user
    (user / "models.yaml").unlink()
    found = find_config_dir()
    assert found.path == packaged_config_dir()
    assert found.source == "packaged defaults"


def test_chorus_home_without_config_uses_the_packaged_defaults_and_keeps_data_under_home(
        no_locations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config.locations import packaged_config_dir

    home = no_locations / "home"
    _config_folder(no_locations / "cwd" / "config")  # a set $CHORUS_HOME is the whole chorus: ./config is skipped
    monkeypatch.setenv("CHORUS_HOME", str(home))
    cfg = load_config()
    assert cfg.paths.config_dir == packaged_config_dir().resolve()
    assert (cfg.models_dir, cfg.sessions_dir, cfg.app.logs_dir) == (home / "models", home / "sessions", home / "logs")
    assert "gemma3-270m" in cfg.models


def test_packaged_defaults_without_chorus_home_keep_data_in_the_xdg_data_home(no_locations: Path) -> None:
    cfg = load_config()
    data = no_locations / "xdg-data" / "chorus"
    assert (cfg.models_dir, cfg.sessions_dir, cfg.app.logs_dir) == (data / "models", data / "sessions", data / "logs")


def test_packaged_defaults_fall_back_to_local_share_when_xdg_data_home_is_relative(
        no_locations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(no_locations / "h"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # the XDG spec: relative values are ignored
    assert load_config().models_dir == no_locations / "h" / ".local" / "share" / "chorus" / "models"


def test_user_config_folder_relative_paths_anchor_on_the_data_home(no_locations: Path) -> None:
    user = _config_folder(no_locations / "xdg-config" / "chorus", models_dir="../models")
    cfg = load_config()
    assert cfg.paths.config_dir == user.resolve()
    assert cfg.models_dir == no_locations / "xdg-data" / "chorus" / "models"  # not ~/.config/models


def test_an_ordinary_config_folder_keeps_paths_relative_to_itself(no_locations: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_HOME", str(no_locations / "home"))
    folder = _config_folder(no_locations / "project" / "config", models_dir="../gguf")
    assert load_config(folder).models_dir == no_locations / "project" / "gguf"


def test_packaged_default_config_is_the_repo_config_not_a_copy() -> None:
    from orchestrator.config.locations import CONFIG_FILES, packaged_config_dir

    for name in CONFIG_FILES:
        assert (packaged_config_dir() / name).resolve() == (REPO / "config" / name).resolve(), name
