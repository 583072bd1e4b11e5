"""A number in the config never takes true or false: pydantic reads them as 1 and 0, so `max_tokens: true` ran
every call for one token and `temperature: false` sampled greedily, with no word of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.schema import AppConfig, GenerationParams, ModelEntry, load_pipeline
from orchestrator.errors import ConfigError


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "seed", "mirostat", "n_ctx"])
def test_true_or_false_for_a_pipeline_number_is_refused_naming_file_line_and_field(tmp_path: Path,
                                                                                    field: str) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"name: p\nstages:\n  - name: one\n    models: [m]\n    {field}: true\n")
    with pytest.raises(ConfigError) as refused:
        load_pipeline(path)
    message = str(refused.value)
    assert "pipeline.yaml" in message and "line 5" in message and field in message
    assert "not true or false" in message


def test_numbers_and_booleans_still_load_where_they_belong() -> None:
    assert GenerationParams.model_validate({"max_tokens": 8, "temperature": 0, "mirostat": 2}).max_tokens == 8
    assert ModelEntry.model_validate({"file": "m.gguf", "parallel": 2}).parallel == 2
    with pytest.raises(ValueError, match="not true or false"):
        ModelEntry.model_validate({"file": "m.gguf", "parallel": True})
    with pytest.raises(ValueError, match="not true or false"):
        AppConfig.model_validate({"server": {"max_slots": True}})
