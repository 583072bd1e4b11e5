"""Sandboxed prompt rendering: the names templates see, clear errors, and refusal of anything unsafe."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from orchestrator.engine.templates import MAX_OUTPUT_CHARS, StageView, TemplateError, build_context, render


@dataclass
class FakeResponse:
    label: str
    model: str
    text: str
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class FakeStage:
    name: str
    output: str
    responses: list[FakeResponse] = field(default_factory=list)


@pytest.fixture
def context() -> dict:
    review = FakeStage("review", "merged review", [
        FakeResponse("facts", "gemma", "facts ok"),
        FakeResponse("broken", "gemma", "half an answer", status="failed"),
        FakeResponse("clarity", "llama", "clear enough"),
    ])
    return build_context("What is 6 x 7?", "the draft", [FakeStage("my-draft", "draft text"), review])


def test_question_and_previous_are_rendered(context: dict) -> None:
    assert render("Q: {{ question }} / P: {{ previous }}", context, where="t") == "Q: What is 6 x 7? / P: the draft"


def test_stage_output_is_reachable_by_dot_and_by_subscript(context: dict) -> None:
    text = ("{{ stages.review.output }}|{{ stages['review'].output }}|{{ stages['my-draft'].output }}"
            "|{{ stages.review }}")
    assert render(text, context, where="t") == "merged review|merged review|draft text|merged review"


def test_stage_responses_list_label_model_and_text_of_successful_answers_only(context: dict) -> None:
    text = "{% for r in stages.review.responses %}{{ r.label }}/{{ r.model }}: {{ r.text }};{% endfor %}"
    assert render(text, context, where="t") == "facts/gemma: facts ok;clarity/llama: clear enough;"


def test_iterating_stages_yields_views_in_order(context: dict) -> None:
    assert render("{% for s in stages %}{{ s.name }},{% endfor %}", context, where="t") == "my-draft,review,"
    assert isinstance(context["stages"]["review"], StageView)


def test_stage_name_that_matches_a_python_method_name_is_still_reachable() -> None:
    ctx = build_context("q", "", [FakeStage("items", "from items"), FakeStage("keys", "from keys")])
    assert render("{{ stages.items.output }} {{ stages.keys.output }}", ctx, where="t") == "from items from keys"


def test_undefined_previous_renders_empty() -> None:
    assert render("[{{ previous }}]{{ question }}", {"question": "q"}, where="t") == "[]q"


def test_attribute_of_unknown_stage_is_an_error_listing_known_stages(context: dict) -> None:
    with pytest.raises(TemplateError) as info:
        render("line one\n{{ stages.reviwe.output }}", context, where="stage 'final' prompt")
    err = info.value
    assert err.where == "stage 'final' prompt" and err.line == 2
    assert "undefined" in err.message and "review" in (err.hint or "")


@pytest.mark.parametrize("text", ["{{ stages.nosuch.output }}", "{{ stages['nosuch'].output }}"])
def test_an_unknown_stage_is_named_with_the_stages_before_this_one_not_an_internal_class(context: dict,
                                                                                         text: str) -> None:
    with pytest.raises(TemplateError) as info:
        render(text, context, where="stage 'final' prompt")
    assert "no stage named 'nosuch' before this one (stages: my-draft, review)" in info.value.message
    assert "Stages object" not in info.value.message and "orchestrator" not in info.value.message
    first = build_context("q", "", [])
    with pytest.raises(TemplateError, match="no stage named 'nosuch' before this one"):
        render(text, first, where="stage 'first' prompt")
    assert render("[{{ stages.nosuch }}]", context, where="t") == "[]"  # alone it still renders empty


def test_syntax_error_names_where_and_line() -> None:
    with pytest.raises(TemplateError) as info:
        render("first\nsecond\n{% if question %}unclosed", {}, where="aggregation template")
    err = info.value
    assert err.line is not None and err.line >= 3
    assert err.message.startswith("aggregation template, line")
    assert "syntax error" in err.message and not err.refused


def test_runtime_error_becomes_template_error_with_its_type() -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError") as info:
        render("ok\n{{ 1 / 0 }}", {}, where="t")
    assert info.value.line == 2


def test_template_error_is_a_chorus_error_and_serialises() -> None:
    from launcher.errors import ChorusError

    with pytest.raises(ChorusError) as info:
        render("{{ ''.__class__ }}", {}, where="stage 'x' prompt")
    data = info.value.to_dict()
    assert data["type"] == "TemplateError" and data["where"] == "stage 'x' prompt" and data["refused"] is True


INJECTIONS = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ ''['__class__'] }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ (range(3)|map('string')).gi_frame }}",
    "{{ question.__class__ }}",
    "{{ stages._views }}",
    "{{ stages.review.__dataclass_fields__ }}",
    "{{ [].append(1) }}",
    "{{ {}.update(a=1) }}",
    "{% set x = [].__class__ %}{{ x }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% extends 'base.txt' %}",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_reaching_python_internals_is_refused_by_the_sandbox(template: str, context: dict) -> None:
    with pytest.raises(TemplateError, match="refused by the sandbox") as info:
        render(template, context, where="stage 'review' prompt")
    assert info.value.refused


SHARED = "{% set b = ['x' * 1000] * 900 %}"  # 900 references to one string: ~0.9 MB once printed
BLOW_UPS = [
    "{{ 'x' * 10**9 }}",
    "{{ 10**9 * 'x' }}",
    "{{ ['x' * 1000] * 10000 }}",
    "{{ 2 ** 1000000000 }}",
    "{{ range(10**9)|list|length }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '%*d' % (10**9, 1) }}",
    "{{ '%999999999d'|format(1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{% set a = 'x' * 1000 %}{{ (a|list)|join(a * 900) }}",
    "{% set a = 'x' * 2000 %}{{ a|replace('x', a) }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='xx') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    SHARED + "{{ [b, b, b, b] }}",
    SHARED + "{{ [b, b, b, b]|string }}",
    SHARED + "{{ [b, b, b, b]|e }}",
    SHARED + "{{ [b, b, b, b]|tojson }}",
    SHARED + "{{ '%s' % [b, b, b, b] }}",
    SHARED + "{{ '%s'|format([b, b, b, b]) }}",
    SHARED + "{{ '{}'.format([b, b, b, b]) }}",
    SHARED + "{{ [b, b] ~ [b, b] }}",
]


@pytest.mark.parametrize("template", BLOW_UPS)
def test_size_blow_ups_are_refused_before_they_allocate(template: str) -> None:
    with pytest.raises(TemplateError, match="refused by the sandbox"):
        render(template, {}, where="t")


def test_output_longer_than_the_cap_is_refused() -> None:
    template = "{% for i in range(100000) %}" + "y" * 20 + "{% endfor %}"
    with pytest.raises(TemplateError, match="output is longer than"):
        render(template, {}, where="t")


def test_output_just_under_the_cap_renders() -> None:
    text = "z" * (MAX_OUTPUT_CHARS - 1)
    assert render("{{ text }}!", {"text": text}, where="t") == text + "!"


ORDINARY = [
    ("{{ 'ab' ~ 'c' }}", "abc"),
    ("{{ 'a' + 'b' }}", "ab"),
    ("{{ 3 * 'ab' }}", "ababab"),
    ("{{ 2 ** 8 }}", "256"),
    ("{{ 'v%s' % 1 }}", "v1"),
    ("{{ '%.2f'|format(3.14159) }}", "3.14"),
    ("{{ 'a b'|replace(' ', '-') }}", "a-b"),
    ("{{ ['x', 'y']|join(', ') }}", "x, y"),
    ("{{ 'ab'|center(6) }}", "  ab  "),
    ("{{ '{:>3}'.format(1) }}", "  1"),
    ("{{ 'a\nb'|indent(2) }}", "a\n  b"),
    ("{{ [1, 2, 3]|batch(2)|list }}", "[[1, 2], [3]]"),
    ("{{ ', '.join(['p', 'q']) }}", "p, q"),
    ("{{ 'x'.rjust(3, '.') }}", "..x"),
    ("{{ 1 ~ 2 ~ none }}", "12None"),
    (SHARED + "{{ b|length }} {{ b[0]|length }}", "900 1000"),
]


@pytest.mark.parametrize(("template", "expected"), ORDINARY)
def test_ordinary_operations_pass_the_size_guards(template: str, expected: str) -> None:
    assert render(template, {}, where="t") == expected


# ---------------------------------------------------------------- limits per render: amplifiers, budget, time

LOOPS_AND_MACROS = [
    ("{% for x in [1, 2, 3] %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}{% endfor %}",
     "1/3,2/3,3/3"),
    ("{% for x in [] %}a{% else %}empty{% endfor %}", "empty"),
    ("{% for k, v in {'a': 1}|dictsort %}{{ k }}={{ v }}{% endfor %}", "a=1"),
    ("{% for n in [[1, [2]], [3]] recursive %}{% if n is iterable %}{{ loop(n) }}{% else %}{{ n }}{% endif %}"
     "{% endfor %}", "123"),
    ("{% macro box(t) %}[{{ t }}{{ caller() }}]{% endmacro %}{% call box('a') %}b{% endcall %}", "[ab]"),
    ("{% set s %}{% for i in range(3) %}{{ i }}{% endfor %}{% endset %}{{ s }}", "012"),
    ("{{ [3, 1, 2]|sort|join('-') }} {{ [1, 2, 3]|slice(2)|list }}", "1-2-3 [[1, 2], [3]]"),
    ("{{ lipsum(1, html=False, min=3, max=4).split()|length }}", "3"),
]


@pytest.mark.parametrize(("template", "expected"), LOOPS_AND_MACROS)
def test_loops_macros_and_blocks_work_under_the_guards(template: str, expected: str) -> None:
    assert render(template, {}, where="t") == expected


def test_render_async_gives_the_same_text_as_render(context: dict) -> None:
    import asyncio

    from orchestrator.engine.templates import render_async

    template = "{{ question }} / {{ stages.review.output }} / {% for r in stages.review.responses %}{{ r.label }} " \
               "{% endfor %}"
    assert asyncio.run(render_async(template, context, where="t")) == render(template, context, where="t")


def test_render_async_reports_template_errors_the_same_way() -> None:
    import asyncio

    from orchestrator.engine.templates import render_async

    with pytest.raises(TemplateError, match="t, line 2: ZeroDivisionError"):
        asyncio.run(render_async("ok\n{{ 1 / 0 }}", {}, where="t"))


def test_filters_with_an_async_variant_check_their_arguments() -> None:
    """`slice` takes the eval context without naming it: its count was bound to the wrong name and skipped."""
    with pytest.raises(TemplateError, match="the filter 'slice' would build"):
        render("{{ x|slice(n)|list|length }}", {"x": [1, 2], "n": 10**7}, where="t")


def test_what_a_render_builds_in_all_is_budgeted() -> None:
    from orchestrator.engine.templates import MAX_BUILT_CHARS

    template = "{% set b = 'x' * 900000 %}{% for i in range(1000) %}{% set c = b|upper %}{% endfor %}"
    with pytest.raises(TemplateError, match=f"in all \\(limit {MAX_BUILT_CHARS + 100:,}\\)"):
        render(template, {"question": "0123456789"}, where="t")


def test_the_limits_grow_with_the_data_a_template_is_given() -> None:
    question = "q" * (MAX_OUTPUT_CHARS + 10)
    assert render("{{ question|upper }}", {"question": question}, where="t") == question.upper()
    with pytest.raises(TemplateError, match="refused by the sandbox"):
        render("{{ question ~ question }}", {"question": question}, where="t")


def test_a_slow_template_times_out_with_a_typed_error() -> None:
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError) as err:
        render(template, {}, where="aggregation template", timeout_s=0.2)
    assert err.value.timed_out and err.value.to_dict()["timed_out"] is True
