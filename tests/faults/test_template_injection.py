"""Fault 8: custom templates that try to reach Python internals are refused by the sandbox.

Stage prompts, aggregation templates and synthesis prompts render in Jinja's immutable sandbox; a
refused template fails its stage with a TemplateError that says so, and the app goes on. Model
output that looks like a template is data: it is never rendered again.
"""

from __future__ import annotations

import pytest

from orchestrator.engine.templates import TemplateError, build_context, render
from tests.conftest import ConfigDir
from tests.faults.conftest import DEMO, assert_clean_failure, assert_session_valid, chorus, make_runtime, manual, run

REFUSED = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ {}.__class__.__subclasses__() }}",
    "{{ question.__class__ }}",
    "{{ question|attr('__class__') }}",
    "{{ question|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ question.__getattribute__('__class__') }}",
    "{{ '{0.__class__.__mro__}'.format(question) }}",
    "{{ '%s'|format(question.__class__) }}",
    "{{ previous.encode('utf-8').__class__ }}",
    "{{ ''.join.__self__.__class__ }}",
    "{{ stages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{% for c in ''.__class__.__mro__ %}{{ c }}{% endfor %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% extends '/etc/passwd' %}",
    "{% from 'x' import y %}",
    "{{ [].append(1) }}",
    "{% set d = {} %}{{ d.update(a=1) }}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000000 }}",
    "{{ range(10**9)|list }}",
]
HARMLESS = [  # names that do not exist in the sandbox render empty; nothing of Python shows
    "{{ config }}", "{{ request }}", "{{ getattr }}", "{{ __builtins__ }}", "{{ range.__self__ }}",
    "{% macro m() %}{% endmacro %}{{ m.__globals__ }}",
]
LEAKS = ("<class", "<function", "<module", "<built-in", "__", "os.popen", "root:")


@pytest.mark.parametrize("template", REFUSED)
def test_reaching_python_internals_is_refused_by_the_sandbox(template: str) -> None:
    with pytest.raises(TemplateError) as err:
        render(template, build_context("q", "p", []), where="stage 's' prompt")
    assert err.value.refused and "refused by the sandbox" in err.value.detail
    assert err.value.where == "stage 's' prompt" and err.value.hint


@pytest.mark.parametrize("template", HARMLESS)
def test_names_outside_the_sandbox_render_nothing(template: str) -> None:
    out = render(template, build_context("q", "p", []), where="t")
    assert not any(leak in out for leak in LEAKS), out


def test_an_injected_stage_prompt_fails_the_run_cleanly_and_starts_no_server(config_dir: ConfigDir,
                                                                             llama_server_bin) -> None:
    runtime = make_runtime(config_dir)
    try:
        outcome, _ = run(runtime, manual([{"name": "evil", "models": [DEMO], "prompt": REFUSED[0]}], n_ctx=512))
        assert "pool" not in runtime.__dict__ or runtime.pool.starts == 0  # refused before any model call
    finally:
        runtime.close()
    assert outcome.run.status == "failed" and outcome.run.error is not None
    assert outcome.run.error.type == "TemplateError" and outcome.run.error.extra["refused"]
    assert "refused by the sandbox" in outcome.run.error.message and "'evil' prompt" in outcome.run.error.message
    assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="failed")  # type: ignore[arg-type]

    spec = config_dir.path.parent / "evil.yaml"
    spec.write_text("stages:\n  - name: evil\n    models: [gemma3-270m]\n"
                    "    prompt: \"{{ cycler.__init__.__globals__.os.popen('id').read() }}\"\n")
    out = chorus(config_dir, "run", "hello", "--manual", str(spec))
    assert_clean_failure(out)
    assert "refused by the sandbox" in out.stderr and "uid=" not in out.stdout + out.stderr


@pytest.mark.integration
def test_injected_aggregation_templates_fail_their_stage_and_model_output_is_never_rendered(
        config_dir: ConfigDir, llama_server_bin) -> None:
    runtime = make_runtime(config_dir)
    one = {"models": [DEMO], "max_tokens": 3}
    try:
        custom, _ = run(runtime, manual([{"name": "merge", **one, "aggregation": {
            "type": "custom_template", "template": "{{ responses[0].__class__.__mro__ }}"}}], n_ctx=512))
        synthesis, _ = run(runtime, manual([{"name": "synth", "models": [DEMO, DEMO], "max_tokens": 3,
                                             "aggregation": {"type": "synthesis", "synthesis_model": DEMO,
                                                             "synthesis_prompt": REFUSED[13]}}], n_ctx=512))
        # a stage whose output is template text; the next stage quotes it and must not run it
        quoted, _ = run(runtime, manual([
            {"name": "emit", **one, "aggregation": {
                "type": "custom_template", "template": "{{ '{{' }} 7*7 {{ '}}' }} {{ '{{' }} ''.__class__ {{ '}}' }}"}},
            {"name": "quote", **one, "prompt": "Echo: {{ previous }}"},
        ], n_ctx=512))
    finally:
        runtime.close()
    for outcome, stage in ((custom, "merge"), (synthesis, "synth")):
        assert outcome.run.status == "failed" and outcome.run.error is not None, stage
        assert outcome.run.error.type == "AggregationError", outcome.run.error
        assert "refused by the sandbox" in outcome.run.error.message
        record = outcome.run.stages[0]
        assert record.status == "failed" and all(r.ok for r in record.responses)  # the models had answered
        assert_session_valid(config_dir.sessions_dir, outcome.session_id, status="failed")  # type: ignore[arg-type]
    assert quoted.run.status == "completed", quoted.run.error
    assert quoted.run.stages[0].output == "{{ 7*7 }} {{ ''.__class__ }}"
    assert quoted.run.stages[1].prompt == "Echo: {{ 7*7 }} {{ ''.__class__ }}"  # quoted as text, not evaluated
