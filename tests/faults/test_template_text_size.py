"""Issue 24, item 4: a value's size as text, not as memory, is what templates are limited by.

Before: `[b, b, b...]` literals nested a few levels hold a few hundred pointers but print as ~900 M
characters, and `(e|safe)|length` printed them (60 s, 1.8 GB RSS through `chorus run`) because only a list
of "stringifying" filters was checked and `safe` was not on it; `namespace()`/`cycler()` objects and dict
views were measured as 8 characters; a render given up on at its deadline later printed "Future exception
was never retrieved". Now literals are checked like `*`, every filter outside an allow-list of filters
that never make text checks its arguments first, and a given-up render's late error is dropped.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest

from orchestrator.engine import templates
from orchestrator.engine.templates import TemplateError, build_context, render, render_async

LEVELS = "{% set a = [1] * 1000 %}" + "".join(
    "{% set " + name + " = [" + ", ".join([inner] * 10) + "] %}" for inner, name in zip("abcd", "bcde", strict=True))
"""The issue's shape: `[1] * 1000` nested in literals of 10; `e` would print as ~30 M characters."""


@pytest.mark.parametrize("use", ["{{ (e|safe)|length }}", "{{ e|wordcount }}", "{{ e is lower }}",
                                 "{{ 'a'|replace('a', e) }}", "{{ e|length }}"])
def test_nested_literals_are_refused_before_anything_prints_them(use: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError) as err:
        render(LEVELS + use, build_context("q", "", []), where="stage 's' prompt")
    assert err.value.refused and "a literal list would build about 3,002,220 characters" in err.value.detail
    assert time.monotonic() - started < 2.0


BIG = "{% set b = 'x' * 600000 %}"
HIDDEN_CONTENTS = {
    "tuple literal": BIG + "{% set t = (b, b) %}{{ t|length }}",
    "dict literal": BIG + "{% set d = {'k': b, 'l': b} %}{{ d|length }}",
    "namespace in a list": BIG + "{% set ns = namespace(v=b) %}{% set l = [ns, ns] %}{{ l|length }}",
    "dict view in a list": BIG + "{% set d = {'k': b} %}{% set l = [d.values(), d.values()] %}{{ l|length }}",
    "cycler": BIG + "{% set c = cycler(b, b) %}{{ c.current|length }}",
}


@pytest.mark.parametrize("template", HIDDEN_CONTENTS.values(), ids=HIDDEN_CONTENTS.keys())
def test_objects_that_print_their_contents_are_measured_by_them(template: str) -> None:
    with pytest.raises(TemplateError) as err:
        render(template, {}, where="t")
    assert err.value.refused and "1,200,0" in err.value.detail and "limit 1,000,000" in err.value.detail


def _shared_bomb() -> list[Any]:
    """A list of 10 ** 6 references that prints as ~30 M characters: data no template could build itself."""
    inner: list[Any] = [1] * 1000
    for _ in range(3):
        inner = [inner] * 10
    return inner


def _render_without_input_allowance(template: str, data: dict[str, Any]) -> str:
    """Render with the data's size not added to the limits, as if the template had built `e` itself."""
    return templates._render_limited(template, data, "t", templates._Limits(0, 5.0))


TEXT_MAKING_FILTERS = sorted(set(templates._ENV.filters) - templates._BOUNDED_FILTERS)


@pytest.mark.parametrize("name", TEXT_MAKING_FILTERS)
def test_every_filter_outside_the_allow_list_checks_its_arguments_as_text_first(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError) as err:
        _render_without_input_allowance("{{ e|" + name + " }}", {"e": _shared_bomb()})
    assert f"the filter '{name}' would build about" in err.value.detail
    assert time.monotonic() - started < 1.0


def test_filters_not_on_the_allow_list_include_the_one_the_issue_used() -> None:
    assert {"safe", "sum", "wordcount", "truncate", "filesizeformat"} <= set(TEXT_MAKING_FILTERS)
    assert "length" in templates._BOUNDED_FILTERS and "first" in templates._BOUNDED_FILTERS


@pytest.mark.parametrize(("template", "test"), [("{{ e is lower }}", "lower"), ("{{ e is upper }}", "upper"),
                                              ("{{ l|select('upper')|list }}", "upper")])
def test_tests_that_print_their_value_check_it_first(template: str, test: str) -> None:
    with pytest.raises(TemplateError) as err:
        _render_without_input_allowance(template, {"e": _shared_bomb(), "l": [_shared_bomb()]})
    assert f"the test '{test}' would build about" in err.value.detail


def test_bounded_filters_and_large_input_data_still_render() -> None:
    answers = build_context("q" * 600_000, "p" * 600_000, [])
    assert render("{{ question|length }} {{ [question, previous]|length }} {{ question|upper|length }}",
                  answers, where="t") == "600000 2 600000"


def test_a_render_given_up_at_its_deadline_drops_its_late_error_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker is stuck in one long C call past the grace period, then fails: nobody awaits it any more."""
    def stuck_then_failing(*_: Any) -> str:
        time.sleep(0.3)
        raise TemplateError("t", "refused by the sandbox: too large", refused=True)

    monkeypatch.setattr(templates, "_render_limited", stuck_then_failing)
    monkeypatch.setattr(templates, "_STOP_GRACE_S", 0.05)
    reported: list[dict[str, Any]] = []

    async def main() -> bool:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        with pytest.raises(TemplateError) as err:
            await render_async("{{ question }}", {}, where="t", timeout_s=0.05)
        timed_out = err.value.timed_out
        del err  # its traceback holds render_async's frame, and so the worker's future
        await asyncio.sleep(0.5)  # the worker fails now, long after the caller gave up
        gc.collect()  # an unretrieved future reports itself when it is collected
        await asyncio.sleep(0)
        return timed_out

    assert asyncio.run(main())
    assert not reported, [c.get("message") for c in reported]
