"""For a front end that only supervises a child process (`chorus ui`'s Streamlit, `chorus api`'s uvicorn): the
preexec_fn that gives the child its own process group and ties its life to ours. Re-exported from launcher
here so that such a supervisor does not import orchestrator.app (the whole engine), which the child imports
itself."""

from launcher.process.server import own_group_dying_with_parent

__all__ = ["own_group_dying_with_parent"]
