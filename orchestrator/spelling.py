"""'Did you mean ...?' for a mistyped name: a user who typed `reveiw` or `--maunal` is told the name they
meant, not only that theirs is unknown."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most like `word` (difflib's ratio of at least 0.6), or None when none is close."""
    matches = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"Did you mean 'x'? " for the closest choice, else "" (to put in front of a hint)."""
    match = closest(word, choices)
    return f"Did you mean '{match}'? " if match is not None else ""


__all__ = ["closest", "did_you_mean"]
