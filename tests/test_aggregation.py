"""The merge step: concat, majority vote, synthesis, templates and custom functions."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from launcher.errors import ChorusError, RequestFailed
from orchestrator.config.schema import AggregationSpec
from orchestrator.engine.aggregation import (
    DEFAULT_SYNTHESIS_PROMPT,
    AggregationError,
    Candidate,
    aggregate,
    group_answers,
    match_reply,
    normalise,
)
from orchestrator.records import AggregationRecord


class FakeSynthesizer:
    """A real async synthesize function that replies from a script and records its calls."""

    def __init__(self, reply: str = "merged", error: Exception | None = None) -> None:
        self.reply = reply
        self.error = error
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, model: str, prompt: str) -> str:
        self.calls.append((model, prompt))
        await asyncio.sleep(0)
        if self.error:
            raise self.error
        return self.reply


def run(spec: AggregationSpec | dict, candidates: list[Candidate], **kwargs: Any) -> AggregationRecord:
    spec = spec if isinstance(spec, AggregationSpec) else AggregationSpec(**spec)
    return asyncio.run(aggregate(spec, "What is 6 x 7?", candidates, **kwargs))


def cands(*texts: str) -> list[Candidate]:
    return [Candidate(label=f"m{i}", model=f"model-{i % 2}", text=t) for i, t in enumerate(texts, 1)]


def vote(**options: Any) -> dict:
    return {"type": "majority_vote", "vote": {"extract": "whole", **options}}


# ---------------------------------------------------------------- common

@pytest.mark.parametrize("kind", ["concat", "majority_vote", "synthesis", "custom_template", "custom"])
def test_zero_candidates_is_an_error_for_every_kind(kind: str) -> None:
    spec = {"concat": {}, "majority_vote": vote(), "synthesis": {"synthesis_model": "judge"},
            "custom_template": {"template": "x"}, "custom": {"function": "mod:fn"}}[kind]
    with pytest.raises(AggregationError, match="no model answered") as info:
        run({"type": kind, **spec}, [], synthesize=FakeSynthesizer())
    assert isinstance(info.value, ChorusError) and info.value.kind == kind


def test_record_lists_every_input_with_label_model_and_text() -> None:
    record = run({}, cands("a", "b"))
    assert record.kind == "concat"
    assert record.inputs == [{"label": "m1", "model": "model-1", "text": "a"},
                             {"label": "m2", "model": "model-0", "text": "b"}]


# ---------------------------------------------------------------- concat

def test_concat_labels_blocks_and_joins_them_with_the_separator() -> None:
    record = run({"separator": "\n---\n", "label_format": "## {label} ({model})"}, cands("one", "two"))
    assert record.output == "## m1 (model-1)\none\n---\n## m2 (model-0)\ntwo"


def test_concat_default_format_uses_markdown_headings() -> None:
    assert run({}, cands("one", "two")).output == "### m1\none\n\n### m2\ntwo"


def test_concat_of_a_single_answer_is_its_text_without_label() -> None:
    assert run({}, cands("  only answer\n")).output == "  only answer\n"


def test_concat_with_empty_label_format_joins_bare_texts() -> None:
    assert run({"label_format": "", "separator": " | "}, cands("a", "b")).output == "a | b"


def test_concat_label_format_keeps_escaped_braces() -> None:
    assert run({"label_format": "{{{label}}}"}, cands("a", "b")).output == "{m1}\na\n\n{m2}\nb"


@pytest.mark.parametrize("fmt", ["{label.__class__}", "{label[0]}", "{text}", "{label!r}", "{label:>99999}", "{0}",
                                 "{label"])
def test_concat_label_format_refuses_anything_but_plain_label_and_model(fmt: str) -> None:
    with pytest.raises(ValidationError, match="label_format"):  # when the pipeline is loaded, not after the models
        AggregationSpec(label_format=fmt)
    with pytest.raises(AggregationError, match="label_format"):  # a spec built without validation: still refused
        run(AggregationSpec.model_construct(label_format=fmt), cands("a", "b"))


def test_a_malformed_label_format_is_refused_when_the_pipeline_is_built_naming_the_field() -> None:
    from orchestrator.config.schema import PipelineSpec

    with pytest.raises(ValidationError) as err:
        PipelineSpec.model_validate({"stages": [{"name": "a", "models": ["m1", "m2"],
                                                 "aggregation": {"label_format": "{nolabel} {"}}]})
    (error,) = err.value.errors()
    assert error["loc"] == ("stages", 0, "aggregation", "label_format") and "malformed" in error["msg"]


def test_a_pipeline_file_with_a_malformed_label_format_is_refused_with_its_line_and_field(tmp_path: Path) -> None:
    from orchestrator.config.schema import load_pipeline
    from orchestrator.errors import ConfigError

    path = tmp_path / "p.yaml"  # what `chorus run --manual FILE`, the API and the UI's Load read
    path.write_text('stages:\n  - name: a\n    models: [m1, m2]\n    aggregation:\n      label_format: "{nolabel} {"\n')
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert err.value.line == 5 and err.value.field == "stages[0].aggregation.label_format"


# ---------------------------------------------------------------- majority vote

def test_normalise_ignores_case_spacing_and_punctuation_but_keeps_numbers() -> None:
    assert normalise("  The ANSWER:  Paris! ") == "the answer paris"
    assert normalise("don't") == "dont"
    assert normalise("-3.5, or 1,000.") == "-3.5 or 1,000"
    assert normalise("...!?") == ""


def test_majority_vote_groups_exactly_equal_answers_and_outputs_the_winners_full_text() -> None:
    candidates = cands("Reasoning A\n42", "Other\nseven", "Reasoning C\n42.")
    record = run({"type": "majority_vote"}, candidates)  # default extract: last_line
    assert record.output == "Reasoning A\n42"
    details = record.details
    assert details["winner_answer"] == "42" and details["winner_label"] == "m1"
    assert details["groups"] == [
        {"id": 1, "answer": "42", "normalised": "42", "members": ["m1", "m3"], "size": 2},
        {"id": 2, "answer": "seven", "normalised": "seven", "members": ["m2"], "size": 1},
    ]
    assert [v["group"] for v in details["votes"]] == [1, 2, 1]
    assert details["votes"][2] == {"label": "m3", "model": "model-1", "extracted": "42.", "normalised": "42",
                                   "group": 1, "abstained": None}
    assert details["tie"] is False and details["tie_break"] is None
    assert details["agreement"] == pytest.approx(2 / 3)


def test_majority_vote_merges_near_equal_answers_at_the_similarity_threshold() -> None:
    candidates = cands("colour", "Paris", "color", "Colours")
    merged = run(vote(similarity=0.8), candidates).details
    assert merged["groups"][0]["members"] == ["m1", "m3", "m4"] and merged["winner_answer"] == "colour"
    strict = run(vote(similarity=1.0), candidates).details
    assert [g["size"] for g in strict["groups"]] == [1, 1, 1, 1] and strict["tie"] is True


def test_near_equal_groups_merge_into_the_larger_group() -> None:
    groups = group_answers(["colour", "color", "color", "paris"], 0.8)
    assert [(g.normalised, g.members) for g in groups] == [("color", [0, 1, 2]), ("paris", [3])]


def test_majority_vote_regex_uses_the_capture_group_of_the_last_match() -> None:
    candidates = cands("Maybe ANSWER: 40 ... no, ANSWER: 42", "ANSWER: 42", "answer: 7")
    record = run(vote(extract="regex", pattern=r"ANSWER:\s*(\d+)"), candidates)
    assert [v["extracted"] for v in record.details["votes"]] == ["42", "42", None]
    assert record.details["winner_answer"] == "42"


def test_majority_vote_regex_without_groups_uses_the_whole_match() -> None:
    record = run(vote(extract="regex", pattern=r"\d+"), cands("it is 42", "42!", "13"))
    assert record.details["winner_answer"] == "42"


def test_candidates_whose_pattern_does_not_match_abstain_and_do_not_count_for_agreement() -> None:
    candidates = cands("final: B", "no idea", "final: B", "final: C", "")
    details = run(vote(extract="regex", pattern=r"final: (\w)"), candidates).details
    assert [v["abstained"] for v in details["votes"]] == [None, "the pattern did not match", None, None,
                                                          "the pattern did not match"]
    assert details["voters"] == 3 and details["abstained"] == 2
    assert details["agreement"] == pytest.approx(2 / 3)


def test_blank_answers_abstain() -> None:
    details = run(vote(), cands("   ", "yes", "?!")).details
    assert [v["abstained"] for v in details["votes"]] == ["empty answer", None, "empty answer"]
    assert details["agreement"] == 1.0


def test_every_candidate_abstaining_is_an_error_with_the_votes() -> None:
    with pytest.raises(AggregationError, match="abstained") as info:
        run(vote(extract="regex", pattern=r"final: (\w)"), cands("a", "b"))
    assert len(info.value.details["votes"]) == 2


def test_tie_broken_by_first_picks_the_group_of_the_earliest_candidate() -> None:
    record = run(vote(similarity=1.0), cands("blue", "red", "red", "blue"))
    assert record.output == "blue"
    assert record.details["tie"] is True and record.details["tie_break"] == "first"
    assert record.details["agreement"] == 0.5


def test_tie_broken_by_synthesis_asks_the_model_with_the_tied_answers() -> None:
    judge = FakeSynthesizer(reply="I pick: Red.")
    spec = {**vote(similarity=1.0, tie_break="synthesis"), "synthesis_model": "judge"}
    record = run(spec, cands("blue", "Red", "red", "blue", "green"), synthesize=judge)
    assert record.output == "Red"
    assert record.details["tie_break"] == "synthesis" and record.details["tie_break_reply"] == "I pick: Red."
    [(model, prompt)] = judge.calls
    assert model == "judge" and "- blue\n" in prompt and "- Red\n" in prompt and "green" not in prompt
    assert "What is 6 x 7?" in prompt


def test_synthesis_tie_break_falls_back_to_first_when_the_reply_matches_nothing() -> None:
    judge = FakeSynthesizer(reply="purple")
    spec = {**vote(similarity=0.9, tie_break="synthesis"), "synthesis_model": "judge"}
    record = run(spec, cands("blue", "red"), synthesize=judge)
    assert record.output == "blue" and record.details["tie_break"] == "first"
    assert "matched none" in record.details["tie_break_fallback"]


def test_synthesis_tie_break_falls_back_to_first_when_the_model_fails() -> None:
    judge = FakeSynthesizer(error=RequestFailed("judge", "boom"))
    spec = {**vote(tie_break="synthesis"), "synthesis_model": "judge"}
    record = run(spec, cands("blue", "red"), synthesize=judge)
    assert record.output == "blue" and record.details["tie_break"] == "first"
    assert record.details["tie_break_error"]["type"] == "RequestFailed"


def test_no_tie_means_the_tie_break_model_is_not_asked() -> None:
    judge = FakeSynthesizer()
    spec = {**vote(tie_break="synthesis"), "synthesis_model": "judge"}
    run(spec, cands("red", "blue", "red"), synthesize=judge)
    assert judge.calls == []


def test_reply_mapping_prefers_exact_then_similar_then_a_unique_mention() -> None:
    options = ["paris", "lyon"]
    assert match_reply("Lyon", options, 0.85) == 1
    assert match_reply("Answer:\nParis.", options, 0.85) == 0
    assert match_reply("Pariss", options, 0.85) == 0
    assert match_reply("I believe the capital is Paris, clearly.", options, 0.85) == 0
    assert match_reply("Paris or Lyon", options, 0.85) is None


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.text(max_size=30), max_size=8),
       similarity=st.floats(min_value=0, max_value=1),
       extract=st.sampled_from(["whole", "last_line"]))
def test_majority_vote_never_fails_unexpectedly_and_the_winner_has_a_largest_group(
        texts: list[str], similarity: float, extract: str) -> None:
    spec = AggregationSpec(type="majority_vote", vote={"extract": extract, "similarity": similarity})
    candidates = cands(*texts)
    try:
        record = asyncio.run(aggregate(spec, "q", candidates))
    except AggregationError as exc:
        assert not texts or all(not normalise(t) for t in texts), exc
        return
    details = record.details
    sizes = {g["id"]: g["size"] for g in details["groups"]}
    assert sizes[details["winner_group"]] == max(sizes.values())
    assert sum(sizes.values()) == details["voters"]
    assert record.output in texts
    assert 0 < details["agreement"] <= 1


# ---------------------------------------------------------------- synthesis and templates

def test_synthesis_uses_the_default_prompt_listing_question_and_answers() -> None:
    judge = FakeSynthesizer(reply="  42, all agree.\n")
    record = run({"type": "synthesis", "synthesis_model": "judge"}, cands("forty-two", "42"), synthesize=judge)
    assert record.output == "42, all agree."
    [(model, prompt)] = judge.calls
    assert model == "judge"
    assert "What is 6 x 7?" in prompt and "Answer 1 (m1):\nforty-two" in prompt and "Answer 2 (m2):\n42" in prompt
    assert record.details == {"synthesis_model": "judge", "synthesis_prompt": prompt,
                              "synthesis_output": "  42, all agree.\n"}
    assert "{{" not in prompt and DEFAULT_SYNTHESIS_PROMPT.startswith("You are given")


def test_synthesis_renders_a_custom_prompt_with_responses_and_extra_context() -> None:
    judge = FakeSynthesizer()
    spec = {"type": "synthesis", "synthesis_model": "judge",
            "synthesis_prompt": "{{ previous }}|{{ question }}|{% for r in responses %}{{ r.model }}={{ r.text }};"
                                "{% endfor %}"}
    record = run(spec, cands("a", "b"), synthesize=judge, context={"previous": "draft", "question": "ignored"})
    assert judge.calls == [("judge", "draft|What is 6 x 7?|model-1=a;model-0=b;")]
    assert record.details["synthesis_prompt"] == "draft|What is 6 x 7?|model-1=a;model-0=b;"


def test_synthesis_model_failure_is_an_aggregation_error_carrying_the_cause() -> None:
    judge = FakeSynthesizer(error=RequestFailed("judge", "connection reset"))
    with pytest.raises(AggregationError, match="connection reset") as info:
        run({"type": "synthesis", "synthesis_model": "judge"}, cands("a"), synthesize=judge)
    assert info.value.details["synthesis_error"]["type"] == "RequestFailed"


def test_empty_synthesis_reply_is_an_error() -> None:
    with pytest.raises(AggregationError, match="empty"):
        run({"type": "synthesis", "synthesis_model": "judge"}, cands("a"), synthesize=FakeSynthesizer(reply=" \n"))


def test_synthesis_prompt_reaching_internals_is_an_aggregation_error_from_the_sandbox() -> None:
    spec = {"type": "synthesis", "synthesis_model": "judge", "synthesis_prompt": "{{ responses.__class__ }}"}
    with pytest.raises(AggregationError, match="refused by the sandbox") as info:
        run(spec, cands("a"), synthesize=FakeSynthesizer())
    assert info.value.details["template_error"]["where"] == "synthesis prompt"


def test_custom_template_renders_responses_and_context_and_strips_the_result() -> None:
    spec = {"type": "custom_template",
            "template": "\n{% for r in responses %}[{{ r.label }}] {{ r.text }}\n{% endfor %}{{ note }}\n"}
    record = run(spec, cands("a", "b"), context={"note": "done"})
    assert record.output == "[m1] a\n[m2] b\ndone"
    assert record.details == {"template": spec["template"]}


def test_custom_template_runtime_error_names_the_aggregation_template() -> None:
    with pytest.raises(AggregationError, match="aggregation template, line 2"):
        run({"type": "custom_template", "template": "ok\n{{ 1 / 0 }}"}, cands("a"))


# ---------------------------------------------------------------- custom functions

SYNC_MODULE = '''
def longest(question, responses):
    return max(responses, key=lambda r: len(r["text"]))["text"]

def with_details(question, responses):
    return {"output": question + " " + str(len(responses)), "details": {"labels": [r["label"] for r in responses]}}

def raises(question, responses):
    raise ValueError("bad input")

def not_text(question, responses):
    return 42

def bad_details(question, responses):
    return {"output": "x", "details": {"obj": object()}}
'''

ASYNC_MODULE = '''
import asyncio

async def pick_last(question, responses):
    await asyncio.sleep(0)
    return responses[-1]["text"]
'''


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "aggregators").mkdir()
    (tmp_path / "aggregators" / "merge.py").write_text(SYNC_MODULE)
    (tmp_path / "aggregators" / "amerge.py").write_text(ASYNC_MODULE)
    return tmp_path


def custom(function: str) -> dict:
    return {"type": "custom", "function": function}


def test_custom_sync_function_is_loaded_from_the_aggregators_folder(config_dir: Path) -> None:
    had_merge = "merge" in sys.modules
    record = run(custom("merge:longest"), cands("short", "the longest one", "mid"), config_dir=config_dir)
    assert record.output == "the longest one"
    source = str((config_dir / "aggregators" / "merge.py").resolve())
    assert record.details == {"function": "merge:longest", "source": source}
    assert ("merge" in sys.modules) == had_merge  # loaded under a private name


def test_custom_async_function_is_loaded_from_the_aggregators_folder(config_dir: Path) -> None:
    record = run(custom("amerge:pick_last"), cands("a", "b"), config_dir=config_dir)
    assert record.output == "b"


def test_custom_function_may_return_output_with_details(config_dir: Path) -> None:
    record = run(custom("merge:with_details"), cands("a", "b"), config_dir=config_dir)
    assert record.output == "What is 6 x 7? 2"
    assert record.details["function_details"] == {"labels": ["m1", "m2"]}


def test_custom_function_raising_is_an_aggregation_error_naming_function_and_error(config_dir: Path) -> None:
    with pytest.raises(AggregationError, match=r"'merge:raises' raised ValueError: bad input"):
        run(custom("merge:raises"), cands("a"), config_dir=config_dir)


@pytest.mark.parametrize(("function", "message"), [
    ("merge:not_text", "returned int, not a str"),
    ("merge:bad_details", "not JSON-safe"),
    ("merge:missing", "could not load function 'merge:missing': AttributeError"),
    ("nosuchmodule_xyz:fn", "'nosuchmodule_xyz:fn' is not an allowed aggregator"),
])
def test_custom_function_problems_are_aggregation_errors(config_dir: Path, function: str, message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        run(custom(function), cands("a"), config_dir=config_dir)


def test_custom_module_with_a_syntax_error_is_an_aggregation_error(tmp_path: Path) -> None:
    (tmp_path / "aggregators").mkdir()
    (tmp_path / "aggregators" / "broken.py").write_text("def f(:\n")
    with pytest.raises(AggregationError, match="SyntaxError"):
        run(custom("broken:f"), cands("a"), config_dir=tmp_path)


def test_custom_module_is_reloaded_when_its_file_changes(tmp_path: Path) -> None:
    (tmp_path / "aggregators").mkdir()
    module = tmp_path / "aggregators" / "edit.py"
    module.write_text("def f(question, responses):\n    return 'v1'\n")
    assert run(custom("edit:f"), cands("a"), config_dir=tmp_path).output == "v1"
    module.write_text("def f(question, responses):\n    return 'version2'\n")
    assert run(custom("edit:f"), cands("a"), config_dir=tmp_path).output == "version2"


def test_custom_function_from_an_installed_module_the_operator_listed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "app.yaml").write_text("aggregators:\n  allowed: [chorus_test_plugins.votes:upper_first]\n")
    package = tmp_path / "site" / "chorus_test_plugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "votes.py").write_text(textwrap.dedent('''
        def upper_first(question, responses):
            return responses[0]["text"].upper()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("chorus_test_plugins", "chorus_test_plugins.votes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    record = run(custom("chorus_test_plugins.votes:upper_first"), cands("abc", "def"), config_dir=tmp_path)
    assert record.output == "ABC" and record.details["source"].startswith("module chorus_test_plugins.votes")


def test_vote_pattern_search_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from orchestrator.config.schema import VoteOptions
    from orchestrator.engine import aggregation

    extract_answer = aggregation.extract_answer
    extract_answer("a", VoteOptions(extract="regex", pattern="a"))  # the regex engine is imported on first use
    monkeypatch.setattr(aggregation, "VOTE_REGEX_TIMEOUT_S", 0.2)  # the limit is tested, not its length (1 s)
    started = time.monotonic()
    with pytest.raises(AggregationError, match=r"took longer than 0\.2 s"):
        extract_answer("a" * 40 + "b", VoteOptions(extract="regex", pattern="(a|aa)+$"))
    assert time.monotonic() - started < 0.2 + 1.5


def test_allowed_functions_lists_public_functions_of_aggregator_files_only(tmp_path: Path) -> None:
    from orchestrator.config.aggregators import allowed_functions

    folder = tmp_path / "aggregators"
    (folder / "team").mkdir(parents=True)
    (folder / "votes.py").write_text("def pick(question, responses): ...\ndef _hidden(): ...\nx = 1\n")
    (folder / "team" / "merge.py").write_text("async def join(question, responses): ...\n")
    (folder / "_private.py").write_text("def f(): ...\n")
    (folder / "broken.py").write_text("def f(:\n")
    (tmp_path / "merge.py").write_text("def beside_app_yaml(): ...\n")
    names = [f.name for f in allowed_functions(tmp_path, ["pkg.mod:fn"])]
    assert names == ["pkg.mod:fn", "team.merge:join", "votes:pick"]
