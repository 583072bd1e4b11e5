"""`--set`: a malformed list or mapping is an error naming its key; stage names and labels with dots; a stage
named `defaults` (orchestrator/config/overrides.py)."""

from __future__ import annotations

import pytest

from orchestrator.config.overrides import apply_overrides
from orchestrator.config.schema import PipelineSpec
from orchestrator.errors import ConfigError


def spec(*stages: dict) -> PipelineSpec:
    return PipelineSpec.model_validate({"stages": list(stages) or [{"name": "s", "models": ["m"]}]})


def stage(result: PipelineSpec, name: str):
    return next(s for s in result.stages if s.name == name)


@pytest.mark.parametrize("assignment", ['defaults.stop=["\\n"', "s.stop=[a, b", 'defaults.logit_bias={"1": -100',
                                        "s.json_schema={type: object"])
def test_a_malformed_list_or_mapping_is_an_error_naming_the_key(assignment: str) -> None:
    key = assignment.partition("=")[0]
    with pytest.raises(ConfigError) as caught:
        apply_overrides(spec(), [assignment])
    assert caught.value.field == key
    assert "not valid YAML or JSON" in caught.value.message and caught.value.hint


def test_well_formed_values_and_text_settings_still_apply() -> None:
    out = apply_overrides(spec(), ['defaults.stop=["\\n"]', "s.stop=x", "s.prompt={{ question }} [done",
                                   "s.system_prompt=[INST] be brief", 's.grammar=root ::= "a" | "{"'])
    assert out.defaults.stop == ["\n"]
    s = stage(out, "s")
    assert s.stop == ["x"] and s.prompt == "{{ question }} [done" and s.system_prompt == "[INST] be brief"
    assert s.grammar == 'root ::= "a" | "{"'


def test_a_stage_name_with_dots_is_matched_by_its_longest_name() -> None:
    pipeline = spec({"name": "a", "models": ["m"]},
                    {"name": "a.b", "models": [{"model": "m", "label": "r.1"}, {"model": "n", "label": "r"}]})
    out = apply_overrides(pipeline, ["a.b.max_tokens=3", "a.max_tokens=4", "a.b.r.1.top_k=5", "a.b.r.top_k=6"])
    assert stage(out, "a.b").max_tokens == 3 and stage(out, "a").max_tokens == 4
    assert [(m.label, m.top_k) for m in stage(out, "a.b").models] == [("r.1", 5), ("r", 6)]
    assert stage(apply_overrides(pipeline, ["stages.a.b.seed=7"]), "a.b").seed == 7


def test_a_stage_named_defaults_is_reached_explicitly_and_defaults_dot_is_ambiguous() -> None:
    pipeline = spec({"name": "defaults", "models": ["m"]}, {"name": "s", "models": ["m"]})
    with pytest.raises(ConfigError) as caught:
        apply_overrides(pipeline, ["defaults.max_tokens=3"])
    assert "ambiguous" in caught.value.message and "stages.defaults." in (caught.value.hint or "")
    out = apply_overrides(pipeline, ["stages.defaults.max_tokens=3"])
    assert stage(out, "defaults").max_tokens == 3 and out.defaults.max_tokens is None
    plain = apply_overrides(spec(), ["defaults.max_tokens=2"])  # no such stage: the pipeline's defaults
    assert plain.defaults.max_tokens == 2


def test_unknown_stages_and_keys_are_still_named() -> None:
    with pytest.raises(ConfigError, match="no stage named 'zz'"):
        apply_overrides(spec(), ["zz.max_tokens=1"])
    with pytest.raises(ConfigError, match=r"is not STAGE\.PARAM=VALUE"):
        apply_overrides(spec(), ["s.=1"])
