"""Resolution of a pipeline into one run plan (every parameter decided once) and its memory plan."""
