"""Run page: mode, question, the manual stage builder, the memory plan, and the live run."""

from __future__ import annotations

import streamlit as st

from orchestrator.config import stage_builder
from orchestrator.config.schema import PipelineSpec
from orchestrator.engine.aggregators import allowed_functions, check_pipeline
from orchestrator.errors import ChorusError
from orchestrator.live import LiveRun
from orchestrator.plan.memory import plan_memory
from orchestrator.units import fmt_bytes
from ui.common import LIVE_KEY, live_run, render_live, runner, runtime

BUILDER_KEY = "builder_stages"

st.title("chorus")
rt = runtime()
if rt is None:
    st.stop()

registry = rt.registry
config_dir, operator_allowed = rt.config.paths.config_dir, rt.config.app.aggregators.allowed
custom_functions = [f.name for f in allowed_functions(config_dir, operator_allowed)]  # the only ones offered
available = sorted(registry.available)
status = registry.base_pipeline_status()

# ---------------------------------------------------------------- mode and question
if status.available:
    mode = st.radio("Mode", ["Base", "Manual"], horizontal=True, key="mode")
else:
    st.radio("Mode", ["Base", "Manual"], index=1, horizontal=True, disabled=True, key="mode_blocked",
             help="Base mode needs every model of pipeline.yaml")
    st.warning(f"Base mode is unavailable: {status.reason}. Manual mode works with the available models.")
    mode = "Manual"

question = st.text_area("Question", key="question", placeholder="Ask something…")


# ---------------------------------------------------------------- manual stage builder
def stage_editor(i: int, stage: dict) -> None:
    k = stage["id"]  # widget keys follow the stage, not its position, so moves keep their values
    with st.container(border=True):
        top = st.columns([3, 1, 1, 1])
        stage["name"] = top[0].text_input("Stage name", stage["name"], key=f"s{k}-name")
        if top[1].button("↑", key=f"s{k}-up", disabled=i == 0, help="Move up"):
            st.session_state[BUILDER_KEY] = stage_builder.move(st.session_state[BUILDER_KEY], i, -1)
            st.rerun()
        if top[2].button("↓", key=f"s{k}-down", disabled=i == len(st.session_state[BUILDER_KEY]) - 1,
                         help="Move down"):
            st.session_state[BUILDER_KEY] = stage_builder.move(st.session_state[BUILDER_KEY], i, +1)
            st.rerun()
        if top[3].button("✕", key=f"s{k}-remove", help="Remove stage"):
            st.session_state[BUILDER_KEY] = stage_builder.remove(st.session_state[BUILDER_KEY], i)
            st.rerun()
        stage["models"] = st.multiselect("Models", available, [m for m in stage["models"] if m in available],
                                         key=f"s{k}-models", help="Only registered models are offered")
        stage["system_prompt"] = st.text_area("System prompt", stage["system_prompt"], key=f"s{k}-system",
                                              height=68)
        stage["prompt"] = st.text_input("Prompt template", stage["prompt"], key=f"s{k}-prompt",
                                        help="Jinja: question, previous, stages.<name>.output")
        c = st.columns(5)
        stage["temperature"] = c[0].number_input("temperature", 0.0, 5.0, float(stage["temperature"]), 0.1,
                                                 key=f"s{k}-temperature")
        stage["top_p"] = c[1].number_input("top_p", 0.01, 1.0, float(stage["top_p"]), 0.05, key=f"s{k}-top_p")
        stage["max_tokens"] = int(c[2].number_input("max_tokens", 1, 100_000, int(stage["max_tokens"]), 16,
                                                    key=f"s{k}-max_tokens"))
        stage["n_ctx"] = int(c[3].number_input("n_ctx", 64, 1_048_576, int(stage["n_ctx"]), 256, key=f"s{k}-n_ctx"))
        ngl = c[4].number_input("n_gpu_layers", -1, 1000, value=stage["n_gpu_layers"], step=1,
                                key=f"s{k}-ngl", help="Blank: the model's default")
        stage["n_gpu_layers"] = None if ngl is None else int(ngl)
        a = st.columns(2)
        kinds = list(stage_builder.AGGREGATION_KINDS)
        stage["aggregation"] = a[0].selectbox("Merge answers by", kinds, kinds.index(stage["aggregation"]),
                                              key=f"s{k}-agg")
        if stage["aggregation"] in ("synthesis", "majority_vote"):
            options = [None, *available]
            current = stage["synthesis_model"] if stage["synthesis_model"] in available else None
            stage["synthesis_model"] = a[1].selectbox("Synthesis model", options, options.index(current),
                                                      key=f"s{k}-synth",
                                                      format_func=lambda m: m or "(none)")
        if stage["aggregation"] == "custom_template":
            stage["template"] = st.text_area("Template", stage["template"] or
                                             "{% for r in responses %}{{ r.label }}: {{ r.text }}\n{% endfor %}",
                                             key=f"s{k}-template")
        if stage["aggregation"] == "custom":  # a choice among the allowed functions, never a typed module name
            if not custom_functions:
                st.info(f"No custom aggregators: put a Python file in {config_dir / 'aggregators'}/ or list "
                        "'package.module:function' under aggregators.allowed in app.yaml.")
            current = stage["function"] if stage["function"] in custom_functions else None
            chosen = a[1].selectbox("Function", custom_functions,
                                    None if current is None else custom_functions.index(current), key=f"s{k}-func",
                                    help="Functions in the config's aggregators/ folder or listed in app.yaml")
            stage["function"] = chosen or ""


spec: PipelineSpec | None = None
if mode == "Base":
    try:
        spec = rt.config.load_pipeline()
    except ChorusError as exc:
        st.error(str(exc))
    if spec is not None:
        st.caption(" → ".join(f"{s.name} ({', '.join(m.label or m.model for m in s.models)})" for s in spec.stages))
else:
    if not available:
        st.error("No model is available. Check `chorus models` for the reasons.")
    stages = st.session_state.setdefault(BUILDER_KEY, [stage_builder.new_stage(1, available)])
    st.subheader("Stages")
    for i, stage in enumerate(stages):
        stage_editor(i, stage)
    if st.button("➕ Add stage", key="add-stage"):
        stages.append(stage_builder.new_stage(len(stages) + 1, available))
        st.rerun()
    try:
        spec = stage_builder.build_spec(stages)
    except ChorusError as exc:
        st.error(str(exc))

if spec is not None:  # pipeline.yaml too may only name allowed custom functions
    try:
        check_pipeline(spec, config_dir, operator_allowed, source="pipeline" if mode == "Base" else "manual pipeline")
    except ChorusError as exc:
        st.error(str(exc))
        spec = None

# ---------------------------------------------------------------- memory plan
allow_sequential = True
if spec is not None:
    with st.expander("Memory plan", expanded=False):
        try:
            plan = plan_memory(rt, rt.plan(spec))
        except ChorusError as exc:
            st.error(str(exc))
            plan = None
        if plan is not None:
            note = f" — {plan.gpu_note}" if plan.gpu_note else ""
            st.caption(f"Free: RAM {fmt_bytes(plan.available.ram_bytes)}, "
                       f"VRAM {fmt_bytes(plan.available.vram_bytes)}{note}")
            for sp in plan.stages:
                st.markdown(f"**{sp.stage}** — {'fits together' if sp.fits_together else 'does not fit together'}")
                st.dataframe([{"model": m.name, "calls": ", ".join(m.labels), "RAM": fmt_bytes(m.ram_bytes),
                               "VRAM": fmt_bytes(m.vram_bytes), "source": m.source} for m in sp.models],
                             hide_index=True)
    if plan is not None and not all(sp.fits_together for sp in plan.stages):
        tight = [sp for sp in plan.stages if not sp.fits_together]
        st.warning("Not enough memory to run these models together: "
                   + "; ".join(f"{sp.stage}: {sp.reason}" for sp in tight))
        if mode == "Manual":
            allow_sequential = st.checkbox("Run sequentially (one wave after another)", value=False,
                                           key="allow_sequential")

# ---------------------------------------------------------------- run / stop
live = live_run()
running = live is not None and not live.done
cols = st.columns([1, 1, 4])
can_run = spec is not None and bool(question.strip()) and not running
if cols[0].button("Run", type="primary", disabled=not can_run, key="run"):
    run_mode = "base" if mode == "Base" else "manual"
    pipeline, q, allow = spec, question.strip(), allow_sequential
    st.session_state[LIVE_KEY] = LiveRun(lambda observer, cancel: runner(rt).run(
        pipeline, q, mode=run_mode, observers=[observer], cancel=cancel, allow_sequential=allow))
    st.rerun()
if running and cols[1].button("Stop", key="stop"):
    live.cancel()  # type: ignore[union-attr]


@st.fragment(run_every=0.5)
def live_view() -> None:
    current = live_run()
    if current is None:
        return
    render_live(current)
    if current.done and not st.session_state.get("live_rendered_final"):
        st.session_state["live_rendered_final"] = True
        if current.outcome and current.outcome.session_id:
            st.session_state["last_session_id"] = current.outcome.session_id
        st.rerun()


if live is not None:
    if not live.done:
        st.session_state["live_rendered_final"] = False
    st.divider()
    live_view()
