"""Orchestration logic on the fake backend: resolution, waves, cancel, on_error, aggregation, rerun, events.

No llama-server here: these run in milliseconds. Each feature also has a test on the real server
(tests/test_pipeline.py and tests/faults/).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from launcher.errors import RequestTimeout
from orchestrator.config.registry import Registry
from orchestrator.config.schema import PipelineSpec, load_config
from orchestrator.engine.backend import WavePlan
from orchestrator.engine.events import Event, ModelFinished, RunFinished, RunStarted, StageFinished, Token
from orchestrator.engine.fake import FakeBackend, Script, crash
from orchestrator.engine.run import CancelToken, Engine
from orchestrator.plan.resolve import Machine, RunPlan, build_plan
from orchestrator.records import RunRecord
from tests.conftest import ConfigDir


@pytest.fixture
def registry(config_dir: ConfigDir) -> Registry:
    """The demo model under two names, plus a remote one and one whose file is missing."""
    models = config_dir.models()
    entry = models["models"]["gemma3-270m"]
    models["models"]["second"] = {**entry}
    models["models"]["chatty"] = {**entry, "chat_template": "chatml"}
    models["models"]["far"] = {"url": "http://127.0.0.1:9/v1"}
    models["models"]["gone"] = {**entry, "file": "missing.gguf"}
    config_dir.write_models(models)
    return Registry(load_config(config_dir.path))


def spec(stages: list[dict], **defaults: object) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "t", "defaults": defaults, "stages": stages})


def plan_of(registry: Registry, pipeline: PipelineSpec, mode: str = "manual") -> RunPlan:
    return build_plan(pipeline, registry, Machine(), mode=mode)  # type: ignore[arg-type]


def run(plan: RunPlan, backend: FakeBackend, question: str = "q", **kwargs: object) -> tuple[RunRecord, list[Event]]:
    events: list[Event] = []
    engine = Engine(backend, observers=[events.append], allow_sequential=kwargs.pop("allow_sequential", True))
    record = asyncio.run(engine.run(plan, question, **kwargs))  # type: ignore[arg-type]
    return record, events


# ---------------------------------------------------------------- resolution


def test_default_and_explicit_n_ctx_resolve_to_one_server(registry: Registry) -> None:
    """The bug the plan fixes: unset n_ctx (model default 4096) and n_ctx: 4096 are the same server."""
    plan = plan_of(registry, spec([
        {"name": "a", "models": ["gemma3-270m"]},
        {"name": "b", "models": ["gemma3-270m"], "n_ctx": 4096},
    ]))
    assert len(plan.servers) == 1
    assert plan.servers[0].n_ctx == 4096
    assert plan.stage(1).calls[0].target.server == plan.stage(2).calls[0].target.server


def test_slots_are_the_most_calls_any_stage_makes_to_one_server(registry: Registry) -> None:
    plan = plan_of(registry, spec([
        {"name": "a", "models": ["gemma3-270m"]},
        {"name": "b", "models": ["gemma3-270m", {"model": "gemma3-270m", "label": "two"},
                                 {"model": "gemma3-270m", "label": "three"}],
         "aggregation": {"type": "synthesis", "synthesis_model": "gemma3-270m"}},
    ], n_ctx=1024))
    assert [s.slots for s in plan.servers] == [3]
    assert all(c.target.server is not None and c.target.server.slots == 3
               for stage in plan.stages for c in stage.all_calls())


def test_every_generation_parameter_is_resolved_slot_then_stage_then_defaults(registry: Registry) -> None:
    plan = plan_of(registry, spec([{
        "name": "a", "temperature": 0.3, "system_prompt": "stage",
        "models": [{"model": "gemma3-270m", "label": "x", "seed": 5, "system_prompt": "slot"},
                   {"model": "second", "label": "y"}]}], temperature=0.9, top_p=0.5, max_tokens=7, stop=["\n"]))
    x, y = plan.stage(1).calls
    assert (x.request.temperature, x.request.top_p, x.request.max_tokens, x.request.seed) == (0.3, 0.5, 7, 5)
    assert (x.request.system_prompt, y.request.system_prompt) == ("slot", "stage")
    assert y.request.stop == ["\n"] and y.request.seed is None


def test_two_model_names_for_one_file_and_settings_share_one_server(registry: Registry) -> None:
    plan = plan_of(registry, spec([{"name": "a", "models": ["gemma3-270m", "second"]}]))
    assert len(plan.servers) == 1 and plan.servers[0].slots == 2
    assert [c.model for c in plan.stage(1).calls] == ["gemma3-270m", "second"]  # each call keeps its name


def test_no_gpu_forces_cpu_layers_and_different_templates_get_different_servers(registry: Registry) -> None:
    plan = plan_of(registry, spec([{"name": "a", "models": ["gemma3-270m", "chatty"]}]))
    a, b = plan.stage(1).calls
    assert a.target.server and b.target.server
    assert a.target.server.n_gpu_layers == 0  # models.yaml asks for 99; no GPU here
    assert a.target.server.family != b.target.server.family  # chat template is part of the server's identity
    with_gpu = build_plan(spec([{"name": "a", "models": ["gemma3-270m"]}]), registry, Machine(has_gpu=True))
    assert with_gpu.servers[0].n_gpu_layers == 99


def test_servers_that_run_together_share_the_cores_and_a_models_threads_wins(registry: Registry,
                                                                            config_dir: ConfigDir) -> None:
    cores4 = Machine(cores=4)
    trio = spec([{"name": "solo", "models": ["gemma3-270m"]},
                 {"name": "panel", "models": ["gemma3-270m", "chatty", "far"]}])
    plan = build_plan(trio, registry, cores4)
    by_model = {s.model: s.threads for s in plan.servers}
    assert by_model == {"gemma3-270m": 2, "chatty": 2}  # two local servers at once: half each, in every stage
    alone = build_plan(spec([{"name": "solo", "models": ["gemma3-270m"]}]), registry, cores4)
    assert [s.threads for s in alone.servers] == [4]
    one_at_a_time = build_plan(spec([{"name": "p", "models": ["gemma3-270m", "chatty"], "execution": "sequential"}]),
                               registry, cores4)
    assert [s.threads for s in one_at_a_time.servers] == [4, 4]
    models = config_dir.models()
    models["models"]["chatty"]["threads"] = 3
    config_dir.write_models(models)
    own = build_plan(spec([{"name": "p", "models": ["gemma3-270m", "chatty"]}]),
                     Registry(load_config(config_dir.path)), cores4)
    assert {s.model: s.threads for s in own.servers} == {"gemma3-270m": 2, "chatty": 3}


def test_remote_and_unavailable_models_are_resolved_without_a_server(registry: Registry) -> None:
    plan = plan_of(registry, spec([{"name": "a", "models": ["far", "gone"]}]))
    far, gone = plan.stage(1).calls
    assert far.target.kind == "remote" and far.target.url == "http://127.0.0.1:9/v1"
    assert gone.target.kind == "unavailable" and "missing" in (gone.target.reason or "")
    assert plan.servers == []


def test_plan_to_dict_shows_servers_with_slots_and_each_calls_request(registry: Registry) -> None:
    data = plan_of(registry, spec([{"name": "a", "models": ["gemma3-270m", "chatty"]}], max_tokens=9)).to_dict()
    assert [s["slots"] for s in data["servers"]] == [1, 1]
    call = data["stages"][0]["calls"][0]
    assert call["request"]["max_tokens"] == 9 and call["target"]["server"]["n_ctx"] == 4096


def test_base_mode_with_a_missing_model_is_blocked_in_the_plan(registry: Registry) -> None:
    plan = plan_of(registry, spec([{"name": "a", "models": ["gone"]}]), mode="base")
    assert plan.blocked is not None and plan.blocked.type == "PipelineBlocked"
    record, events = run(plan, FakeBackend())
    assert record.status == "failed" and record.error == plan.blocked
    assert [type(e) for e in events] == [RunStarted, RunFinished]


# ---------------------------------------------------------------- execution


def three_reviewers(**stage: object) -> PipelineSpec:
    return spec([
        {"name": "draft", "models": ["gemma3-270m"], "prompt": "Q: {{ question }}"},
        {"name": "review", "models": [{"model": "gemma3-270m", "label": "r1"}, {"model": "second", "label": "r2"},
                                      {"model": "chatty", "label": "r3"}],
         "prompt": "improve: {{ previous }}", **stage},
    ])


def test_a_stage_that_fits_runs_its_calls_concurrently(registry: Registry) -> None:
    backend = FakeBackend(default=Script("fine answer", delay_s=0.02))
    record, _ = run(plan_of(registry, three_reviewers()), backend)
    assert record.status == "completed"
    assert backend.peak_active == 3
    assert record.stages[1].execution == "parallel"
    assert backend.requests[1][1].prompt == "improve: fine answer"
    assert record.final == record.stages[1].output and "fine answer" in record.final


def test_a_stage_that_does_not_fit_runs_in_waves_one_at_a_time(registry: Registry) -> None:
    backend = FakeBackend(default=Script("x", delay_s=0.01),
                          waves=lambda calls: WavePlan(len(calls) <= 1, [[c.label] for c in calls], "ram: short"))
    record, events = run(plan_of(registry, three_reviewers(), mode="base"), backend)
    assert record.status == "completed"
    assert backend.peak_active == 1 and record.stages[1].waves == [["r1"], ["r2"], ["r3"]]
    assert any(e.type == "notice" and "3 waves" in e.message for e in events)  # type: ignore[attr-defined]


def test_manual_mode_asks_before_waves_and_a_no_refuses_the_stage(registry: Registry) -> None:
    asked: list[str] = []
    backend = FakeBackend(waves=lambda calls: WavePlan(len(calls) <= 1, [[c.label] for c in calls], "ram: short"))

    def decline(question: object) -> bool:
        asked.append(question.stage)  # type: ignore[attr-defined]
        return False

    record, _ = run(plan_of(registry, three_reviewers()), backend, allow_sequential=decline)
    assert asked == ["review"]
    assert record.status == "cancelled" and record.error and record.error.type == "StageRefused"
    assert backend.requests == []  # asked before anything ran: the draft did not run either


def test_a_model_that_does_not_fit_even_alone_refuses_the_run_before_anything_runs(registry: Registry) -> None:
    backend = FakeBackend(waves=lambda calls: WavePlan(False, [[c.label] for c in calls if c.label != "r3"],
                                                       "r3 does not fit even alone (ram: needs 9 GiB, 2 GiB usable)",
                                                       ["r3"]) if any(c.label == "r3" for c in calls)
                          else WavePlan(True, [[c.label for c in calls]]))
    record, events = run(plan_of(registry, three_reviewers(), mode="base"), backend)
    assert record.status == "failed" and record.error and record.error.type == "RunRefused"
    assert "needs 9 GiB, 2 GiB usable" in record.error.message and record.stages == []
    assert backend.requests == [] and not any(e.type == "model_started" for e in events)


def test_a_failed_call_is_recorded_and_the_stage_goes_on_as_partial(registry: Registry) -> None:
    backend = FakeBackend(default=Script("good")).script("second", crash("second"))
    record, events = run(plan_of(registry, three_reviewers()), backend)
    review = record.stages[1]
    assert review.status == "partial" and record.status == "partial"
    r2 = review.responses[1]
    assert r2.status == "failed" and r2.error and r2.error.type == "ServerCrashed"
    assert record.final == review.output  # the others' answer is still the run's answer
    failed = [e for e in events if isinstance(e, ModelFinished) and e.response.status == "failed"]
    assert [e.label for e in failed] == ["r2"]


def test_on_error_stop_ends_the_run_at_the_failing_stage(registry: Registry) -> None:
    pipeline = spec([
        {"name": "one", "models": ["gemma3-270m", "gone"], "on_error": "stop", "execution": "sequential"},
        {"name": "two", "models": ["gemma3-270m"]},
    ])
    record, _ = run(plan_of(registry, pipeline), FakeBackend())
    assert record.status == "failed" and [s.name for s in record.stages] == ["one"]
    assert record.error and record.error.type == "ModelUnavailable"


def test_a_hung_call_discards_its_server(registry: Registry) -> None:
    backend = FakeBackend().script("second", RequestTimeout("second", "no answer in 0.1s"))
    record, _ = run(plan_of(registry, spec([{"name": "a", "models": ["gemma3-270m", "second"]}])), backend)
    assert backend.discarded == ["second"]
    assert record.stages[0].responses[1].error.type == "RequestTimeout"  # type: ignore[union-attr]


def test_cancel_stops_the_calls_in_flight_and_the_run_ends_cancelled(registry: Registry) -> None:
    backend = FakeBackend(default=Script("slow", delay_s=5))
    cancel = CancelToken()
    threading.Timer(0.05, cancel.cancel).start()
    record, _ = run(plan_of(registry, three_reviewers()), backend, cancel=cancel)
    assert record.status == "cancelled"
    assert record.stages[0].responses[0].status == "cancelled"
    assert record.finished_at is not None and record.finished_at - record.started_at < 2


def test_synthesis_goes_to_the_planned_synthesis_call_with_its_slots(registry: Registry) -> None:
    backend = FakeBackend(default=Script("an answer"))
    backend.script("second", lambda req: "merged: " + req.prompt.split("\n")[0])
    pipeline = spec([{"name": "a", "models": ["gemma3-270m", {"model": "gemma3-270m", "label": "b"}],
                      "aggregation": {"type": "synthesis", "synthesis_model": "second",
                                      "synthesis_prompt": "Q={{ question }}"}}])
    plan = plan_of(registry, pipeline)
    record, _ = run(plan, backend, "why")
    agg = record.stages[0].aggregation
    assert agg is not None and record.final == "merged: Q=why"
    assert agg.details["synthesis_calls"][0]["finish_reason"] == "stop"
    assert backend.endpoints_opened[-1] == plan.stage(1).synthesis.target  # type: ignore[union-attr]


def test_majority_vote_picks_the_largest_group(registry: Registry) -> None:
    backend = FakeBackend(default=Script("Paris")).script("chatty", "Lyon")
    record, _ = run(plan_of(registry, three_reviewers(aggregation={"type": "majority_vote"})), backend)
    assert record.final == "Paris"
    assert record.stages[1].aggregation.details["agreement"] == pytest.approx(2 / 3)  # type: ignore[union-attr]


def test_a_rerun_copies_earlier_stages_and_runs_only_the_rest(registry: Registry) -> None:
    plan = plan_of(registry, three_reviewers())
    first, _ = run(plan, FakeBackend(default=Script("v1")))
    backend = FakeBackend(default=Script("v2"))
    again, events = run(plan, backend, prior_stages=first.stages[:1], parent_session="session_001")
    assert [s.status for s in again.stages] == ["copied", "ok"]
    assert again.stages[0].output == "v1" and len(backend.requests) == 3
    assert again.rerun_from_stage == 2 and again.parent_session == "session_001"
    assert isinstance(events[1], StageFinished) and events[1].record.status == "copied"


def test_events_come_in_order_and_a_failing_observer_does_not_lose_the_run(registry: Registry) -> None:
    def broken(event: Event) -> None:
        if isinstance(event, StageFinished):
            raise OSError(28, "No space left on device")

    events: list[Event] = []
    engine = Engine(FakeBackend(default=Script("a b c")), observers=[broken, events.append])
    record = asyncio.run(engine.run(plan_of(registry, three_reviewers()), "q"))
    assert record.status == "completed" and record.final
    assert any("No space left" in w for w in record.warnings)
    types = [e.type for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert types.index("stage_started") < types.index("model_started") < types.index("token")
    assert sum(isinstance(e, Token) for e in events) == 4 * 3  # three words streamed by each of the 4 calls


def test_responses_keep_finish_reason_tokens_and_server_timings(registry: Registry) -> None:
    record, _ = run(plan_of(registry, spec([{"name": "a", "models": ["gemma3-270m"]}])), FakeBackend())
    r = record.stages[0].responses[0]
    assert r.finish_reason == "stop" and r.server_timings == {"fake": True} and r.completion_tokens == 1
    assert r.server == "fake://gemma3-270m" and r.params["slots"] == 1



# ---------------------------------------------------------------- moved from the real-server suite: pure logic


def test_prompt_templates_see_previous_and_named_stages(registry: Registry) -> None:
    pipeline = spec([
        {"name": "one", "models": ["gemma3-270m"], "prompt": "Q: {{ question }}"},
        {"name": "two", "models": ["gemma3-270m"],
         "prompt": "prev={{ previous }}|named={{ stages.one.output }}|n={{ stages.one.responses | length }}"},
    ])
    record, _ = run(plan_of(registry, pipeline), FakeBackend(default=Script("green")), "colour of grass")
    assert record.stages[0].prompt == "Q: colour of grass"
    assert record.stages[1].prompt == "prev=green|named=green|n=1"


def test_a_missing_model_fails_its_step_and_the_stage_goes_on(registry: Registry) -> None:
    pipeline = spec([{"name": "s", "models": ["gemma3-270m", "ghost"], "aggregation": {"type": "concat"}}])
    record, _ = run(plan_of(registry, pipeline), FakeBackend(default=Script("here")))
    stage = record.stages[0]
    assert record.status == "partial" and stage.status == "partial"
    ghost = stage.response("ghost")
    assert ghost and ghost.status == "failed" and ghost.error and ghost.error.type == "ModelUnavailable"
    assert stage.output == "here"


def test_custom_template_merges_the_answers(registry: Registry) -> None:
    pipeline = spec([{"name": "s", "models": [{"model": "gemma3-270m", "label": "a"},
                                              {"model": "gemma3-270m", "label": "b"}],
                      "aggregation": {"type": "custom_template",
                                      "template": "{% for r in responses %}<{{ r.label }}>{% endfor %}"}}])
    record, _ = run(plan_of(registry, pipeline), FakeBackend())
    assert record.final == "<a><b>"


def test_a_template_reaching_python_internals_fails_the_stage_before_any_call(registry: Registry) -> None:
    backend = FakeBackend()
    pipeline = spec([{"name": "s", "models": ["gemma3-270m"], "prompt": "{{ ''.__class__.__mro__ }}"}])
    record, _ = run(plan_of(registry, pipeline), backend)
    assert record.status == "failed" and record.error and "sandbox" in record.error.message.lower()
    assert backend.requests == []


def test_unanimous_majority_vote_has_agreement_one(registry: Registry) -> None:
    pipeline = spec([{"name": "vote", "models": ["gemma3-270m", "gemma3-270m", "gemma3-270m"],
                      "aggregation": {"type": "majority_vote", "vote": {"extract": "whole"}}}])
    record, _ = run(plan_of(registry, pipeline), FakeBackend(default=Script("Paris.")))
    agg = record.stages[0].aggregation
    assert agg is not None and agg.details["agreement"] == 1.0 and record.final == "Paris."


def test_an_embedding_model_named_in_a_stage_is_unavailable_with_the_reason(config_dir: ConfigDir) -> None:
    models = config_dir.models()
    models["models"]["embedder"] = {**models["models"]["gemma3-270m"], "role": "embedding"}
    config_dir.write_models(models)
    registry = Registry(load_config(config_dir.path))
    plan = plan_of(registry, spec([{"name": "a", "models": ["embedder", "gemma3-270m"]}]))
    target = plan.stage(1).calls[0].target
    assert target.kind == "unavailable" and "embedding model" in (target.reason or "")
    record, _ = run(plan, FakeBackend())
    assert record.stages[0].responses[0].error.type == "ModelUnavailable"  # type: ignore[union-attr]
