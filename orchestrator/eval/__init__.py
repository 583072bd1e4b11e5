"""Judging and automatic evaluation: does a pipeline beat its own members on the user's questions?

items.py      question sets (JSONL) with file:line errors; the bundled basic set
scoring.py    reference scoring (normalised match, number, regex), bootstrap CIs, win/tie/loss
store.py      eval runs, items, answers and scores in SQLite beside the history (eval.db)
run.py        an eval: the pipeline and each member run as normal (recorded) runs, then scored
report.py     per-system summaries from the store

The judge's building block (a rubric score, a pairwise verdict in both orders, parsed robustly) is
orchestrator/engine/judge.py: the engine's judge aggregation uses it and nothing below eval imports eval.
"""
