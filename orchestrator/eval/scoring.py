"""Scoring answers against a reference, and the statistics of an eval (bootstrap CI, win/tie/loss).

Reference scoring is deliberately simple and documented, so a user can predict it:
- `answer`: the normalised answer (casefolded, punctuation and extra spaces dropped, as majority_vote
  compares) equals a normalised reference, or contains it as whole words;
- `number`: the last number of the answer that does not appear in the question (else the last number:
  `144 / 12 = 12` restates the operands and ends with the result; "1,000" and "-2.5" read as numbers) is
  within `tolerance` of the reference. Citation markers (`[1]`, `[2, 3]`) are not numbers of the answer,
  and neither is what follows a line that starts a new `Question:` or `Q:` (a base model going on to
  the next exercise of its prompt);
- `regex`: the pattern is found in the answer (case-insensitive, with a time limit).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import regex

from orchestrator.engine.aggregation import normalise
from orchestrator.eval.items import EvalItem

REGEX_TIMEOUT_S = 1.0
BOOTSTRAP_SEED = 20240917
BOOTSTRAP_RESAMPLES = 2000
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_CITATION = re.compile(r"\[\s*\d+(?:\s*[,;\u2013-]\s*\d+)*\s*\]")  # [1], [2, 3], [1-3]: a source, not a value
_NEXT_QUESTION = re.compile(r"\n\s*(?:Question|Q)\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class ReferenceScore:
    """Whether an answer matches its item's reference, how that was decided, and what was found."""

    correct: bool
    method: str          # exact | contains | number | regex | no answer
    expected: str
    found: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def numbers_in(text: str) -> list[float]:
    return [float(m.group(0).replace(",", "")) for m in _NUMBER.finditer(text)]


def score_reference(item: EvalItem, answer: str) -> ReferenceScore | None:
    """The answer against the item's reference; None when the item has none (it can only be judged)."""
    kind = item.reference_kind
    if kind is None:
        return None
    expected = (item.regex if kind == "regex" else item.reference_text) or ""  # kind "regex": regex is set
    if not answer.strip():
        return ReferenceScore(False, "no answer", expected)
    if kind == "answer":
        return _match_text(item.answer or (), answer)
    if kind == "number":
        found = _pick_number(answer, item.question)
        ok = found is not None and abs(found - (item.number or 0.0)) <= max(item.tolerance,
                                                                             1e-9 * max(1.0, abs(item.number or 0.0)))
        return ReferenceScore(ok, "number", expected, None if found is None else f"{found:g}")
    try:
        match = regex.search(item.regex or "", answer, flags=regex.IGNORECASE, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        return ReferenceScore(False, "regex", expected, "(the pattern timed out)")
    return ReferenceScore(match is not None, "regex", expected, match.group(0) if match else None)


def _match_text(references: Iterable[str], answer: str) -> ReferenceScore:
    norm = normalise(answer)
    refs = [(r, normalise(r)) for r in references]
    for ref, nref in refs:
        if nref and norm == nref:
            return ReferenceScore(True, "exact", ref, answer.strip())
    for ref, nref in refs:
        if nref and re.search(rf"(?<!\w){re.escape(nref)}(?!\w)", norm):
            return ReferenceScore(True, "contains", ref, nref)
    return ReferenceScore(False, "contains", refs[0][0] if refs else "", None)


def _pick_number(answer: str, question: str) -> float | None:
    """The number an answer gives (see the module's doc): the last one not in the question, else the last."""
    answer = _NEXT_QUESTION.split(answer, maxsplit=1)[0]
    found = numbers_in(_CITATION.sub(" ", answer)) or numbers_in(answer)  # only "[42]": it is the answer
    if not found:
        return None
    given = set(numbers_in(question))
    fresh = [n for n in found if n not in given]
    return (fresh or found)[-1]


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval over `n` values."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Interval | None:
    """Percentile bootstrap of the mean: the same values always give the same interval (fixed seed)."""
    data = [float(v) for v in values]
    if not data:
        return None
    n = len(data)
    mean = sum(data) / n
    if n == 1 or min(data) == max(data):
        return Interval(mean, mean, mean, n)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(data, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[max(0, int(tail * resamples))]
    high = means[min(resamples - 1, int((1 - tail) * resamples) - 1)]
    return Interval(mean, low, high, n)


Outcome = str  # win | tie | loss (of the pipeline against a baseline)


def outcome_by_reference(pipeline_correct: bool, baseline_correct: bool) -> Outcome:
    return "tie" if pipeline_correct == baseline_correct else "win" if pipeline_correct else "loss"


def tally(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "loss": 0}
    for outcome in outcomes:
        counts[outcome] += 1
    return counts
