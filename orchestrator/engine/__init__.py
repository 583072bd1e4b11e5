"""Execution: the run loop, typed events, the backend seam, aggregation and the template sandbox."""
