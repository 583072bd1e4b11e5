"""Issue 13, items 3, 9 and 11: templates and vote patterns that would exhaust memory or never end.

Before: `lipsum(300000, min=99, max=100)` built 904 MiB in 44 s (globals were not guarded); filters with an
async variant (`slice`, `batch`, `join`...) skipped their checks; nested loops and a backtracking vote
pattern ran on the event loop, so Ctrl-C and the UI's Stop did nothing; a 1 MB question was "refused by
the sandbox". Now every amplifier is checked before it builds, what a render builds is budgeted, a
deadline ends runaway loops, `render_async` stops when cancelled, and the vote regex has a timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import regex  # noqa: F401  (the vote search imports it on first use; the timings below are of the search)

from orchestrator.config.schema import AggregationSpec
from orchestrator.engine import aggregation
from orchestrator.engine.aggregation import VOTE_REGEX_TIMEOUT_S, AggregationError, Candidate, aggregate
from orchestrator.engine.templates import MAX_OUTPUT_CHARS, TemplateError, build_context, render, render_async

BIG = "{% set b = 'x' * 999999 %}"
BOMBS = {
    "lipsum in a set": "{% set x = lipsum(300000, min=99, max=100) %}",
    "lipsum length": "{{ lipsum(100000)|length }}",
    "bytes.center": "{{ 'ab'.encode().center(2000000)|length }}",
    "int.to_bytes": "{{ (1).to_bytes(2000000, 'big')|length }}",
    "tojson indent": "{{ [1]|tojson(indent=2000000)|length }}",
    "slice count (async-variant filter)": "{{ [1, 2]|slice(2000000)|list|length }}",
    "batch count (async-variant filter)": "{{ [1, 2]|batch(2000000, 0)|list|length }}",
    "replace mapped over a range": BIG + "{{ range(100000)|map('string')|map('replace', '0', b)|list|length }}",
    "printf mapping key reused": BIG + "{{ '%(a)s%(a)s' % {'a': b} }}",
    "format field reused": BIG + "{{ '{0}{0}{0}'.format(b)|length }}",
    "xmlattr": "{{ {'a': 'x' * 999999, 'b': 'y' * 999999}|xmlattr|length }}",
    "urlize target": "{{ 'a b'|urlize(target='x' * 999999)|length }}",
    "macro doubling": BIG + "{% macro m() %}{{ b }}{{ b }}{% endmacro %}{{ m()|length }}",
    "shared references mapped": BIG + "{% set l = [b, b, b, b, b, b, b, b, b, b] %}"
                                      "{% set l2 = [l, l, l, l, l, l, l, l, l, l] %}"
                                      "{{ l2|sum(start=[])|map('upper')|list|length }}",
    "template text in a set block": "{% set x %}{% for i in range(100000) %}" + "y" * 10000
                                    + "{% endfor %}{% endset %}{{ x|length }}",
}


@pytest.mark.parametrize("template", BOMBS.values(), ids=BOMBS.keys())
def test_size_bombs_are_refused_before_they_grow(template: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError) as err:
        render(template, build_context("q", "", []), where="stage 's' prompt")
    assert err.value.refused and "refused by the sandbox" in err.value.detail and "limit" in err.value.detail
    assert not err.value.timed_out
    assert time.monotonic() - started < 2.0


def test_lipsum_is_refused_naming_itself_its_size_and_the_limit() -> None:
    with pytest.raises(TemplateError) as err:
        render(BOMBS["lipsum in a set"], {}, where="t")
    assert "the global 'lipsum' would build about" in err.value.detail and f"limit {MAX_OUTPUT_CHARS:,}" in \
        err.value.detail


NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"


def test_nested_loops_stop_at_the_render_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError) as err:
        render(NESTED_LOOPS, {}, where="stage 's' prompt", timeout_s=0.5)
    assert time.monotonic() - started < 2.0
    assert err.value.timed_out and err.value.refused and "took longer than 0.5 s" in err.value.detail
    assert err.value.where == "stage 's' prompt" and err.value.hint


def test_render_async_times_out_while_the_event_loop_keeps_running() -> None:
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main() -> TemplateError:
        beat = asyncio.create_task(ticker())
        try:
            with pytest.raises(TemplateError) as err:
                await render_async(NESTED_LOOPS, {}, where="aggregation template", timeout_s=0.5)
            return err.value
        finally:
            beat.cancel()

    error = asyncio.run(main())
    assert error.timed_out and "took longer than 0.5 s" in error.detail
    assert len(ticks) >= 10  # the loop was free while the template ran


def _render_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "chorus-render"]


def test_cancelling_render_async_stops_the_work() -> None:
    async def main() -> float:
        task = asyncio.create_task(render_async(NESTED_LOOPS, {}, where="t", timeout_s=60))
        await asyncio.sleep(0.3)
        assert _render_threads(), "the render should be running in its worker"
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled_at

    assert asyncio.run(main()) < 0.5
    deadline = time.monotonic() + 2
    while _render_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _render_threads(), "the worker kept running after its task was cancelled"


def _vote(pattern: str) -> AggregationSpec:
    return AggregationSpec(type="majority_vote", vote={"extract": "regex", "pattern": pattern})


def test_backtracking_vote_pattern_gives_a_clear_answer_quickly() -> None:
    candidates = [Candidate("m1", "m", "a" * 30 + "b"), Candidate("m2", "m", "a" * 30 + "b")]
    started = time.monotonic()
    with pytest.raises(AggregationError) as err:
        asyncio.run(aggregate(_vote("(a+)+$"), "q", candidates))
    assert time.monotonic() - started < 2.0
    assert "every model abstained" in str(err.value)  # no match, found without backtracking for hours


@pytest.fixture
def short_vote_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """The search's time limit, shortened: the limit is what is tested, not its length (a search that hits it
    burns a core until then)."""
    monkeypatch.setattr(aggregation, "VOTE_REGEX_TIMEOUT_S", 0.2)
    assert VOTE_REGEX_TIMEOUT_S == 1.0  # what users get
    return 0.2


def test_vote_pattern_that_backtracks_without_end_is_stopped_with_a_clear_error(short_vote_timeout: float) -> None:
    candidates = [Candidate("m1", "m", "a" * 40 + "b")]
    started = time.monotonic()
    with pytest.raises(AggregationError) as err:
        asyncio.run(aggregate(_vote("(a|aa)+$"), "q", candidates))
    assert time.monotonic() - started < short_vote_timeout + 2.0
    assert f"took longer than {short_vote_timeout:g} s" in err.value.reason and "(a|aa)+$" in err.value.reason
    assert "nested repeats" in (err.value.hint or "")


def test_cancelling_a_vote_with_a_slow_pattern_returns_at_once(short_vote_timeout: float) -> None:
    async def main() -> float:
        task = asyncio.create_task(aggregate(_vote("(a|aa)+$"), "q", [Candidate("m1", "m", "a" * 40 + "b")]))
        await asyncio.sleep(0.1)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled_at

    assert asyncio.run(main()) < 0.3


MEGABYTE_QUESTION = "Why? " * 209716  # 1,048,580 characters


@pytest.mark.parametrize("template", ["{{ previous if previous else question }}", "Q: {{ question }}",
                                      "{{ 'Q: ' ~ question ~ '?' }}", "{{ question|trim }}"])
def test_a_large_question_is_data_and_renders(template: str) -> None:
    out = render(template, build_context(MEGABYTE_QUESTION, "", []), where="stage 's' prompt")
    assert MEGABYTE_QUESTION.strip() in out


def test_a_template_that_adds_too_much_to_a_large_question_names_both_sizes() -> None:
    context = build_context(MEGABYTE_QUESTION, "", [])
    with pytest.raises(TemplateError) as err:
        render("{{ question }}{% for i in range(60000) %}twenty characters...{% endfor %}", context, where="t")
    detail = err.value.detail
    assert f"output is longer than {MAX_OUTPUT_CHARS + len(MEGABYTE_QUESTION):,} characters" in detail
    assert f"{MAX_OUTPUT_CHARS:,} for the template plus the {len(MEGABYTE_QUESTION):,} characters" in detail
