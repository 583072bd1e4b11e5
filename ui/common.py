"""What every page shares: the cached front door (`Chorus`), and renderers for sessions and live runs.

Only rendering lives here; pages ask the front door (orchestrator.app) for everything else.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from orchestrator.app import Chorus
from orchestrator.config.schema import PipelineSpec
from orchestrator.errors import ChorusError
from orchestrator.history.store import Session
from orchestrator.rag.retrieval import cited
from orchestrator.records import StageRecord
from orchestrator.runs import RunOutcome
from ui import params_form
from ui.auth import gate
from ui.background import ACTIVE
from ui.live import LiveRun, StageView
from ui.params import overrides_form


def config_dir() -> str | None:
    return os.environ.get("CHORUS_CONFIG_DIR") or None


@st.cache_resource(show_spinner=False)
def _chorus(config_dir: str | None) -> Chorus:
    """One front door (and so one pool of warm servers) per config dir for the whole Streamlit process."""
    return Chorus.from_dir(config_dir)


def chorus() -> Chorus | None:
    """The shared front door, or None after showing the config error (the page still renders).

    Every page needs it before it shows or does anything, so the sign-in gate is here too: a page file run
    without app.py (a folder named pages/ is run that way by Streamlit; ui/views/ is not) still asks for it.
    """
    gate()
    try:
        return _chorus(config_dir())
    except ChorusError as exc:
        st.error(f"Configuration error: {exc}")
        return None




def fmt_time(ts: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) and ts else "-"


# ---------------------------------------------------------------- text, never Markdown
# Questions, prompts, model output, labels and error messages are user or model text: rendered as Markdown,
# `![x](http://host/...)` would make every browser that opens the page fetch that URL (a data-leak channel).
# They go out through st.text / st.code, or escaped where a widget renders Markdown (captions, alerts,
# expander labels).

_MD_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character (CommonMark escapes)
_MD_SYNTAX = re.compile(r"([!-/;-@\[-`{-~])")  # the same but ':' (Streamlit's :color[...] needs '[', and
# :emoji: / :material/icon: shortcodes fetch nothing), so labels such as "Step 1: answer" read as they are


def md_escape(text: object) -> str:
    """`text` for a Markdown-rendering widget, shown as it is: ASCII punctuation is backslash-escaped, so no
    link, image, HTML, emphasis, directive or math is formed; newlines stay line breaks."""
    return _MD_SYNTAX.sub(r"\\\1", str(text)).replace("\n", "  \n")


def html_text(text: str) -> str:
    """`text` for an HTML block (unsafe_allow_html): every ASCII punctuation is a character reference, so
    neither HTML nor Markdown is formed; newlines become <br>."""
    return "<br>".join(_MD_PUNCTUATION.sub(lambda m: f"&#{ord(m.group(1))};", line) for line in text.split("\n"))


# ---------------------------------------------------------------- live runs

LIVE_KEY = "live_run"
BUSY = "A run is in progress: stop it on the Run page, or wait for it, before starting another here."


def live_run() -> LiveRun | None:
    return st.session_state.get(LIVE_KEY)


def running_here() -> bool:
    live = live_run()
    return live is not None and not live.done


def start_live_run(start: Callable[..., RunOutcome], title: str) -> LiveRun | None:
    """This browser session's run, or None (and a message) while its last one is still going: a second run
    would take its place on the Run page, and the first could no longer be watched or stopped."""
    if running_here():
        st.error(BUSY)
        return None
    live = LiveRun(start, title)
    st.session_state[LIVE_KEY] = live
    st.session_state["live_rendered_final"] = False
    return live


def runs_elsewhere() -> list[LiveRun]:
    """Runs of this process that this browser session is not showing: one started before a reload, or in
    another tab."""
    mine = live_run()
    return [r for r in ACTIVE.running(LiveRun) if r is not mine]


def render_runs_elsewhere(*, key: str) -> None:
    """Each run going on that this session does not show, with a button that shows it here (and so its Stop)."""
    for i, run in enumerate(runs_elsewhere()):
        row = st.columns([5, 1], vertical_alignment="center")
        row[0].info(md_escape(f"A run started at {fmt_time(run.started_at)} is in progress: {run.title}"))
        if row[1].button("Show it", key=f"{key}-attach-{i}", help="Follow it here, with its Stop button"):
            st.session_state[LIVE_KEY] = run
            st.session_state["live_rendered_final"] = False
            st.switch_page(page_path("run"))


def render_live_stages(stages: list[StageView]) -> None:
    for stage in stages:
        color = {"running": "blue", "ok": "green", "partial": "orange", "failed": "red", "cancelled": "gray",
                 "copied": "violet"}.get(stage.status, "gray")
        with st.container(border=True):
            st.markdown(f"**Step {stage.index}: {md_escape(stage.name)}** :{color}-badge[{md_escape(stage.status)}]")
            models = list(stage.models.values())
            cols = st.columns(min(len(models), 3)) if models else []
            for i, m in enumerate(models):
                with cols[i % len(cols)]:
                    st.caption(md_escape(f"{m.label} ({m.model}) — {m.status}"))
                    if m.error:
                        st.error(md_escape(m.error))
                    st.text(m.text or "…")
                    if m.tokens:
                        st.caption(f"{m.tokens} tokens in {m.seconds or 0:.1f}s"
                                   + (f", {m.tokens_per_s:.1f} tok/s" if m.tokens_per_s else ""))
            if stage.merged_by == "retrieve" and stage.output:  # a retrieve stage: its passages, no model
                st.text(stage.output)
            if stage.merged_by and len(models) > 1:
                st.markdown(f"*Merged by {md_escape(stage.merged_by)}:*")
                st.text(stage.output)
            if stage.error and stage.status in ("failed", "cancelled"):
                st.error(md_escape(stage.error))


def render_live(live: LiveRun) -> None:
    """Live progress; returns after one render (the caller's fragment polls)."""
    for note in live.notices:
        st.info(md_escape(note))
    render_live_stages(live.snapshot())
    if live.error:
        st.error(f"The run could not start: {md_escape(live.error.text())}")
    outcome = live.outcome
    if outcome is not None:
        if outcome.history_error:
            st.warning(md_escape(outcome.history_error))
        run = outcome.run
        if run.status == "completed":
            st.success(f"Completed — session {md_escape(outcome.session_id or '(not saved)')}")
            st.subheader("Final answer")
            st.markdown(f'<div id="chorus-final-answer">{html_text(run.final)}</div>', unsafe_allow_html=True)
        else:
            reason = run.error.text() if run.error else ""
            saved = f" — session {outcome.session_id}" if outcome.session_id else " (not saved)"
            st.error(md_escape(f"Run {run.status}" + (f": {reason}" if reason else "") + saved))


# ---------------------------------------------------------------- saved sessions

def render_session(session: Session, *, key: str) -> None:
    m = session.meta
    st.markdown(md_escape(f"{session.id} · {m.get('mode')} · {m.get('status')} · {fmt_time(m.get('created_at'))}"))
    if session.problems:
        st.warning(md_escape(f"This session is damaged; showing what could be read: {'; '.join(session.problems)}"))
    try:
        error = session.error  # why the run failed or was cancelled (session.json's 'error')
    except ChorusError as exc:
        st.warning(md_escape(f"The run's error could not be read: {exc}"))
    else:
        if error is not None:
            st.error(md_escape(f"Run {m.get('status') or 'failed'}: {error.text()}"))
    if m.get("parent_session"):
        st.caption(md_escape(f"Rerun of {m['parent_session']} from stage {m.get('rerun_from_stage')}"))
    render_session_downloads(session, key=key)
    st.markdown("**Question:**")
    st.text(m.get("question") or "")
    for stage in session.stages:
        with st.expander(md_escape(f"Step {stage.index}: {stage.name} — {stage.status}"), expanded=True):
            st.caption("Query:" if stage.params.get("kind") == "retrieve" else "Prompt:")
            st.text(stage.prompt[:300])
            if stage.params.get("sources"):
                st.caption(md_escape("Sources in this prompt: " + "; ".join(
                    f"step {s.get('step')}: [" + "], [".join(map(str, s.get("passages", []))) + "]"
                    for s in stage.params["sources"])))
            for r in stage.responses:
                st.markdown(md_escape(f"{r.label} ({r.model}) — {r.status}"))
                if r.error:
                    st.error(md_escape(r.error.text()))
                if r.text:
                    st.text(r.text)
                if r.completion_tokens:
                    st.caption(f"{r.completion_tokens} tokens · {r.total_s or 0:.2f}s"
                               + (f" · {r.tokens_per_s:.1f} tok/s" if r.tokens_per_s else "")
                               + (f" · first token {r.first_token_s:.2f}s" if r.first_token_s else ""))
            agg = stage.aggregation
            if agg is not None and len(stage.responses) > 1:
                st.markdown(f"**Aggregation: {md_escape(agg.kind)}**")
                if "agreement" in agg.details:
                    st.metric("Agreement", f"{agg.details['agreement']:.0%}")
                    st.dataframe([{k: v.get(k) for k in ("label", "extracted", "group", "abstained")}
                                  for v in agg.details.get("votes", [])], hide_index=True)
                if "synthesis_prompt" in agg.details:
                    timing = "".join(f" · {c['completion_tokens']} tokens in {c['total_s']:.2f}s"
                                     for c in agg.details.get("synthesis_calls", [])
                                     if c.get("completion_tokens") and c.get("total_s"))
                    st.caption(md_escape(f"Synthesis by {agg.details.get('synthesis_model')}{timing}"))
                    st.code(agg.details["synthesis_prompt"], language=None)
                if agg.kind == "judge":
                    render_judge(agg.details)
                st.text(agg.output)
            if stage.error:
                st.error(md_escape(stage.error.text()))
    retrieved = [s for s in session.stages if s.aggregation is not None and s.aggregation.kind == "retrieve"]
    if session.final is not None:
        answer, sources = st.columns([3, 2]) if retrieved else (st.container(), None)
        with answer:
            st.subheader("Final answer")
            st.text(session.final)
        if sources is not None:
            with sources:
                render_sources(retrieved, session.final)
    render_timeline(session)
    render_rerun_form(session, key=key)


def _points(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "-"


def render_judge(details: dict[str, Any]) -> None:
    """A judge aggregation's verdicts: each answer's score and reason, or each pair in both orders, and the
    winner. Reasons are model text: shown with st.text, labels escaped."""
    st.caption(md_escape(f"Judged by {details.get('judge_model')} ({details.get('judge_mode', 'score')})"))
    for s in details.get("scores") or []:
        if isinstance(s, dict):
            st.markdown(md_escape(f"{s.get('label')} ({s.get('model')}): score {_points(s.get('score'))}/10"
                                  + (" (asked twice)" if s.get("retried") else "")))
            st.text(str(s.get("reason") or ""))
    for pair in details.get("pairs") or []:
        if not isinstance(pair, dict):
            continue
        position = "" if pair.get("consistent", True) else " (the verdict depends on the order shown)"
        verb = {"win": "beats", "tie": "ties with", "loss": "loses to"}.get(str(pair.get("outcome")), "vs")
        st.markdown(md_escape(f"{pair.get('a')} {verb} {pair.get('b')}: {_points(pair.get('points_a'))} "
                              f"point(s) of 1{position}"))
        for order in pair.get("orders") or []:
            if isinstance(order, dict):
                st.caption(md_escape(f"A = {order.get('first')}, B = {order.get('second')}: "
                                     f"{order.get('winner') or 'tie'}"))
                st.text(str(order.get("reason") or ""))
    if details.get("winner_label") is not None:
        tie = details.get("tie")
        st.markdown(md_escape(f"Winner: {details['winner_label']} ({_points(details.get('winner_score'))})"
                              + (f", tied with {', '.join(map(str, tie))}: the first wins" if tie else "")))


def render_session_downloads(session: Session, *, key: str) -> None:
    """The session as a Markdown report and as JSON (what `chorus history export` writes)."""
    from orchestrator.history.export import FORMATS, default_export_name, export_session

    labels = {"md": ("Download report (Markdown)", "text/markdown"), "json": ("Download JSON", "application/json")}
    for col, fmt in zip(st.columns([1, 1, 2])[:2], FORMATS, strict=True):
        label, mime = labels[fmt]
        col.download_button(label, export_session(session, fmt), file_name=default_export_name(session, fmt),
                            mime=mime, key=f"download-{fmt}-{key}", on_click="ignore")


def render_timeline(session: Session) -> None:
    """One bar per model call with its tokens/s (orchestrator.charts)."""
    from orchestrator.charts import timeline_chart

    if not any(s.responses for s in session.stages):
        return
    st.subheader("Timeline")
    st.pyplot(timeline_chart(session), alt=f"Timeline of {session.id}: one bar per model call")


def render_rerun_form(session: Session, *, key: str) -> None:
    """'Rerun from this stage' with any generation parameter changed, per stage or for all stages (the same
    controls as the Run page, read from GenerationParams); it starts a LiveRun shown on the Run page."""
    if not session.stages:
        return
    try:
        pipeline = PipelineSpec.model_validate(session.snapshot.get("pipeline") or {})
    except ValueError:
        pipeline = None
    names = [f"{s.index}: {s.name}" for s in session.stages]
    st.markdown("**Rerun from a stage**")
    choice = st.selectbox("Stage", names, key=f"rerun-stage-{key}",
                          help="Earlier steps are copied from this session; this one and the later ones run again")
    index = names.index(choice) + 1
    fields = params_form.generation_fields()
    errors: list[str] = []
    with st.form(f"rerun-{key}"):
        assignments: list[str] = []
        if pipeline is not None:
            st.caption("Blank keeps the session's value (shown greyed). 'All stages' sets the pipeline's defaults: "
                       "a stage or model call with its own value keeps it; set it on that stage's tab.")
            rerun_stages = pipeline.stages[index - 1:]
            tabs = st.tabs(["All stages", *(s.name for s in rerun_stages)])
            with tabs[0]:
                values = overrides_form(fields, key=f"rerun-{key}-defaults", errors=errors,
                                        current=params_form.current_values(pipeline.defaults, fields))
                errors += params_form.together_errors(values, "defaults")  # grammar with json_schema: refused
                assignments += params_form.overrides(values, "defaults")
            for tab, stage in zip(tabs[1:], rerun_stages, strict=True):
                with tab:
                    values = overrides_form(fields, key=f"rerun-{key}-s-{stage.name}", errors=errors,
                                            current=params_form.current_values(stage, fields))
                    errors += params_form.together_errors(values, stage.name)
                    assignments += params_form.overrides(values, stage.name)
        submitted = st.form_submit_button("Rerun from this stage", disabled=running_here(),
                                          help=BUSY if running_here() else None)
    if submitted:
        for problem in errors:
            st.error(md_escape(problem))
        if errors:
            return
        door = chorus()
        if door is None:
            return
        try:  # refused here, with the field, rather than after the page has switched
            prepared = door.prepare_rerun(session.id, index, overrides=assignments, override_source="rerun settings")
        except ChorusError as exc:
            st.error(md_escape(exc))
            return
        if start_live_run(lambda observer, cancel: door.rerun(prepared, observers=[observer], cancel=cancel),
                          f"rerun of {session.id} from stage {index}") is not None:
            st.switch_page(page_path("run"))


def page_path(name: str) -> str:
    return str(Path(__file__).parent / "views" / f"{name}.py")


def render_sources(stages: list[StageRecord], answer: str) -> None:
    """The passages retrieve stages gave the run, beside the answer: [n], file, page or heading, the text, and
    a file:// link (with #page=N for a PDF) to open the source; the ones the answer cites come first."""
    st.subheader("Sources")
    for stage in stages:
        details = stage.aggregation.details if stage.aggregation is not None else {}
        passages = [p for p in details.get("passages", []) if isinstance(p, dict)]
        numbers = cited(answer, len(passages))
        st.caption(md_escape(f"Step {stage.index}: {len(passages)} passage(s) from '{details.get('collection')}' "
                             f"({details.get('ranking', 'bm25')}); the answer cites "
                             + (", ".join(f"[{n}]" for n in numbers) if numbers else "none")))
        for p in sorted(passages, key=lambda p: (p.get("n") not in numbers, p.get("n", 0))):
            mark = " · cited" if p.get("n") in numbers else ""
            with st.expander(md_escape(f"[{p.get('n')}] {p.get('source') or p.get('file')}{mark}"),
                             expanded=bool(mark)):
                st.text(str(p.get("text", "")))
                file = str(p.get("file", ""))
                if file.startswith("/"):
                    st.code(Path(file).as_uri() + (f"#page={p['page']}" if p.get("page") else ""), language=None)
                st.caption(md_escape(f"bytes {p.get('byte_start')}-{p.get('byte_end')}"))
