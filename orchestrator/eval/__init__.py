"""Judging and automatic evaluation: does a pipeline beat its own members on the user's questions?

judge.py      a judge model's rubric score and pairwise verdicts (both orders), parsed robustly
items.py      question sets (JSONL) with file:line errors; the bundled basic set
scoring.py    reference scoring (normalised match, number, regex), bootstrap CIs, win/tie/loss
store.py      eval runs, items, answers and scores in SQLite beside the history (eval.db)
run.py        an eval: the pipeline and each member run as normal (recorded) runs, then scored
report.py     per-system summaries from the store
live.py       an eval in a background thread (the UI polls it)

Kept import-light: the engine's judge aggregation imports judge.py, so this package imports nothing here.
"""
