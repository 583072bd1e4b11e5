"""The UI's pipeline logic without Streamlit: the builder's dicts ⇄ specs, saved pipelines, and the
generation controls read from GenerationParams."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import Field

from orchestrator.config.overrides import apply_overrides
from orchestrator.config.schema import GenerationParams, PipelineSpec, load_pipeline
from orchestrator.errors import ConfigError
from tests import yamlfile
from tests.conftest import REPO
from ui import params_form, pipeline_files, stage_builder

SHIPPED = REPO / "config" / "pipeline.yaml"

RICH = {
    "name": "rich",
    "description": "every kind of setting the YAML can hold",
    "defaults": {"max_tokens": 32, "n_ctx": 1024, "repeat_penalty": 1.2, "stop": ["\nQ:"], "stream_reasoning": False},
    "stages": [
        {"name": "sources", "kind": "retrieve", "collection": "kb", "top_k": 4, "query_from": "previous"},
        {"name": "ask", "models": [
            {"model": "m", "label": "warm", "system_prompt": "Be warm.", "seed": 1, "temperature": 0.9,
             "logit_bias": {"15043": -100}},
            {"model": "m", "label": "cold", "system_prompt": "Be cold.", "seed": 2, "top_k": 5, "mirostat": 2,
             "mirostat_tau": 4.0},
        ], "execution": "sequential", "on_error": "stop", "min_p": 0.05,
         "aggregation": {"type": "majority_vote", "synthesis_model": "m", "synthesis_prompt": "{{ question }}",
                         "vote": {"extract": "regex", "pattern": r"(\d+)", "similarity": 0.5,
                                  "tie_break": "synthesis"}}},
        {"name": "shape", "models": ["m"], "grammar": 'root ::= "yes" | "no"',
         "aggregation": {"type": "concat", "separator": "\n---\n", "label_format": "## {label}"}},
        {"name": "json", "models": ["m"], "json_schema": {"type": "object"}, "n_gpu_layers": 0,
         "aggregation": {"type": "judge", "judge_model": "m", "judge_mode": "pairwise",
                         "judge_prompt": "{{ answer }}"}},
        {"name": "tmpl", "models": ["m", "m"],
         "aggregation": {"type": "custom_template", "template": "{{ responses | length }}"}},
    ],
}


# ---------------------------------------------------------------- builder ⇄ spec

@pytest.mark.parametrize("source", ["shipped", "rich"])
def test_a_loaded_pipeline_goes_through_the_builder_unchanged(source: str) -> None:
    spec = load_pipeline(SHIPPED) if source == "shipped" else PipelineSpec.model_validate(RICH)
    stages, defaults = stage_builder.from_spec(spec)
    rebuilt = stage_builder.build_spec(stages, name=spec.name, description=spec.description, defaults=defaults)
    assert rebuilt.model_dump() == spec.model_dump()


def test_a_retrieve_stage_keeps_no_model_parameter_or_aggregation_left_from_its_generate_days() -> None:
    stage = stage_builder.new_stage(1, ["m"]) | {"aggregation": "synthesis", "synthesis_model": "big"}
    assert stage["kind"] == "generate"
    stage |= {"kind": "retrieve", "collection": "kb", "top_k": 3}
    assert stage_builder.stage_to_yaml_dict(stage) == {"name": "stage1", "kind": "retrieve", "collection": "kb",
                                                       "top_k": 3, "query_from": "question"}
    spec = stage_builder.build_spec([stage])
    assert spec.stages[0].kind == "retrieve" and spec.model_names() == []  # "m" and "big" would not load


def test_the_same_model_several_times_keeps_each_calls_label_system_prompt_and_parameters() -> None:
    stage = stage_builder.new_stage(1, ["m"])
    stage_builder.add_slot(stage, "m")
    stage_builder.add_slot(stage, "m")
    first, second, _third = stage["models"]
    first |= {"label": "a", "system_prompt": "A.", "seed": 1}
    second |= {"label": "b", "seed": 2, "top_k": 40, "stop": ["\n"]}
    spec = stage_builder.build_spec([stage])
    slots = spec.stages[0].models
    assert [(s.model, s.label, s.system_prompt, s.seed) for s in slots] == [
        ("m", "a", "A.", 1), ("m", "b", None, 2), ("m", "m-1", None, None)]
    assert slots[1].top_k == 40 and slots[1].stop == ["\n"] and slots[0].top_k is None
    stage_builder.remove_slot(stage, 0)
    assert [s.label for s in stage_builder.build_spec([stage]).stages[0].models] == ["b", "m-1"]


def test_a_leftover_synthesis_model_is_dropped_when_the_stage_no_longer_synthesises() -> None:
    stage = stage_builder.new_stage(1, ["m"]) | {"aggregation": "synthesis", "synthesis_model": "big"}
    assert stage_builder.build_spec([stage]).model_names() == ["m", "big"]
    stage["aggregation"] = "concat"
    assert stage_builder.build_spec([stage]).model_names() == ["m"]  # "big" would otherwise be loaded


def test_a_bad_call_label_names_the_stage_and_the_call() -> None:
    stage = stage_builder.new_stage(1, ["m"])
    stage_builder.add_slot(stage, "m")
    stage["models"][1]["label"] = "has space"
    with pytest.raises(ConfigError) as err:
        stage_builder.build_spec([stage])
    assert "stage 1 (stage1): model call 2.label" in str(err.value)


def test_a_regex_vote_without_a_pattern_is_refused_with_the_stage() -> None:
    stage = stage_builder.new_stage(1, ["m"]) | {"aggregation": "majority_vote"}
    stage["vote"]["extract"] = "regex"
    with pytest.raises(ConfigError) as err:
        stage_builder.build_spec([stage])
    assert "needs a 'pattern'" in str(err.value) and "stage 1 (stage1)" in str(err.value)


# ---------------------------------------------------------------- saved pipelines

@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65, "a b", "név", "a.b", "-dash",
                                  "CON\x00"])
def test_pipeline_names_that_could_leave_the_folder_or_hide_are_refused(tmp_path: Path, name: str) -> None:
    spec = PipelineSpec.model_validate(RICH)
    with pytest.raises(ConfigError, match="not a valid pipeline name"):
        pipeline_files.save(tmp_path, name, spec)
    assert not any(tmp_path.rglob("*"))  # nothing written anywhere


def test_a_saved_pipeline_loads_back_the_same_and_is_listed(tmp_path: Path) -> None:
    spec = PipelineSpec.model_validate(RICH)
    path = pipeline_files.save(tmp_path, "review.yaml", spec)
    assert path == tmp_path / "pipelines" / "review.yaml"
    assert pipeline_files.list_saved(tmp_path) == ["review"]
    loaded = pipeline_files.load(tmp_path, "review")
    assert loaded.model_dump() == spec.model_copy(update={"name": "review"}).model_dump()
    assert "\\nQ:" in path.read_text()  # stop strings written readably, not as broken-up quoted lines


def test_saving_never_replaces_a_file_unless_asked(tmp_path: Path) -> None:
    spec = PipelineSpec.model_validate(RICH)
    path = pipeline_files.save(tmp_path, "mine", spec)
    before = path.read_text()
    other = spec.model_copy(update={"description": "changed"})
    with pytest.raises(pipeline_files.PipelineExists) as err:
        pipeline_files.save(tmp_path, "mine", other)
    assert err.value.path == path and path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["mine.yaml"]  # no temporary file left behind
    pipeline_files.save(tmp_path, "mine", other, overwrite=True)
    assert pipeline_files.load(tmp_path, "mine").description == "changed"


def test_a_broken_saved_file_is_reported_with_its_file_line_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "bad.yaml").write_text("name: bad\nstages:\n  - name: one\n    models: [m]\n    temprature: 2\n")
    with pytest.raises(ConfigError) as err:
        pipeline_files.load(tmp_path, "bad")
    assert err.value.file == str(folder / "bad.yaml") and err.value.line == 5
    assert err.value.field == "stages[0].temprature"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_config_folder_is_a_clear_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot be written"):
            pipeline_files.save(tmp_path, "x", PipelineSpec.model_validate(RICH))
    finally:
        tmp_path.chmod(0o700)


# ---------------------------------------------------------------- generated controls

def test_every_generation_parameter_gets_a_control_with_the_schemas_bounds() -> None:
    fields = {f.name: f for f in params_form.generation_fields()}
    assert list(fields) == list(GenerationParams.keys())
    assert (fields["temperature"].kind, fields["temperature"].minimum, fields["temperature"].maximum) == \
        ("float", 0, 5)
    assert (fields["top_k"].kind, fields["top_k"].minimum) == ("int", 0)
    assert fields["mirostat"].kind == "choice" and fields["mirostat"].choices == (0, 1, 2)
    assert fields["stop"].kind == "lines" and fields["grammar"].kind == "text"
    assert fields["json_schema"].kind == fields["logit_bias"].kind == "json"


def test_a_parameter_added_to_the_schema_appears_without_ui_code() -> None:
    class Newer(GenerationParams):
        dry_multiplier: float | None = Field(None, ge=0, le=5)
        xtc_threshold: float | None = Field(None, gt=0, lt=1)
        n_probs: int | None = Field(None, gt=0, le=100)

    fields = {f.name: f for f in params_form.describe(Newer)}
    assert (fields["dry_multiplier"].kind, fields["dry_multiplier"].maximum) == ("float", 5)
    assert (fields["xtc_threshold"].minimum, fields["xtc_threshold"].maximum) == (0, 1)
    assert (fields["n_probs"].kind, fields["n_probs"].minimum) == ("int", 1)  # gt 0 on an int: at least 1


@pytest.mark.parametrize("stops", [["\nQuestion:", "\n\n\n"], ["a\\nb", "tab\there", "back\\"], ["é 🎉"]])
def test_stop_strings_survive_the_one_per_line_text_box(stops: list[str]) -> None:
    assert params_form.text_to_lines(params_form.lines_to_text(stops)) == stops


def test_form_values_become_overrides_that_apply_exactly() -> None:
    spec = load_pipeline(SHIPPED)
    values = {"temperature": 0.0, "seed": 5, "stop": ["\nEnd", 'quote " and = sign'], "mirostat": 2,
              "logit_bias": {"15043": -100.0}, "grammar": 'root ::= "a: b"', "top_k": None}
    out = apply_overrides(spec, params_form.overrides(values, "defaults") +
                          params_form.overrides({"max_tokens": 7}, "analyse"))
    d = out.defaults
    assert (d.temperature, d.seed, d.stop, d.mirostat, d.logit_bias, d.grammar, d.top_k) == \
        (0.0, 5, ["\nEnd", 'quote " and = sign'], 2, {"15043": -100.0}, 'root ::= "a: b"', None)
    assert out.stages[0].max_tokens == 7 and spec.stages[0].max_tokens is None  # the original is untouched


def test_bad_json_in_a_text_box_is_a_config_error_naming_the_field() -> None:
    field = next(f for f in params_form.generation_fields() if f.name == "logit_bias")
    with pytest.raises(ConfigError) as err:
        params_form.text_to_value(field, "{15043: -100}")
    assert err.value.field == "logit_bias"
    assert params_form.text_to_value(field, ' {"15043": -100} ') == {"15043": -100}
    assert params_form.text_to_value(field, "  ") is None
    assert yamlfile.load(params_form.value_to_text(field, {"1": 2.0})) == {"1": 2.0}


def test_grammar_and_json_schema_filled_in_together_are_an_error_naming_both_and_the_scope() -> None:
    pair = {"grammar": 'root ::= "a"', "json_schema": {"type": "object"}, "seed": 3}
    assert params_form.together_errors(pair, "defaults") == [
        "all stages: give 'grammar' or 'json_schema', not both (llama-server refuses the pair)"]
    assert params_form.together_errors(pair, "answer")[0].startswith("stage 'answer': give 'grammar' or 'json_schema'")
    assert params_form.together_errors({**pair, "json_schema": None}, "defaults") == []
    assert params_form.together_errors({"grammar": 'root ::= "a"'}, "answer") == []
    # what the forms would otherwise send: the later of the pair silently replaces the other
    out = apply_overrides(load_pipeline(SHIPPED), params_form.overrides(pair, "defaults"))
    assert out.defaults.grammar is None or out.defaults.json_schema is None


def _two_stages(first_prompt: str, second_prompt: str) -> PipelineSpec:
    return PipelineSpec.model_validate({"stages": [{"name": "a", "models": ["m"], "prompt": first_prompt},
                                                   {"name": "b", "models": ["m"], "prompt": second_prompt}]})


def test_a_first_stage_reading_previous_without_the_question_is_warned() -> None:
    stages = [stage_builder.new_stage(1, ["m"]), stage_builder.new_stage(2, ["m"])]
    assert stage_builder.warnings(stage_builder.build_spec(stages)) == []
    moved = stage_builder.warnings(stage_builder.build_spec(stage_builder.move(stages, 1, -1)))
    assert len(moved) == 1 and "'stage2' runs first" in moved[0] and "{{ previous }}" in moved[0]
    assert stage_builder.warnings(_two_stages("{{ previous if previous else question }}", "{{ previous }}")) == []
    assert stage_builder.warnings(_two_stages("{% if previous %}{{ previous }}{% endif %}", "x")) != []
    assert stage_builder.warnings(PipelineSpec.model_validate({"stages": [  # after a retrieve stage: its passages
        {"name": "r", "kind": "retrieve", "collection": "kb"}, {"name": "b", "models": ["m"],
                                                               "prompt": "{{ previous }}"}]})) == []


def test_a_prompt_reading_a_stage_that_does_not_run_before_it_is_warned() -> None:
    assert stage_builder.warnings(_two_stages("{{ question }}", "{{ stages.a.output }}")) == []
    (note,) = stage_builder.warnings(_two_stages("{{ question }} {{ stages['b'].output }}", "{{ stages.a.output }}"))
    assert "stage 'a'" in note and "stages.b" in note and "it runs first" in note
    merged = PipelineSpec.model_validate({"stages": [
        {"name": "a", "models": ["m"]},
        {"name": "b", "models": ["m", "m"], "aggregation": {
            "type": "custom_template", "template": "{{ stages.a.output }}{{ stages.c.output }}"}}]})
    (note,) = stage_builder.warnings(merged)
    assert note.startswith("The aggregation template of stage 'b' uses stages.c") and "stages before it: a" in note
