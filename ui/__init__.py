"""Streamlit UI: pages only render; logic lives in orchestrator and launcher."""
