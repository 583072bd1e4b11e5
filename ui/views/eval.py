"""Eval page: start an eval (pipeline vs its members, optionally judged), watch it, and read past evals:
a table per system, score with 95% error bars, win/tie/loss bars, and every item linked to its sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from orchestrator.app import Chorus
from orchestrator.errors import ChorusError
from orchestrator.eval.items import BUNDLED, load_questions
from orchestrator.eval.report import EvalReport, build_report
from orchestrator.eval.store import EvalStore
from ui.background import ACTIVE
from ui.common import chorus, fmt_time, md_escape, page_path
from ui.eval_live import LiveEval

LIVE_EVAL_KEY = "live_eval"

st.title("Eval")
st.caption("Does the pipeline beat its own models? Every question runs through the pipeline and through each "
           "of its models alone; answers are scored against the reference and, optionally, by a judge model.")
door = chorus()
if door is None:
    st.stop()
rt: Chorus = door
store = EvalStore(rt.config.sessions_dir)
live: LiveEval | None = st.session_state.get(LIVE_EVAL_KEY)
running = live is not None and not live.done
if not running:  # an eval started before a reload, or in another tab: shown again, and so stoppable
    for i, other in enumerate(e for e in ACTIVE.running(LiveEval) if e is not live):
        row = st.columns([5, 1], vertical_alignment="center")
        row[0].info(md_escape(f"{other.eval_id}, started at {fmt_time(other.started_at)}, is in progress."))
        if row[1].button("Show it", key=f"eval-attach-{i}", help="Follow it here, with its Stop button"):
            st.session_state[LIVE_EVAL_KEY] = other
            st.session_state["eval-open"] = other.eval_id
            st.rerun()

# ---------------------------------------------------------------- start
with st.expander("Start an eval", expanded=not store.list(limit=1)):
    source = st.radio("Questions", ["Bundled basic set (40 questions)", "A JSONL file"], horizontal=True,
                      key="eval-source")
    path = st.text_input("Question file (.jsonl)", key="eval-path", disabled=source.startswith("Bundled"),
                         help='One JSON object per line: {"question": ..., "answer" | "number" | "regex": ...}')
    cols = st.columns(4)
    limit = int(cols[0].number_input("Questions (0 = all)", 0, 100_000, 0, key="eval-limit"))
    concurrency = int(cols[1].number_input("At once (0 = what fits)", 0, 16, 0, key="eval-concurrency",
                                           help="Items run at once, sharing the servers' slots; 0: as many as "
                                                "fit in memory (at most server.max_slots)"))
    baselines = cols[2].checkbox("Members alone", True, key="eval-baselines",
                                 help="Each model of the pipeline alone, with its generation parameters")
    judges = [None, *sorted(rt.registry.generators)]
    judge = cols[3].selectbox("Judge model", judges, key="eval-judge", format_func=lambda m: m or "(none)")
    if st.button("Start eval", type="primary", key="eval-start", disabled=running):
        try:
            file = BUNDLED if source.startswith("Bundled") else Path(path.strip())
            items = load_questions(file, limit=limit or None)
            spec = rt.eval_spec(rt.eval_pipeline(), baselines=baselines, judge=judge,
                                concurrency=concurrency or None)
            eval_id = rt.start_eval(spec, items, source="bundled:basic.jsonl" if file == BUNDLED else str(file))
        except ChorusError as exc:
            st.error(md_escape(exc))
        else:
            st.session_state[LIVE_EVAL_KEY] = LiveEval(eval_id, lambda on_progress, cancel: rt.eval_runner(
                on_progress=on_progress).run(eval_id, cancel=cancel))
            st.session_state["eval-open"] = eval_id
            st.rerun()


@st.fragment(run_every=0.5)
def progress_view() -> None:
    current: LiveEval | None = st.session_state.get(LIVE_EVAL_KEY)
    if current is None:
        return
    p = current.progress
    eta = f" · ETA {p.eta_s:.0f}s" if p.eta_s is not None else ""
    st.progress(p.fraction, text=md_escape(f"{current.eval_id}: {p.done}/{p.total}{eta} · {p.last}"))
    if current.error:
        st.error(f"The eval stopped: {md_escape(current.error.text())}")
    if not current.done and st.button("Stop", key="eval-stop"):
        current.cancel()
    if current.done and not st.session_state.get("eval-rendered-final"):
        st.session_state["eval-rendered-final"] = True
        st.rerun()


if live is not None:
    if not live.done:
        st.session_state["eval-rendered-final"] = False
    progress_view()


# ---------------------------------------------------------------- results

def interval_rows(report: EvalReport) -> list[dict[str, Any]]:
    rows = []
    for s in report.systems:
        if s.accuracy is not None:
            rows.append({"system": s.system, "metric": "accuracy (%)", "mean": 100 * s.accuracy.mean,
                         "low": 100 * s.accuracy.low, "high": 100 * s.accuracy.high, "top": 100})
        if s.judge_score is not None:
            rows.append({"system": s.system, "metric": "judge score (0-10)", "mean": s.judge_score.mean,
                         "low": s.judge_score.low, "high": s.judge_score.high, "top": 10})
    return rows


def score_chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean per system with its 95% bootstrap interval as error bars, one panel per metric, each on its whole
    scale (0-100 %, 0-10): scores all 0 made a panel of one flat line on a "0.000000" axis."""
    return {"data": {"values": rows}, "facet": {"column": {"field": "metric", "type": "nominal", "title": None}},
            "resolve": {"scale": {"y": "independent"}},
            "spec": {"layer": [
                {"mark": {"type": "errorbar", "ticks": True},
                 "encoding": {"x": {"field": "system", "type": "nominal"},
                              "y": {"field": "low", "type": "quantitative", "title": "score"},
                              "y2": {"field": "high"}}},
                {"mark": {"type": "rule", "opacity": 0},  # the metric's whole range: the axis shows it
                 "encoding": {"x": {"field": "system", "type": "nominal"},
                              "y": {"datum": 0, "type": "quantitative"}, "y2": {"field": "top"}}},
                {"mark": {"type": "point", "filled": True, "size": 80},
                 "encoding": {"x": {"field": "system", "type": "nominal"},
                              "y": {"field": "mean", "type": "quantitative"},
                              "tooltip": [{"field": "mean", "format": ".2f"}, {"field": "low", "format": ".2f"},
                                          {"field": "high", "format": ".2f"}]}}]}}


def wtl_rows(report: EvalReport) -> list[dict[str, Any]]:
    rows = []
    for v in report.versus:
        for method, counts in (("reference", v.by_reference), ("judge", v.by_judge)):
            rows += [{"versus": f"vs {v.baseline} ({method})", "outcome": outcome, "count": n}
                     for outcome, n in counts.items() if sum(counts.values())]
    return rows


def wtl_chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"data": {"values": rows}, "mark": "bar",
            "encoding": {"y": {"field": "versus", "type": "nominal", "title": None},
                         "x": {"field": "count", "type": "quantitative", "stack": "zero", "title": "items"},
                         "color": {"field": "outcome", "type": "nominal",
                                   "scale": {"domain": ["win", "tie", "loss"],
                                             "range": ["#2e7d32", "#9e9e9e", "#c62828"]}},
                         "order": {"field": "outcome"}}}


def render_report(report: EvalReport) -> None:
    e = report.eval
    judge = (e["spec"].get("judge") or {}).get("model")
    st.markdown(md_escape(f"{report.id} · {e['status']} · {fmt_time(e.get('created_at'))} · pipeline "
                          f"{e['pipeline']} · {e['source']}" + (f" · judge {judge}" if judge else "")))
    if e.get("error"):
        st.error(md_escape(e["error"]))
    if e["status"] == "interrupted":
        st.info(f"Interrupted: `chorus eval resume {report.id}` continues it.")
    st.dataframe([{
        "system": s.system, "kind": s.kind, "answers": s.answered, "failed": s.failed,
        "accuracy": None if s.accuracy is None else round(s.accuracy.mean, 3),
        "accuracy 95% CI": None if s.accuracy is None else f"{s.accuracy.low:.0%} – {s.accuracy.high:.0%}",
        "judge (0-10)": None if s.judge_score is None else round(s.judge_score.mean, 2),
        "judge 95% CI": None if s.judge_score is None else f"{s.judge_score.low:.2f} – {s.judge_score.high:.2f}",
        "tokens / answer": None if s.completion_tokens is None else round(s.completion_tokens),
        "seconds / answer": None if s.seconds is None else round(s.seconds, 2)} for s in report.systems],
        hide_index=True, width="stretch", key="eval-summary")
    rows = interval_rows(report)
    if rows:
        st.markdown("**Score per system** (95% bootstrap interval)")
        st.vega_lite_chart(score_chart(rows), key="eval-score-chart")
    wins = wtl_rows(report)
    if wins:
        st.markdown("**Pipeline vs each baseline: win / tie / loss**")
        st.vega_lite_chart(wtl_chart(wins), width="stretch", key="eval-wtl-chart")
    st.markdown("**Items**")
    names = [s.system for s in report.systems]
    st.dataframe([{"item": it["id"], "question": it["question"], "reference": it["reference"],
                   **{f"{n} correct": it["systems"][n]["correct"] for n in names},
                   **{f"{n} judge": it["systems"][n]["judge_score"] for n in names},
                   **{f"{n} session": it["systems"][n]["session_id"] for n in names}} for it in report.items],
                 hide_index=True, width="stretch", key="eval-items")
    if not report.items:
        return
    chosen = st.selectbox("Open an item", [it["id"] for it in report.items], key="eval-item")
    item = next(it for it in report.items if it["id"] == chosen)
    st.text(item["question"])
    for name, s in item["systems"].items():
        with st.container(border=True):
            st.caption(md_escape(f"{name} — run {s['status'] or 'not yet'}"
                                 + ("" if s["correct"] is None else f" · {'correct' if s['correct'] else 'wrong'}")
                                 + ("" if s["judge_score"] is None else f" · judge {s['judge_score']:.1f}")))
            st.text(s["answer"] or "")
            if s["judge_reason"]:
                st.caption(md_escape(f"Judge: {s['judge_reason']}"))
            if s["session_id"] and st.button(f"Open {s['session_id']}", key=f"eval-open-{chosen}-{name}"):
                st.session_state["last_session_id"] = s["session_id"]
                st.switch_page(page_path("results"))


st.divider()
try:
    evals = store.list()
except ChorusError as exc:
    st.error(md_escape(exc))
    st.stop()
if not evals:
    st.info("No eval yet. Start one above, or run `chorus eval` in a terminal.")
    st.stop()
ids = [e["id"] for e in evals]
if st.session_state.get("eval-open") not in ids:
    st.session_state["eval-open"] = ids[0]
chosen_eval = st.selectbox("Eval", ids, key="eval-open",
                           format_func=lambda i: next(f"{e['id']} · {e['status']} · {fmt_time(e['created_at'])} · "
                                                      f"{e['n_items']} items" for e in evals if e["id"] == i))
try:
    render_report(build_report(store, chosen_eval))
except ChorusError as exc:
    st.error(md_escape(exc))
