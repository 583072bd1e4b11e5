"""Results page: every step and answer of the latest run, its aggregation, timings, and rerun."""

from __future__ import annotations

import streamlit as st

from orchestrator.errors import ChorusError
from ui.common import chorus, md_escape, render_runs_elsewhere, render_session, running_here

st.title("Results")
rt = chorus()
if rt is None:
    st.stop()

if running_here():
    st.info("A run is in progress: see the Run page.")
render_runs_elsewhere(key="results")

store = rt.store
session_id = st.session_state.get("last_session_id")
if session_id is None:
    ids = store.ids()
    session_id = ids[-1] if ids else None
if session_id is None:
    st.info("No run yet. Start one on the Run page.")
    st.stop()
try:
    render_session(store.load(session_id), key="results")
except ChorusError as exc:
    st.error(md_escape(exc))
