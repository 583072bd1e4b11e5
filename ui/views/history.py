"""History page: list and search saved sessions, open one, rerun from a stage."""

from __future__ import annotations

import streamlit as st

from orchestrator.errors import ChorusError
from ui.common import chorus, fmt_time, md_escape, render_session

st.title("History")
rt = chorus()
if rt is None:
    st.stop()
store = rt.store

query = st.text_input("Search questions, answers and steps", key="history-search")
try:
    if query.strip():
        rows = [{"id": h["id"], "status": h["status"], "question": h["question"], "match": h["snippet"],
                 "damaged": "; ".join(h["problems"])} for h in store.search(query)]
    else:
        rows = [{"id": r["id"], "created": fmt_time(r["created_at"]), "mode": r["mode"], "status": r["status"],
                 "question": r["question"], "parent": r["parent_session"] or "", "damaged": "; ".join(r["problems"])}
                for r in store.list()]
except ChorusError as exc:
    st.error(md_escape(exc))
    rows = []

if not rows:
    st.info("No matching session." if query.strip() else "No session saved yet.")
    st.stop()
st.dataframe(rows, hide_index=True, width="stretch")
chosen = st.selectbox("Open session", [r["id"] for r in rows], key="history-open")
if chosen:
    try:
        render_session(store.load(chosen), key="history")
    except ChorusError as exc:
        st.error(md_escape(exc))
