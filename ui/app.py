"""chorus UI entry point: `chorus ui` (or `streamlit run ui/app.py`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ui.auth import gate

PAGES = Path(__file__).parent / "views"  # not "pages/": Streamlit runs that folder as a v1 multipage app

st.set_page_config(page_title="chorus", page_icon=":material/queue_music:", layout="wide")
gate()  # a UI with a token (`chorus ui` off loopback) runs no page until this session has given it
page = st.navigation([
    st.Page(PAGES / "run.py", title="Run", icon=":material/play_arrow:", default=True),
    st.Page(PAGES / "results.py", title="Results", icon=":material/article:"),
    st.Page(PAGES / "history.py", title="History", icon=":material/history:"),
    st.Page(PAGES / "eval.py", title="Eval", icon=":material/leaderboard:"),
    st.Page(PAGES / "documents.py", title="Documents", icon=":material/description:"),
    st.Page(PAGES / "models.py", title="Models", icon=":material/memory:"),
])
page.run()
