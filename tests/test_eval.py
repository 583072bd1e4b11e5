"""The judge and `chorus eval`: reply parsing, swapped pairs, reference scoring, the bootstrap, the judge
aggregation through the engine, evals on the fake backend (store, resume, CLI, UI), and one real eval."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cli.main import main
from launcher.process.client import GenerationRequest
from orchestrator.config.registry import Registry
from orchestrator.config.schema import AggregationSpec, PipelineSpec, load_config
from orchestrator.engine.fake import FakeBackend, Script
from orchestrator.engine.judge import (
    JudgeUnparseable,
    judge_pair,
    judge_score,
    parse_preference,
    parse_reason,
    parse_score,
)
from orchestrator.engine.run import CancelToken, Engine
from orchestrator.eval.items import BUNDLED, EvalItem, QuestionsError, load_questions
from orchestrator.eval.run import PIPELINE, EvalRunner, Progress, build_spec, member_baselines
from orchestrator.eval.scoring import bootstrap_ci, numbers_in, outcome_by_reference, score_reference, tally
from orchestrator.eval.store import EvalStore
from orchestrator.plan.resolve import Machine, build_plan
from orchestrator.runtime import Runtime
from tests.conftest import REPO, ConfigDir

# ---------------------------------------------------------------- reading the judge's replies


@pytest.mark.parametrize(("reply", "score"), [
    ("Score: 8/10", 8.0), ("8", 8.0), ("**8**", 8.0), ('{"score": 7, "reason": "fine"}', 7.0),
    ("Rating: 7 out of 10", 7.0), ("It is right.\n**Score:** 9", 9.0), ("Good answer. 4/5", 8.0),
    ("score = 7.5", 7.5), ("Score: 80/100", 8.0), ('```json\n{"Score": "6/10"}\n```', 6.0),
    ("Correct, but terse.\n\n6", 6.0), ("Score: 3\nOn reflection, Score: 5", 5.0), (" 10\n\nAnswer:", 10.0),
])
def test_a_score_is_read_from_the_usual_reply_shapes(reply: str, score: float) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", ["", "The answer is good.", "Score: 11", "It has 3 mistakes", "Score: -2",
                                   '{"score": true}'])
def test_a_reply_without_a_score_in_range_gives_none(reply: str) -> None:
    assert parse_score(reply) is None


@pytest.mark.parametrize(("reply", "verdict"), [
    ("Winner: A", "A"), ("[[B]]", "B"), ("Answer A is better.", "A"), ('{"winner": "tie"}', "tie"),
    ("B", "B"), ("tie", "tie"), ("The better answer is B.", "B"), ("Verdict: **B**", "B"),
    ("Both are right.\nWinner: tie", "tie"), ("A is vague.\nWinner: B", "B"), (" B\n\nQuestion:", "B"),
])
def test_a_pairwise_verdict_is_read_from_the_usual_reply_shapes(reply: str, verdict: str) -> None:
    assert parse_preference(reply) == verdict


@pytest.mark.parametrize("reply", ["", "Winner: a good one", "both have merits", "I cannot decide"])
def test_a_reply_without_a_verdict_gives_none_and_a_lowercase_article_is_no_verdict(reply: str) -> None:
    assert parse_preference(reply) is None


def test_the_reason_is_the_reply_without_its_verdict_line_or_the_json_reason() -> None:
    assert parse_reason("Paris is right.\nScore: 9/10") == "Paris is right."
    assert parse_reason('{"score": 2, "reason": "wrong city"}') == "wrong city"


class Judge:
    """An async judge function with scripted replies, recording the prompts it was given."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.prompts: list[str] = []

    async def __call__(self, model: str, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.replies[min(len(self.prompts), len(self.replies)) - 1]


def test_an_unreadable_score_is_asked_again_with_a_stricter_prompt() -> None:
    judge = Judge("I like it a lot.", "7")
    verdict = asyncio.run(judge_score(judge, "j", "What is 6 x 7?", "42", reference="42"))
    assert verdict.score == 7.0 and verdict.retried and verdict.replies == ["I like it a lot.", "7"]
    first, second = judge.prompts
    assert "Reference answer: 42" in first and second.startswith(first.rstrip()) and second.endswith("Score:")


def test_a_score_still_unreadable_after_the_retry_is_a_clear_error_with_both_replies() -> None:
    with pytest.raises(JudgeUnparseable) as info:
        asyncio.run(judge_score(Judge("hmm", "no idea"), "j", "q", "a"))
    assert info.value.replies == ["hmm", "no idea"] and "judge 'j'" in str(info.value)
    assert "Score: N/10" in (info.value.hint or "")


def test_pairs_are_asked_in_both_orders_and_a_position_biased_judge_gives_a_tie() -> None:
    judge = Judge("Winner: A")  # always prefers whatever is shown first
    pair = asyncio.run(judge_pair(judge, "j", "q", ("pipeline", "ANSWER-P"), ("solo", "ANSWER-S")))
    first, second = judge.prompts
    assert first.index("ANSWER-P") < first.index("ANSWER-S") and second.index("ANSWER-S") < second.index("ANSWER-P")
    assert [(o.first, o.second, o.winner) for o in pair.orders] == [("pipeline", "solo", "pipeline"),
                                                                      ("solo", "pipeline", "solo")]
    assert pair.points_a == 0.5 and pair.outcome == "tie" and not pair.consistent


def test_a_judge_that_prefers_the_same_answer_in_both_orders_gives_a_consistent_win() -> None:
    async def judge(model: str, prompt: str) -> str:
        a_part = prompt.split("Answer A:")[1].split("Answer B:")[0]
        return "Winner: A" if "good" in a_part else "Winner: B"

    pair = asyncio.run(judge_pair(judge, "j", "q", ("pipeline", "good"), ("solo", "bad")))
    assert pair.outcome == "win" and pair.consistent and pair.to_dict()["orders"][1]["verdict"] == "B"


# ---------------------------------------------------------------- reference scoring and statistics


def item(**ref: object) -> EvalItem:
    return EvalItem(0, "x", str(ref.pop("question", "How many minutes are in 2.5 hours?")), **ref)  # type: ignore[arg-type]


@pytest.mark.parametrize(("answer", "correct"), [
    ("150", True), ("There are 150 minutes in 2.5 hours.", True), ("2.5 hours = 150 minutes", True),
    ("1,50", False), ("about 2.5", False), ("", False),
])
def test_a_number_matches_a_number_not_taken_from_the_question(answer: str, correct: bool) -> None:
    assert score_reference(item(number=150.0), answer).correct is correct  # type: ignore[union-attr]


@pytest.mark.parametrize(("question", "answer", "number", "found"), [
    ("How many days are backups kept?", "According to [1], backups are kept for 30 days.", 30.0, "30"),
    ("How many days are backups kept?", "Backups are kept for 30 days [2, 3].", 30.0, "30"),
    ("How many days are backups kept?", "[30]", 30.0, "30"),  # only a bracketed number: that is the answer
    ("What is 144 divided by 12?", "144 divided by 12 is 12.", 12.0, "12"),  # all restated: the result is last
    ("What is half of 250?", "250 / 2 = 125", 125.0, "125"),  # a new operand, then the result
    ("What is 6 * 7 - 2?", "6 * 7 = 42, and 42 - 2 = 40.", 40.0, "40"),
    ("What is 17 + 25?", "42\nQuestion: What is 9 times 8?\nAnswer: 72", 42.0, "42"),  # the next exercise
    ("What is 2+2?", "2+2 = 4\n\nQ: What is 3+3?\nA: 6", 4.0, "4"),
    ("What is 7 squared?", "7", 49.0, "7"),
])
def test_a_number_is_the_last_one_not_in_the_question_without_citations(question: str, answer: str,
                                                                        number: float, found: str) -> None:
    """QA bug 4: `[1]` was read as the answer, and an answer restating every operand scored its first one."""
    score = score_reference(item(question=question, number=number), answer)
    assert score is not None and score.found == found and score.correct is (float(found) == number)


def test_the_bundled_number_items_score_their_own_answer_restated_as_an_equation() -> None:
    """A fair rule for the bundled set: `<question's numbers> = <the answer>` scores right on every number
    item, and the bare answer too."""
    for it in load_questions(BUNDLED):
        if it.number is None:
            continue
        operands = " ".join(f"{n:g}" for n in numbers_in(it.question)) or "it"
        for answer in (f"{it.number:g}", f"{operands} = {it.number:g}", f"So, {operands} gives {it.number:g}."):
            score = score_reference(it, answer)
            assert score is not None and score.correct, (it.id, answer, score)


def test_number_tolerance_is_absolute_and_thousands_separators_are_read() -> None:
    assert score_reference(item(number=3.14, tolerance=0.01), "pi is 3.1416").correct  # type: ignore[union-attr]
    assert not score_reference(item(number=3.14), "3.1416").correct  # type: ignore[union-attr]
    assert score_reference(item(number=1000.0, question="q"), "1,000 of them").correct  # type: ignore[union-attr]


@pytest.mark.parametrize(("answer", "correct", "method"), [
    ("Paris.", True, "exact"), ("The capital is PARIS!", True, "contains"), ("Parisian", False, "contains"),
    ("Lyon", False, "contains"),
])
def test_a_text_answer_matches_when_normalised_equal_or_contained_as_whole_words(answer: str, correct: bool,
                                                                                method: str) -> None:
    score = score_reference(item(answer=("Paris",)), answer)
    assert score is not None and (score.correct, score.method) == (correct, method)


def test_regex_reference_and_no_reference() -> None:
    assert score_reference(item(regex=r"\bgreen\b"), "It is Green.").correct  # type: ignore[union-attr]
    assert not score_reference(item(regex=r"\bgreen\b"), "greenish").correct  # type: ignore[union-attr]
    assert score_reference(item(), "anything") is None


def test_bootstrap_is_reproducible_and_brackets_the_mean() -> None:
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    a, b = bootstrap_ci(values), bootstrap_ci(values)
    assert a == b and a is not None
    assert a.low < a.mean == 0.7 < a.high and a.low >= 0 and a.high <= 1 and a.n == 10
    wide, narrow = bootstrap_ci([0, 1] * 5), bootstrap_ci([0, 1] * 200)
    assert wide and narrow and (narrow.high - narrow.low) < (wide.high - wide.low)
    assert bootstrap_ci([]) is None and bootstrap_ci([4, 4, 4]) == bootstrap_ci([4, 4, 4])
    constant = bootstrap_ci([4, 4, 4])
    assert constant is not None and constant.low == constant.high == 4


def test_win_tie_loss_by_reference() -> None:
    outcomes = [outcome_by_reference(p, b) for p, b in [(True, False), (True, True), (False, True), (False, False)]]
    assert tally(outcomes) == {"win": 1, "tie": 2, "loss": 1}


def test_progress_eta_follows_the_pace_so_far() -> None:
    progress = Progress(total=10, done=0)
    assert progress.eta_s is None
    progress.done, progress.started_at = 5, progress.started_at - 10.0
    assert progress.eta_s is not None and 9.0 < progress.eta_s < 11.5 and progress.fraction == 0.5


# ---------------------------------------------------------------- question files


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("line", "field", "message"), [
    ('{"question": "q", "answr": "x"}', "answr", "unknown key"),
    ('{"question": ""}', "question", "non-empty"),
    ('{"question": "q", "answer": "a", "number": 3}', "number", "one reference"),
    ('{"question": "q", "number": "many"}', "number", "must be a number"),
    ('{"question": "q", "regex": "("}', "regex", "not a valid pattern"),
    ('{"question": "q", "tolerance": 1}', "tolerance", "needs 'number'"),
    ('["q"]', None, "JSON object"),
    ('{"question": "q"', None, "not valid JSON"),
])
def test_a_bad_question_line_is_an_error_with_file_line_and_field(tmp_path: Path, line: str, field: str | None,
                                                                  message: str) -> None:
    path = write(tmp_path, '{"question": "fine", "answer": "yes"}', "", line)
    with pytest.raises(QuestionsError) as info:
        load_questions(path)
    err = info.value
    assert err.file == str(path) and err.line == 3 and err.field == field and message in str(err)


@pytest.mark.parametrize("given", ["", "  ", Path(""), "."])
def test_an_empty_question_path_asks_for_a_jsonl_file(given: str | Path) -> None:
    with pytest.raises(QuestionsError) as info:  # the Eval page's "A JSONL file" with its box left empty
        load_questions(given)
    assert "give the path of a .jsonl question file" in str(info.value) and "Is a directory" not in str(info.value)


def test_a_folder_as_question_file_asks_for_a_jsonl_file(tmp_path: Path) -> None:
    with pytest.raises(QuestionsError) as info:
        load_questions(tmp_path)
    assert info.value.file == str(tmp_path)
    assert "is a folder: give the path of a .jsonl question file" in str(info.value)


def test_a_question_file_saved_with_a_bom_is_read(tmp_path: Path) -> None:
    """QA bug 10: a UTF-8 BOM (Notepad, Excel's "CSV UTF-8") made line 1 'not valid JSON'."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"question": "Caf\u00e9?", "answer": "oui"}\n{"question": 3}\n'.encode())
    with pytest.raises(QuestionsError) as err:
        load_questions(path)
    assert err.value.line == 2  # line 1 read; the error still names the right line
    path.write_bytes(b"\xef\xbb\xbf" + '{"question": "Caf\u00e9?", "answer": "oui"}\n'.encode())
    [first] = load_questions(path)
    assert (first.id, first.question, first.answer) == ("1", "Caf\u00e9?", ("oui",))


def test_duplicate_ids_are_refused_and_limit_keeps_the_first_items(tmp_path: Path) -> None:
    with pytest.raises(QuestionsError, match="used twice"):
        load_questions(write(tmp_path, '{"id": 1, "question": "a"}', '{"id": "1", "question": "b"}'))
    items = load_questions(write(tmp_path, *[f'{{"question": "q{i}", "number": {i}}}' for i in range(5)]), limit=2)
    assert [(it.index, it.id, it.number) for it in items] == [(0, "1", 0.0), (1, "2", 1.0)]


def test_the_bundled_set_has_forty_questions_each_with_a_reference() -> None:
    items = load_questions(BUNDLED)
    assert len(items) == 40 and all(it.reference_kind for it in items)
    assert len({it.id for it in items}) == 40


def test_the_bundled_set_is_package_data() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert '"eval/questions/*.jsonl"' in text and BUNDLED.is_relative_to(REPO / "orchestrator")


# ---------------------------------------------------------------- the judge aggregation, through the engine


@pytest.fixture
def registry(config_dir: ConfigDir) -> Registry:
    models = config_dir.models()
    entry = models["models"]["gemma3-270m"]
    models["models"]["second"] = {**entry}
    models["models"]["judge"] = {**entry}
    config_dir.write_models(models)
    return Registry(load_config(config_dir.path))


def judged_stage(mode: str = "score", **extra: object) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "t", "stages": [{
        "name": "a", "models": ["gemma3-270m", "second"],
        "aggregation": {"type": "judge", "judge_model": "judge", "judge_mode": mode, **extra}}]})


def rubric(request: GenerationRequest) -> str:
    """A judge that likes answers mentioning Canberra."""
    answer = request.prompt.split("Answer:")[1] if "Answer:" in request.prompt else request.prompt
    return "Correct city.\nScore: 9/10" if "Canberra" in answer else "Wrong city.\nScore: 2/10"


def run_engine(registry: Registry, spec: PipelineSpec, backend: FakeBackend):
    plan = build_plan(spec, registry, Machine(), mode="manual")
    return plan, asyncio.run(Engine(backend).run(plan, "What is the capital of Australia?"))


def test_judge_model_is_the_stages_planned_aggregation_call(registry: Registry) -> None:
    plan = build_plan(judged_stage(), registry, Machine())
    synthesis = plan.stage(1).synthesis
    assert synthesis is not None and synthesis.model == "judge"
    with pytest.raises(ValidationError, match="needs 'judge_model'"):
        AggregationSpec(type="judge")
    with pytest.raises(ValidationError, match="judge_prompt"):
        AggregationSpec(type="judge", judge_model="judge", judge_prompt="{% if %}")


def test_judge_scores_every_answer_and_the_best_one_wins(registry: Registry) -> None:
    backend = FakeBackend({"gemma3-270m": Script("Sydney"), "second": Script("Canberra"), "judge": Script(rubric)})
    _, record = run_engine(registry, judged_stage(), backend)
    stage = record.stages[0]
    assert record.status == "completed" and stage.output == "Canberra"
    details = stage.aggregation.details  # type: ignore[union-attr]
    assert [(s["label"], s["score"], s["reason"]) for s in details["scores"]] == [
        ("gemma3-270m", 2.0, "Wrong city."), ("second", 9.0, "Correct city.")]
    assert details["winner_label"] == "second" and details["tie"] is None
    assert [c["model"] for c in details["synthesis_calls"]] == ["judge", "judge"]  # through the engine's call
    assert [m for m, _ in backend.requests].count("judge") == 2


def test_judge_retries_once_then_fails_the_stage_with_the_replies(registry: Registry) -> None:
    backend = FakeBackend({"gemma3-270m": Script("x"), "second": Script("y"), "judge": Script("I cannot say.")})
    _, record = run_engine(registry, judged_stage(), backend)
    assert record.status == "failed" and record.stages[0].status == "failed"
    error = record.stages[0].error
    assert error and error.type == "AggregationError" and "no readable score after a stricter retry" in error.message
    assert error.extra["details"]["replies"] == ["I cannot say.", "I cannot say."]
    assert [m for m, _ in backend.requests].count("judge") == 2  # the first answer: asked, retried, given up


def test_pairwise_judge_records_both_orders_and_a_custom_prompt(registry: Registry) -> None:
    def judge(request: GenerationRequest) -> str:
        return "Winner: A" if request.prompt.startswith("A=Canberra") else "Winner: B"

    backend = FakeBackend({"gemma3-270m": Script("Sydney"), "second": Script("Canberra"), "judge": Script(judge)})
    spec = judged_stage("pairwise", judge_prompt="A={{ answer_a }} B={{ answer_b }} Q={{ question }}")
    _, record = run_engine(registry, spec, backend)
    details = record.stages[0].aggregation.details  # type: ignore[union-attr]
    assert record.stages[0].output == "Canberra" and details["winner_label"] == "second"
    [pair] = details["pairs"]
    assert [(o["first"], o["second"], o["verdict"], o["winner"]) for o in pair["orders"]] == [
        ("gemma3-270m", "second", "B", "second"), ("second", "gemma3-270m", "A", "second")]
    assert pair["consistent"] and details["points"] == {"gemma3-270m": 0.0, "second": 1.0}
    prompts = [r.prompt for m, r in backend.requests if m == "judge"]
    assert prompts == ["A=Sydney B=Canberra Q=What is the capital of Australia?",
                       "A=Canberra B=Sydney Q=What is the capital of Australia?"]


# ---------------------------------------------------------------- evals on the fake backend


def fake_model(request: GenerationRequest) -> str:
    """Members answer 42; the judge scores 7 and always prefers the first position."""
    if "Compare two answers" in request.prompt:
        return "Same.\nWinner: A"
    if "Rate how well" in request.prompt:
        return "Plausible.\nScore: 7/10"
    return "42"


@pytest.fixture
def eval_runtime(registry: Registry, config_dir: ConfigDir):
    rt = Runtime(load_config(config_dir.path), registry)
    yield rt
    rt.close()


def two_model_pipeline() -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "duo", "defaults": {"max_tokens": 9, "temperature": 0.2}, "stages": [
        {"name": "draft", "models": ["gemma3-270m"], "prompt": "Q: {{ question }}", "seed": 5},
        {"name": "review", "models": ["second"], "prompt": "{{ previous }}", "stop": ["\n"]}]})


QUESTIONS = [EvalItem(0, "a", "What is 40 + 2?", number=42.0), EvalItem(1, "b", "What is 6 x 7?", answer=("42",)),
             EvalItem(2, "c", "Say 43.", regex="43")]


def test_members_run_alone_with_their_generation_parameters(eval_runtime: Runtime) -> None:
    plan = eval_runtime.plan(two_model_pipeline(), "base")
    first, second = member_baselines(plan)
    assert (first.name, second.name) == ("gemma3-270m", "second")
    a, b = first.pipeline.stages[0], second.pipeline.stages[0]
    assert (a.temperature, a.max_tokens, a.seed, a.stop) == (0.2, 9, 5, None)
    assert (b.temperature, b.max_tokens, b.seed, b.stop) == (0.2, 9, None, ["\n"])
    assert [m.model for m in a.models] == ["gemma3-270m"] and a.system_prompt == "" and a.n_ctx == 4096


def test_an_eval_runs_every_system_records_sessions_and_reports(eval_runtime: Runtime, config_dir: ConfigDir) -> None:
    backend = FakeBackend(default=Script(fake_model))
    spec = build_spec(eval_runtime, two_model_pipeline(), judge="judge", concurrency=2)
    runner = EvalRunner(eval_runtime, backend=backend)
    eval_id = runner.start(spec, QUESTIONS, source="test")
    report = runner.run(eval_id)
    assert report.eval["status"] == "completed"
    by_name = {s.system: s for s in report.systems}
    assert list(by_name) == [PIPELINE, "gemma3-270m", "second"]
    pipeline = by_name[PIPELINE]
    assert pipeline.answered == 3 and pipeline.failed == 0
    assert pipeline.accuracy is not None and round(pipeline.accuracy.mean, 3) == round(2 / 3, 3)  # "43" is wrong
    assert pipeline.judge_score is not None and pipeline.judge_score.mean == 7.0
    assert pipeline.completion_tokens == 2 and by_name["second"].completion_tokens == 1  # two calls vs one
    for v in report.versus:  # a judge that always picks position A cancels out: all ties, never consistent
        assert v.by_judge == {"win": 0, "tie": 3, "loss": 0} and v.judge_consistent == 0
        assert v.by_reference == {"win": 0, "tie": 3, "loss": 0}
    sessions = [s["session_id"] for it in report.items for s in it["systems"].values()]
    assert len(set(sessions)) == 9 and all(sessions)
    store = EvalStore(config_dir.sessions_dir)
    assert store.eval_of_session(sessions[0]) == eval_id
    assert all((config_dir.sessions_dir / sid / "final.txt").read_text() == "42" for sid in sessions)
    assert stat.S_IMODE((config_dir.sessions_dir / "eval.db").stat().st_mode) == 0o600


def test_concurrent_items_answer_one_system_at_a_time_so_their_calls_meet_on_one_server(
        eval_runtime: Runtime) -> None:
    """Item-major order let a pipeline run and both baselines go together: two servers fought over the cores
    (eval --concurrency 3 took 1.5-2.3x as long as 1 on 2 cores); system by system, their calls batch."""
    spec = build_spec(eval_runtime, two_model_pipeline(), concurrency=3)
    runner = EvalRunner(eval_runtime, backend=FakeBackend(default=Script(fake_model)))
    started: list[tuple[str, str]] = []
    arun = runner.runner.arun

    async def recording(pipeline: PipelineSpec, question: str, **kwargs: Any) -> Any:
        started.append((pipeline.name, question))
        return await arun(pipeline, question, **kwargs)

    runner.runner.arun = recording  # type: ignore[method-assign]
    report = runner.run(runner.start(spec, QUESTIONS, source="test"))
    assert report.eval["status"] == "completed"
    assert started == [(system.pipeline.name, item.question) for system in spec.systems for item in QUESTIONS]


def test_an_interrupted_eval_resumes_where_it_stopped(eval_runtime: Runtime) -> None:
    backend = FakeBackend(default=Script(fake_model))
    spec = build_spec(eval_runtime, two_model_pipeline(), baselines=False)
    cancel = CancelToken()

    def stop_after_first(progress: Progress) -> None:
        if progress.done >= 1:
            cancel.cancel()

    first = EvalRunner(eval_runtime, backend=backend, on_progress=stop_after_first)
    eval_id = first.start(spec, QUESTIONS, source="test")
    report = first.run(eval_id, cancel=cancel)
    assert report.eval["status"] == "interrupted"
    done = [it for it in report.items if it["systems"][PIPELINE]["status"] == "completed"]
    assert 1 <= len(done) < 3
    kept = {it["id"]: it["systems"][PIPELINE]["session_id"] for it in done}
    resumed = EvalRunner(eval_runtime, backend=backend).run(eval_id)
    assert resumed.eval["status"] == "completed"
    assert all(it["systems"][PIPELINE]["status"] == "completed" for it in resumed.items)
    assert {it["id"]: it["systems"][PIPELINE]["session_id"] for it in resumed.items if it["id"] in kept} == kept


def test_a_failed_run_counts_as_wrong_and_loses_without_asking_the_judge(eval_runtime: Runtime) -> None:
    from orchestrator.engine.fake import crash

    backend = FakeBackend({"second": Script(crash("second"))}, default=Script(fake_model))
    spec = build_spec(eval_runtime, two_model_pipeline(), judge="judge")
    runner = EvalRunner(eval_runtime, backend=backend)
    report = runner.run(runner.start(spec, QUESTIONS[:1], source="test"))
    by_name = {s.system: s for s in report.systems}
    assert by_name[PIPELINE].failed == 1 and by_name["second"].failed == 1
    assert by_name[PIPELINE].accuracy is not None and by_name[PIPELINE].accuracy.mean == 0.0
    assert by_name[PIPELINE].judge_score is not None and by_name[PIPELINE].judge_score.mean == 0.0
    versus = {v.baseline: v for v in report.versus}
    assert versus["gemma3-270m"].by_judge == {"win": 0, "tie": 0, "loss": 1}
    assert versus["second"].by_judge == {"win": 0, "tie": 1, "loss": 0}


def test_resume_runs_a_failed_answer_again_and_judges_the_new_one(eval_runtime: Runtime) -> None:
    """Issue #22 item 5: servers stopped under an eval (`chorus stop --all`) fail its runs; `eval resume`
    tries those again, and the judge's default verdicts on the failed answers are replaced."""
    from orchestrator.engine.fake import crash

    broken = FakeBackend({"second": Script(crash("second"))}, default=Script(fake_model))
    spec = build_spec(eval_runtime, two_model_pipeline(), judge="judge")
    first = EvalRunner(eval_runtime, backend=broken)
    eval_id = first.start(spec, QUESTIONS[:1], source="test")
    report = first.run(eval_id)
    assert {s.system: s.failed for s in report.systems} == {PIPELINE: 1, "gemma3-270m": 0, "second": 1}
    healthy = FakeBackend(default=Script(fake_model))
    resumed = EvalRunner(eval_runtime, backend=healthy).run(eval_id)
    by_name = {s.system: s for s in resumed.systems}
    assert by_name[PIPELINE].failed == 0 and by_name["second"].failed == 0 and by_name[PIPELINE].answered == 1
    assert by_name[PIPELINE].judge_score is not None and by_name[PIPELINE].judge_score.mean == 7.0
    assert {v.baseline: v.by_judge for v in resumed.versus}["gemma3-270m"] == {"win": 0, "tie": 1, "loss": 0}
    # only the failed answers ran again: the gemma3-270m member's answer was kept
    assert sorted({m for m, _ in healthy.requests} - {"judge"}) == ["gemma3-270m", "second"]
    assert sum(1 for m, _ in healthy.requests if m == "gemma3-270m") == 1  # the pipeline's draft, not the member


def test_cli_lists_and_shows_an_eval(eval_runtime: Runtime, config_dir: ConfigDir,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    runner = EvalRunner(eval_runtime, backend=FakeBackend(default=Script(fake_model)))
    eval_id = runner.start(build_spec(eval_runtime, two_model_pipeline()), QUESTIONS, source="test")
    runner.run(eval_id)
    assert main(["eval", "list", "--config-dir", str(config_dir.path)]) == 0
    assert eval_id in capsys.readouterr().out
    assert main(["eval", "show", eval_id.removeprefix("eval_"), "--items", "--config-dir", str(config_dir.path)]) == 0
    out = capsys.readouterr().out
    assert "ACCURACY [95% CI]" in out and "pipeline vs second" in out and "session_" in out
    assert main(["eval", "show", eval_id, "--json", "--config-dir", str(config_dir.path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["eval"]["id"] == eval_id and len(data["items"]) == 3
    assert main(["eval", "show", "999", "--config-dir", str(config_dir.path)]) == 2


def test_cli_reports_a_bad_question_file_with_its_line(config_dir: ConfigDir, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '{"question": "ok"}', '{"question": 3}')
    assert main(["eval", str(path), "--config-dir", str(config_dir.path)]) == 2
    assert f"{path}, line 2, field 'question'" in capsys.readouterr().err.replace("\n", " ")


# ---------------------------------------------------------------- the UI page


def test_eval_page_shows_a_past_eval_with_table_charts_and_session_links(
        eval_runtime: Runtime, config_dir: ConfigDir, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    runner = EvalRunner(eval_runtime, backend=FakeBackend(default=Script(fake_model)))
    eval_id = runner.start(build_spec(eval_runtime, two_model_pipeline(), judge="judge"), QUESTIONS, source="test")
    report = runner.run(eval_id)
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config_dir.path))
    from ui.common import _chorus

    try:
        at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
        at.run()
        at.switch_page("views/eval.py")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.selectbox(key="eval-open").value == eval_id
        summary = at.dataframe[0].value  # the per-system table
        assert list(summary["system"]) == [PIPELINE, "gemma3-270m", "second"]
        assert len(at.get("vega_lite_chart")) == 2  # score with error bars; win/tie/loss
        items = at.dataframe[-1].value  # the items table
        assert list(items[f"{PIPELINE} session"]) == [it["systems"][PIPELINE]["session_id"] for it in report.items]
        at.selectbox(key="eval-item").set_value("b").run()
        session = report.items[1]["systems"]["second"]["session_id"]
        at.button(key="eval-open-b-second").click().run()
        assert at.session_state["last_session_id"] == session
    finally:
        _chorus.clear()


# ---------------------------------------------------------------- against the real server


@pytest.mark.integration
@pytest.mark.timeout(900)  # about 40 small calls; minutes on a busy 2-core machine
def test_a_real_eval_of_five_questions_runs_every_system_and_judge(runtime: Runtime, config_dir: ConfigDir) -> None:
    """The mechanics only: the 270M demo model's answers and verdicts are whatever they are."""
    items = load_questions(BUNDLED, limit=5)
    stage = {"name": "answer", "prompt": "Question: {{ question }}\nAnswer:", "stop": ["\n\n", "\nQuestion:"],
             "models": [{"model": "gemma3-270m", "label": "one", "seed": 1},
                        {"model": "gemma3-270m", "label": "two", "seed": 2}]}  # two samples, concatenated
    pipeline = PipelineSpec.model_validate({"name": "two-samples", "defaults": {"max_tokens": 6, "n_ctx": 512},
                                            "stages": [stage]})
    spec = build_spec(runtime, pipeline, judge="gemma3-270m", judge_max_tokens=6, concurrency=3)
    progress: list[int] = []
    runner = EvalRunner(runtime, on_progress=lambda p: progress.append(p.done))
    eval_id = runner.start(spec, items, source="bundled:basic.jsonl")
    report = runner.run(eval_id)
    assert report.eval["status"] == "completed", report.eval.get("error")
    assert [s.system for s in report.systems] == [PIPELINE, "gemma3-270m"]
    for summary in report.systems:
        assert summary.answered == 5 and summary.accuracy is not None and summary.accuracy.n == 5
        assert summary.completion_tokens is not None and summary.completion_tokens > 0
        assert summary.seconds is not None and summary.seconds > 0
        judged = (summary.judge_score.n if summary.judge_score else 0) + summary.judge_errors
        assert judged == 5  # a score, or a recorded unreadable verdict, for every answer
    [versus] = report.versus
    assert sum(versus.by_reference.values()) == 5 and sum(versus.by_judge.values()) + versus.judge_errors == 5
    assert progress[-1] == 5 * 2 + 5 * 2 + 5  # answers, rubric scores, pairs
    store = EvalStore(config_dir.sessions_dir)
    sessions = {s["session_id"] for it in report.items for s in it["systems"].values()}
    assert len(sessions) == 10 and all(store.eval_of_session(sid) == eval_id for sid in sessions)
    from orchestrator.history.store import SessionStore

    history = SessionStore(config_dir.sessions_dir)
    assert all(history.load(sid).meta["status"] in ("completed", "partial") for sid in sessions)


def test_progress_bar_without_a_stream_writes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """`chorus eval` builds ProgressBar() with no stream: it used to call None.isatty() and crash."""
    from cli.eval import ProgressBar

    bar = ProgressBar()
    bar(Progress(total=4, done=2, last="q1 · pipeline: completed"))
    err = capsys.readouterr().err
    assert "2/4" in err and "q1 · pipeline: completed" in err
