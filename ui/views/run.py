"""Run page: mode, question, the pipeline builder (manual) or this run's settings (base), the memory plan,
and the live run. The front door (orchestrator.app) loads, checks and plans; the builder's helpers are ui/."""

from __future__ import annotations

from typing import Any, Literal

import streamlit as st

from orchestrator.app import Chorus, Pipeline, Planned
from orchestrator.config.aggregators import allowed_functions
from orchestrator.config.schema import PipelineSpec, StageSpec
from orchestrator.errors import ChorusError, PipelineBlocked
from orchestrator.plan.memory import (
    machine_view,
    plan_header,
    plan_rows,
    stage_headline,
    stage_wave_lines,
)
from orchestrator.rag.store import DocStore
from orchestrator.units import fmt_bytes
from ui import params_form, pipeline_files, stage_builder
from ui.common import chorus, live_run, md_escape, render_live, render_runs_elsewhere, start_live_run
from ui.params import (
    UNPARSED_KEY,
    fold,
    folded_errors,
    folded_inputs,
    overrides_form,
    param_input,
    param_inputs,
    split_common,
)

BUILDER_KEY = "builder_stages"
DEFAULTS_KEY = "builder_defaults"
NAME_KEY = "pipeline-name"
RUN_SETTINGS_KEY = "run-settings"  # base mode: what the user filled in for this run, by widget key

st.title("chorus")
door = chorus()
if door is None:
    st.stop()
rt: Chorus = door

config_dir, operator_allowed = rt.config.paths.config_dir, rt.config.app.aggregators.allowed
custom_functions = [f.name for f in allowed_functions(config_dir, operator_allowed)]  # the only ones offered
available = sorted(rt.models())  # role: embedding models answer no stage: never offered here
docs_store = DocStore.beside(rt.config.sessions_dir)  # what retrieve stages read; opened only when one is built
status = rt.base_status()
FIELDS = params_form.generation_fields()
SEED = next(f for f in FIELDS if f.name == "seed")
LOAD = params_form.load_fields()  # n_ctx, n_gpu_layers with the schema's bounds

# ---------------------------------------------------------------- mode and question
if status.available:
    mode = st.radio("Mode", ["Base", "Manual"], horizontal=True, key="mode")
else:
    st.radio("Mode", ["Base", "Manual"], index=1, horizontal=True, disabled=True, key="mode_blocked",
             help="Base mode needs every model of pipeline.yaml")
    st.warning(f"Base mode is unavailable: {md_escape(status.reason)}. Manual mode works with the available models.")
    mode = "Manual"

question = st.text_area("Question", key="question", placeholder="Ask something…")


# ---------------------------------------------------------------- manual pipeline builder
def escaped(value: str) -> str:
    """A one-line text box's view of text that may hold line breaks (a separator): \\n as in stop strings."""
    return params_form.lines_to_text([value]) if value else ""


def unescaped(text: str) -> str:
    return (params_form.text_to_lines(text) or [""])[0]


def model_choice(label: str, current: str | None, *, key: str, container: Any = st,
                 optional: bool = False) -> str | None:
    """A registered model (a model a loaded file names but that is not registered stays shown, flagged)."""
    options: list[str | None] = [*available, *([current] if current and current not in available else [])]
    if optional:
        options = [None, *options]
    index = options.index(current) if current in options else (0 if optional else None)
    chosen: str | None = container.selectbox(label, options, index, key=key,
                                             format_func=lambda m: "(none)" if m is None else
                                             (m if m in available else f"{m} (not available)"))
    return chosen


def slot_editor(stage: dict[str, Any], j: int, slot: dict[str, Any]) -> None:
    c = slot["id"]
    with st.container(border=True):
        row = st.columns([3, 3, 2, 1], vertical_alignment="bottom")
        slot["model"] = model_choice(f"Model call {j + 1}", slot["model"], key=f"c{c}-model", container=row[0]) or ""
        slot["label"] = row[1].text_input("Label", slot["label"], key=f"c{c}-label",
                                          placeholder="automatic (model name, -1, -2… when repeated)").strip()
        slot["seed"] = param_input(SEED, key=f"c{c}", value=slot["seed"], hint="stage's", container=row[2])
        if row[3].button("✕", key=f"c{c}-remove", help="Remove this model call"):
            stage_builder.remove_slot(stage, j)
            st.rerun()
        slot["system_prompt"] = st.text_input("System prompt of this call", slot["system_prompt"],
                                              key=f"c{c}-system", placeholder="blank: the stage's system prompt")
        slot.update(folded_inputs("Other parameters of this call", [f for f in FIELDS if f.name != "seed"],
                                  box=f"c{c}-more", key=f"c{c}", values=slot, blank="stage's", errors=form_errors))


def aggregation_editor(stage: dict[str, Any], k: str) -> None:
    a = st.columns(3)
    stage["execution"] = a[0].selectbox("Execution", stage_builder.EXECUTION_MODES,
                                        stage_builder.EXECUTION_MODES.index(stage["execution"]), key=f"s{k}-execution",
                                        help="auto: together when they fit in memory, else one after another")
    stage["on_error"] = a[1].selectbox("On a failed call", stage_builder.ON_ERROR,
                                       stage_builder.ON_ERROR.index(stage["on_error"]), key=f"s{k}-on_error")
    kinds = list(stage_builder.AGGREGATION_KINDS)
    kind = stage["aggregation"] = a[2].selectbox("Merge answers by", kinds, kinds.index(stage["aggregation"]),
                                                 key=f"s{k}-agg")
    b = st.columns(4)
    if kind == "concat":
        stage["separator"] = unescaped(b[0].text_input("Separator", escaped(stage["separator"]), key=f"s{k}-sep",
                                                       help="Between answers; \\n is a line break"))
        stage["label_format"] = b[1].text_input("Label format", stage["label_format"], key=f"s{k}-label-format",
                                                help="Heading of each answer; {label} is the call's label")
    if kind in ("synthesis", "majority_vote"):
        stage["synthesis_model"] = model_choice("Synthesis model", stage["synthesis_model"], key=f"s{k}-synth",
                                                container=b[0], optional=True)
    if kind == "majority_vote":
        vote = stage["vote"]
        vote["extract"] = b[1].selectbox("Vote on", stage_builder.VOTE_EXTRACT,
                                         stage_builder.VOTE_EXTRACT.index(vote["extract"]), key=f"s{k}-vote-extract",
                                         help="whole answer, its last line, or the first match of a regex")
        vote["similarity"] = b[2].number_input("Similarity", 0.0, 1.0, float(vote["similarity"]), 0.05,
                                               key=f"s{k}-vote-similarity",
                                               help="How alike two answers must be to count as one vote")
        vote["tie_break"] = b[3].selectbox("Tie break", stage_builder.VOTE_TIE_BREAK,
                                           stage_builder.VOTE_TIE_BREAK.index(vote["tie_break"]),
                                           key=f"s{k}-vote-tie", help="synthesis needs a synthesis model")
        if vote["extract"] == "regex":
            vote["pattern"] = st.text_input("Pattern", vote.get("pattern") or "", key=f"s{k}-vote-pattern",
                                            help="Python regex; the first group (or the whole match) is the vote")
    if kind == "synthesis" or (kind == "majority_vote" and stage["vote"]["tie_break"] == "synthesis"):
        stage["synthesis_prompt"] = st.text_area("Synthesis prompt (blank: the built-in one)",
                                                 stage["synthesis_prompt"], key=f"s{k}-synth-prompt",
                                                 help="Jinja: question, responses (label, model, text)")
    if kind == "custom_template":
        stage["template"] = st.text_area("Template", stage["template"] or
                                         "{% for r in responses %}{{ r.label }}: {{ r.text }}\n{% endfor %}",
                                         key=f"s{k}-template")
    if kind == "custom":  # a choice among the allowed functions, never a typed module name
        if not custom_functions:
            st.info(md_escape(f"No custom aggregators: put a Python file in {config_dir / 'aggregators'}/ or list "
                              "'package.module:function' under aggregators.allowed in app.yaml."))
        current = stage["function"] if stage["function"] in custom_functions else None
        chosen = b[0].selectbox("Function", custom_functions,
                                None if current is None else custom_functions.index(current), key=f"s{k}-func",
                                help="Functions in the config's aggregators/ folder or listed in app.yaml")
        stage["function"] = chosen or ""
    if kind == "judge":
        stage["judge_model"] = model_choice("Judge model", stage["judge_model"], key=f"s{k}-judge", container=b[0])
        stage["judge_mode"] = b[1].selectbox("Judge mode", stage_builder.JUDGE_MODES,
                                             stage_builder.JUDGE_MODES.index(stage["judge_mode"]),
                                             key=f"s{k}-judge-mode")
        stage["judge_prompt"] = st.text_area("Judge prompt (blank: the built-in one)", stage["judge_prompt"],
                                             key=f"s{k}-judge-prompt")


def collection_names() -> list[str]:
    """The `chorus docs` collections a retrieve stage can read (docs.db is not created just to list none)."""
    if not docs_store.path.exists():
        return []
    try:
        return [c["name"] for c in docs_store.collections()]
    except ChorusError as exc:
        st.error(md_escape(exc))
        return []


def retrieve_editor(stage: dict[str, Any], k: str) -> None:
    """A retrieve stage: its collection, passage count and query; it has no model, prompt or aggregation."""
    names = collection_names()
    current = stage.get("collection")
    options = names + ([current] if current and current not in names else [])
    c = st.columns([3, 1, 2])
    stage["collection"] = c[0].selectbox(
        "Collection", options, options.index(current) if current in options else None, key=f"s{k}-collection",
        placeholder="choose…" if names else "none yet", format_func=lambda n: n if n in names else f"{n} (not found)",
        help="A document collection (Documents page, `chorus docs add`)")
    top_k = c[1].number_input("top_k", 1, 100, min(max(int(stage.get("top_k") or 5), 1), 100), 1,
                              key=f"s{k}-retrieve-top_k", help="How many passages later stages get")
    stage["top_k"] = int(top_k)
    query_from = stage.get("query_from") or "question"
    stage["query_from"] = c[2].radio("Query", stage_builder.QUERY_FROM, stage_builder.QUERY_FROM.index(query_from),
                                     horizontal=True, key=f"s{k}-query_from",
                                     help="Search with the question, or with the previous stage's output")
    if not names:
        st.info("No document collection yet: add a folder on the Documents page (or `chorus docs add`).")


def stage_editor(i: int, stage: dict[str, Any]) -> None:
    k = stage["id"]  # widget keys follow the stage, not its position, so moves keep their values
    stages = st.session_state[BUILDER_KEY]
    with st.container(border=True):
        top = st.columns([3, 1, 1, 1])
        stage["name"] = top[0].text_input("Stage name", stage["name"], key=f"s{k}-name")
        if top[1].button("↑", key=f"s{k}-up", disabled=i == 0, help="Move up"):
            st.session_state[BUILDER_KEY] = stage_builder.move(stages, i, -1)
            st.rerun()
        if top[2].button("↓", key=f"s{k}-down", disabled=i == len(stages) - 1, help="Move down"):
            st.session_state[BUILDER_KEY] = stage_builder.move(stages, i, +1)
            st.rerun()
        if top[3].button("✕", key=f"s{k}-remove", help="Remove stage"):
            st.session_state[BUILDER_KEY] = stage_builder.remove(stages, i)
            st.rerun()
        kinds = stage_builder.STAGE_KINDS
        stage["kind"] = st.radio("Kind", kinds, kinds.index(stage.get("kind") or "generate"), horizontal=True,
                                 key=f"s{k}-kind", help="generate: model calls; retrieve: passages from documents")
        if stage["kind"] == "retrieve":
            retrieve_editor(stage, k)
            return
        for j, slot in enumerate(list(stage["models"])):
            slot_editor(stage, j, slot)
        if st.button("➕ Add model call", key=f"s{k}-add-call", disabled=not available,
                     help="The same model may be called several times, each call with its own label and settings"):
            last = stage["models"][-1]["model"] if stage["models"] else (available[0] if available else "")
            stage_builder.add_slot(stage, last)
            st.rerun()
        stage["system_prompt"] = st.text_area("System prompt", stage["system_prompt"], key=f"s{k}-system",
                                              height=68)
        stage["prompt"] = st.text_input("Prompt template", stage["prompt"], key=f"s{k}-prompt",
                                        help="Jinja: question, previous, stages.<name>.output")
        common, more = split_common(FIELDS)
        stage.update(param_inputs(common, key=f"s{k}", values=stage, blank="default", errors=form_errors))
        c = st.columns(4)
        n_ctx = c[0].number_input("n_ctx", *params_form.int_bounds(LOAD["n_ctx"]), stage["n_ctx"], 256,
                                  key=f"s{k}-n_ctx", placeholder="the model's default", help=LOAD["n_ctx"].help)
        stage["n_ctx"] = None if n_ctx is None else int(n_ctx)
        ngl = c[1].number_input("n_gpu_layers", *params_form.int_bounds(LOAD["n_gpu_layers"]),
                                value=stage["n_gpu_layers"], step=1, key=f"s{k}-ngl", placeholder="the model's default",
                                help=LOAD["n_gpu_layers"].help)
        stage["n_gpu_layers"] = None if ngl is None else int(ngl)
        stage.update(folded_inputs("More sampling parameters (stop strings, penalties, mirostat, grammar…)", more,
                                   box=f"s{k}-more", key=f"s{k}", values=stage, blank="default", errors=form_errors))
        aggregation_editor(stage, k)


def stage_summary(stage: StageSpec) -> str:
    return ", ".join(m.label or m.model for m in stage.models) or f"retrieve from {stage.collection}"


def load_saved() -> None:
    """Load button callback: runs before the page, so the builder's widgets can be reset to the file."""
    name = st.session_state.get("load-choice")
    st.session_state.pop("save-confirm", None)
    try:
        spec = pipeline_files.load(config_dir, name or "")
    except ChorusError as exc:
        st.session_state["pipeline-message"] = ("error", str(exc))
        return
    stages, defaults = stage_builder.from_spec(spec)
    st.session_state[BUILDER_KEY], st.session_state[DEFAULTS_KEY] = stages, defaults
    for key in [k for k in st.session_state if isinstance(k, str) and k.startswith("pd-")]:
        del st.session_state[key]  # the defaults' widgets show the loaded values
    unparsed = st.session_state.get(UNPARSED_KEY, {})
    for key in [k for k in unparsed if k.startswith("pd-")]:
        del unparsed[key]  # nor text typed before
    st.session_state[NAME_KEY] = pipeline_files.check_name(name or "")  # saving again replaces this file
    st.session_state["pipeline-desc"] = spec.description
    st.session_state["pipeline-message"] = ("success", f"Loaded {pipeline_files.path_for(config_dir, name or '')}")


def save_section(spec: PipelineSpec | None, save_clicked: bool, overwrite_clicked: bool, name: str) -> None:
    """Save after the builder is read (so the file is what is on screen); an existing file needs a yes."""
    if not (save_clicked or overwrite_clicked):
        return
    confirmed = overwrite_clicked and st.session_state.get("save-confirm") == name
    st.session_state.pop("save-confirm", None)
    if spec is None:
        st.session_state["pipeline-message"] = ("error", "Fix the errors shown below the builder before saving.")
        st.rerun()
    try:
        path = pipeline_files.save(config_dir, name, spec, overwrite=confirmed)
    except pipeline_files.PipelineExists:
        st.session_state["save-confirm"] = name
        st.session_state.pop("pipeline-message", None)  # an earlier "Saved" beside "Replace it?" read as done
    except ChorusError as exc:
        st.session_state["pipeline-message"] = ("error", str(exc))
    else:
        st.session_state["pipeline-message"] = ("success", f"Saved {path}")
    st.rerun()


spec: PipelineSpec | None = None
assignments: list[str] = []  # base mode: this run's settings, applied (and checked) by the front door
form_errors: list[str] = []  # text boxes that do not parse (JSON): shown, and the run is refused
save_clicked = overwrite_clicked = False
run_mode: Literal["base", "manual"] = "base" if mode == "Base" else "manual"
if mode == "Base":
    try:
        spec = rt.config.load_pipeline()
    except ChorusError as exc:
        st.error(md_escape(exc))
    if spec is not None:
        st.caption(md_escape(" → ".join(f"{s.name} ({stage_summary(s)})" for s in spec.stages)))
        # (scope, its current values): the pipeline's defaults, then each stage. What the user fills in is
        # kept by widget key, so a folded box or another tab still applies to the run.
        scopes = [("defaults", params_form.current_values(spec.defaults, FIELDS)),
                  *((s.name, params_form.current_values(s, FIELDS)) for s in spec.stages)]
        filled: dict[str, dict[str, Any]] = st.session_state.setdefault(RUN_SETTINGS_KEY, {})
        shown: set[str] = set()
        box, is_open = fold("Generation settings for this run", key="gen-open")
        if is_open:
            with box:
                st.caption("Blank keeps the pipeline's value (shown greyed). 'All stages' sets the pipeline's "
                           "defaults: a stage or model call with its own value keeps it; set it on that stage's tab.")
                tabs = st.tabs(["All stages", *(s.name for s in spec.stages)], key="gen-tab", on_change="rerun")
                for tab, (scope, current) in zip(tabs, scopes, strict=True):
                    if tab.open:
                        with tab:
                            filled[f"gen-{scope}"] = overrides_form(FIELDS, key=f"gen-{scope}", current=current,
                                                                    filled=filled.get(f"gen-{scope}"),
                                                                    errors=form_errors)
                        shown.add(scope)
        for scope, _ in scopes:
            if scope not in shown:
                folded_errors(FIELDS, key=f"gen-{scope}", errors=form_errors)
            form_errors += params_form.together_errors(filled.get(f"gen-{scope}", {}), scope)  # grammar + json_schema
            assignments += params_form.overrides(filled.get(f"gen-{scope}", {}), scope)
else:
    if not available:
        st.error("No model is available. Check `chorus models` for the reasons.")
    stages = st.session_state.setdefault(BUILDER_KEY, [stage_builder.new_stage(1, available)])
    defaults = st.session_state.setdefault(DEFAULTS_KEY, {})
    with st.expander("Pipeline: save, load"):
        saved = pipeline_files.list_saved(config_dir)
        row = st.columns([3, 1], vertical_alignment="bottom")
        row[0].selectbox(f"Saved pipelines (in {md_escape(pipeline_files.pipelines_dir(config_dir))})", saved,
                         index=None, key="load-choice", placeholder="none saved yet" if not saved else "choose…")
        row[1].button("Load", key="load", on_click=load_saved, disabled=not saved)
        row = st.columns([3, 1], vertical_alignment="bottom")
        st.session_state.setdefault(NAME_KEY, "manual")  # set here, not as value=: Load sets it too
        name = row[0].text_input("Name", key=NAME_KEY,
                                 help="Letters, digits, '-' and '_'; saved as pipelines/NAME.yaml").strip()
        save_clicked = row[1].button("Save", key="save")
        if st.session_state.get("save-confirm") == name:
            st.warning(md_escape(f"{pipeline_files.path_for(config_dir, name)} exists. Replace it?"))
            confirm = st.columns([1, 1, 4])
            overwrite_clicked = confirm[0].button("Replace", key="save-overwrite", type="primary")
            if confirm[1].button("Cancel", key="save-cancel"):
                st.session_state.pop("save-confirm", None)
                st.rerun()
        st.session_state.setdefault("pipeline-desc", "")
        description = st.text_input("Description", key="pipeline-desc")
        message = st.session_state.get("pipeline-message")
        if message:
            (st.success if message[0] == "success" else st.error)(md_escape(message[1]))
    box, is_open = fold("Pipeline defaults", key="defaults-open")  # not "pd-": loading resets those keys
    if is_open:
        with box:
            st.caption("Every stage inherits these; blank: the model's or server's default.")
            defaults.update(param_inputs(FIELDS, key="pd", values=defaults, blank="not set", errors=form_errors))
            c = st.columns(4)
            for col, key, step in ((c[0], "n_ctx", 256), (c[1], "n_gpu_layers", 1)):  # the schema's bounds
                value = col.number_input(key, *params_form.int_bounds(LOAD[key]), defaults.get(key), step,
                                         key=f"pd-{key}", placeholder="not set", help=LOAD[key].help)
                defaults[key] = None if value is None else int(value)
            defaults["stream_reasoning"] = c[2].checkbox(
                "Stream stages as reasoning", value=defaults.get("stream_reasoning", True), key="pd-stream_reasoning",
                help="chorus api: a streamed answer shows every earlier stage as `reasoning_content` (a thinking "
                     "block in Open WebUI); off: only chorus-aware clients see them")
    else:
        folded_errors(FIELDS, key="pd", errors=form_errors)
    st.subheader("Stages")
    for i, stage in enumerate(stages):
        stage_editor(i, stage)
    if st.button("➕ Add stage", key="add-stage"):
        stages.append(stage_builder.new_stage(len(stages) + 1, available))
        st.rerun()
    try:
        spec = stage_builder.build_spec(stages, name=name if pipeline_files.valid_name(name) else "manual",
                                        description=description, defaults=defaults)
    except ChorusError as exc:
        st.error(md_escape(exc))
    else:
        for note in stage_builder.warnings(spec):  # e.g. {{ previous }} in the first stage: said, not refused
            st.warning(md_escape(note))

for problem in form_errors:
    st.error(md_escape(problem))
pipeline: Pipeline | None = None
if spec is not None and not form_errors:  # the front door's checks: models registered, aggregators allowed
    try:
        pipeline = rt.pipeline(spec, mode=run_mode, overrides=assignments, override_source="this run's settings",
                               require_models=True)
    except PipelineBlocked as exc:
        st.error(md_escape(f"Not available here: {', '.join(exc.missing)}. Choose registered models "
                           "(see the Models page)."))
    except ChorusError as exc:
        st.error(md_escape(exc))

if mode == "Manual":
    save_section(pipeline.spec if pipeline else None, save_clicked, overwrite_clicked, name)

# ---------------------------------------------------------------- memory plan
allow_sequential = True
fits_somehow = True
if pipeline is not None:
    planned: Planned | None = None
    try:
        planned = rt.plan(pipeline)  # resolved once: the memory plan, its warning and the machine view read it
    except ChorusError as exc:
        st.error(md_escape(exc))
    # The box's content (the chart, a matplotlib PNG, most of a rerun's time, and a table per stage) is built
    # only while it is open: the page reruns on every widget change, and a closed box's content would be
    # drawn and thrown away each time. What the user must see (does not fit) is said outside it.
    memory_box = st.expander("Memory plan", expanded=False, key="memory-plan", on_change="rerun")
    if planned is not None and memory_box.open:
        with memory_box:
            run_plan, plan = planned.run, planned.memory
            res = rt.config.app.resources
            st.caption(md_escape(plan_header(plan, res.fraction, res.fixed_mib)))
            from orchestrator.charts import memory_chart  # matplotlib: imported when first drawn

            st.pyplot(memory_chart(plan), clear_figure=False)  # per device, per wave: weights, KV, compute
            for sp in plan.stages:
                st.markdown(f"**{md_escape(sp.stage)}** — {md_escape(stage_headline(sp))}")
                st.dataframe([{"wave": r["wave"], "model": r["model"], "calls": r["labels"], "slots": r["slots"],
                               "server": r["server"], "RAM": fmt_bytes(r["need"].ram_bytes),
                               "VRAM": fmt_bytes(r["need"].vram_bytes), "source": r["need"].source}
                              for r in plan_rows(sp)], hide_index=True)
                for line in stage_wave_lines(sp):
                    st.text(line)
            machines = machine_view(run_plan, plan)  # RPC workers and remote endpoints, when any
            if len(machines) > 1:
                st.markdown("**Per machine**")
                st.dataframe([{"machine": m.machine, "runs": ", ".join(m.models),
                               "needs": fmt_bytes(m.need_bytes) if m.need_bytes is not None else "-",
                               "free": fmt_bytes(m.have_bytes) if m.have_bytes is not None else "-",
                               "note": m.note} for m in machines], hide_index=True)
    if planned is not None and planned.memory.fits_nowhere:  # one after another cannot help: no Run
        st.error(md_escape("Not enough memory for this pipeline, even one model at a time: "
                           + "; ".join(f"{sp.stage}: {sp.reason}" for sp in planned.memory.fits_nowhere)
                           + ". Lower n_ctx, or choose a smaller model."))
        fits_somehow = False  # the run would fail at once: no Run
    elif planned is not None and not all(sp.fits_together for sp in planned.memory.stages):
        tight = [sp for sp in planned.memory.stages if not sp.fits_together]
        st.warning(md_escape("Not enough memory to run these models together: "
                             + "; ".join(f"{sp.stage}: {sp.reason}" for sp in tight)))
        if mode == "Manual":
            allow_sequential = st.checkbox("Run sequentially (one wave after another)", value=False,
                                           key="allow_sequential")

# ---------------------------------------------------------------- run / stop
live = live_run()
running = live is not None and not live.done
cols = st.columns([1, 1, 4])
# Enabled whatever the question box shows: a text area sends its text only when it loses focus, so a button
# that waits for text stays disabled while the user types and swallows the first click.
run_clicked = cols[0].button("Run", type="primary", disabled=pipeline is None or running or not fits_somehow, key="run")
if run_clicked and pipeline is not None:
    if not question.strip():
        st.warning("Type a question first.")
    else:
        chosen, q, allow = pipeline, question.strip(), allow_sequential
        if start_live_run(lambda observer, cancel: rt.run(
                chosen, q, observers=[observer], cancel=cancel, allow_sequential=allow), q) is not None:
            st.rerun()
if live is not None and running and cols[1].button("Stop", key="stop"):
    live.cancel()
if not running:
    render_runs_elsewhere(key="run")  # after a reload, or from another tab: shown again, and so stoppable


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
