"""A judge model's verdicts: a rubric score for one answer, or a preference between two.

Shared by the `judge` aggregation (aggregation.py) and `chorus eval` (eval/run.py), so it lives in the
engine, below eval. The judge is reached through an `Ask` function `(model, prompt) -> reply` that the
caller supplies (the engine's planned aggregation call, or the eval's judge plan), so every judge call is
a normal, recorded model call.

Replies are read robustly ("Score: 8/10", "8", "**8**", "7 out of 10", JSON {"score": 8}; "Winner: A",
"[[B]]", "Answer A is better", {"winner": "tie"}); an unreadable reply is asked once more with a stricter
prompt, then it is a `JudgeUnparseable` error carrying both replies. Pairwise verdicts are always asked
in both orders (A/B, then B/A) so a judge that prefers a position cancels itself out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from launcher.errors import ChorusError
from orchestrator.engine.templates import render_async

Ask = Callable[[str, str], Awaitable[str]]
"""(model, prompt) -> the judge's reply; may raise ChorusError."""

Preference = Literal["A", "B", "tie"]
SCALE = 10.0  # scores are on 0..10 (rubric asks for 1..10; "x/5" and "x out of 100" are rescaled)
MAX_REASON_CHARS = 2000

DEFAULT_SCORE_PROMPT = """\
You are a strict judge. Rate how well the answer below answers the question: correctness first, then \
completeness and clarity.
{% if reference %}A reference answer is given; an answer that contradicts it is wrong.
Reference answer: {{ reference }}
{% endif %}
Question:
{{ question }}

Answer:
{{ answer }}

Give one sentence of reasoning, then the score on the last line as "Score: N/10" (N a whole number from 1 to 10).
"""

DEFAULT_PAIRWISE_PROMPT = """\
You are a strict judge. Compare two answers to the question below and decide which one is more correct, \
complete and clear. Ignore which one comes first and how long they are.
{% if reference %}Reference answer: {{ reference }}
{% endif %}
Question:
{{ question }}

Answer A:
{{ answer_a }}

Answer B:
{{ answer_b }}

Give one sentence of reasoning, then the verdict on the last line as "Winner: A", "Winner: B" or "Winner: tie".
"""

STRICT_SCORE_SUFFIX = "\n\nYour reply must be the score only: one whole number from 1 to 10.\nScore:"
STRICT_PAIRWISE_SUFFIX = "\n\nYour reply must be one word only: A, B or tie.\nWinner:"


class JudgeUnparseable(ChorusError):
    """The judge's reply held no score (or no verdict), even when asked again with a stricter prompt."""

    def __init__(self, model: str, what: str, replies: list[str]) -> None:
        shown = " / ".join(repr(_clip(r, 80)) for r in replies)
        super().__init__(f"judge '{model}' gave no readable {what} after a stricter retry (replies: {shown})",
                         hint="Edit judge_prompt so the judge ends with 'Score: N/10' (or 'Winner: A|B|tie'), "
                              "raise its max_tokens, or use a stronger judge model.")
        self.model = model
        self.what = what
        self.replies = list(replies)


# ---------------------------------------------------------------- reading replies

_NUM = r"(-?\d+(?:\.\d+)?)"
_OUT_OF = r"\s*(?:/|out\s+of)\s*"
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_LABELLED = re.compile(rf"(?i)\b(?:score|rating|grade|mark)s?\b[^\d\n]{{0,12}}?{_NUM}(?:{_OUT_OF}{_NUM})?")
_BOLD = re.compile(rf"\*\*\s*{_NUM}(?:{_OUT_OF}{_NUM})?\s*\*\*")
_FRACTION = re.compile(rf"(?<![\d.]){_NUM}{_OUT_OF}(10|5|100)(?![\d.])")
_BARE = re.compile(rf"^[\s*_`'\"(\[]*{_NUM}[\s*_`'\".)\]]*$")
_REASON_KEYS = ("reason", "reasoning", "explanation", "justification", "rationale")


def _scaled(value: str | float, denominator: str | float | None) -> float | None:
    try:
        number = float(value)
        if denominator is not None:
            den = float(denominator)
            if den <= 0:
                return None
            number = number / den * SCALE
    except (TypeError, ValueError):
        return None
    return number if 0 <= number <= SCALE else None


def _json_objects(text: str) -> list[dict[str, Any]]:
    out = []
    for match in _JSON_OBJECT.finditer(text):
        try:
            data = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append({str(k).lower(): v for k, v in data.items()})
    return out


def parse_score(text: str) -> float | None:
    """The score in a judge's reply on 0..10, or None. Tried in order: a JSON object's "score"/"rating";
    the last labelled score ("Score: 8/10", "**Rating:** 7"); the last bold number; the last "N/10"
    (or /5, /100, "out of"); the whole reply, its first line (a completion model asked to end with "Score:"
    writes the number, then goes on) or its last line as a bare number."""
    for data in reversed(_json_objects(text)):
        for key in ("score", "rating", "grade"):
            if key in data and not isinstance(data[key], bool):
                value = data[key]
                if isinstance(value, str):
                    return parse_score(value)
                return _scaled(value, None)
    for pattern in (_LABELLED, _BOLD, _FRACTION):
        matches = list(pattern.finditer(text))
        if matches:
            return _scaled(matches[-1].group(1), matches[-1].group(2))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for candidate in ([text.strip(), lines[0], lines[-1]] if lines else []):
        bare = _BARE.match(candidate)
        if bare:
            return _scaled(bare.group(1), None)
    return None


_CHOICE = r"(A|B|(?i:tie|neither|both|equal|same))"
_VERDICT = re.compile(r"(?i:\b(?:winner|verdict|better(?:\s+answer)?|choice|preferred|prefer|pick)\b)"
                      rf"[^\w\n]{{0,6}}(?i:is\s+)?(?i:(?:answer|response|assistant)\s+)?\[{{0,2}}{_CHOICE}\b")
_BRACKETS = re.compile(r"\[\[\s*(A|B|(?i:tie|C))\s*\]\]")
_SENTENCE = re.compile(r"(?i:\b(?:answer|response|assistant)\s+)(A|B)(?i:\s+is\s+(?:the\s+)?"
                       r"(?:better|more\s+\w+|preferred|correct|best|stronger))")
_BARE_CHOICE = re.compile(r"^[\s*_`'\"(\[]*(?:(?i:answer|response)\s+)?(A|B|(?i:tie))[\s*_`'\".)\]]*$")


def _choice(word: str) -> Preference:
    return "A" if word == "A" else "B" if word == "B" else "tie"


def parse_preference(text: str) -> Preference | None:
    """Which answer a pairwise reply prefers: "A", "B" or "tie", or None. Tried in order: a JSON object's
    "winner"/"verdict"/"better"; the last "Winner: A"-style line; "[[A]]"; "Answer B is better"; the whole
    reply, its first or its last line as a bare A, B or tie. A and B must be capitals (a lone "a" is an article)."""
    for data in reversed(_json_objects(text)):
        for key in ("winner", "verdict", "better", "choice", "preferred"):
            value = data.get(key)
            if isinstance(value, str):
                found = parse_preference(value)
                if found is not None:
                    return found
    for pattern in (_VERDICT, _BRACKETS, _SENTENCE):
        matches = list(pattern.finditer(text))
        if matches:
            return _choice(matches[-1].group(1))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for candidate in ([text.strip(), lines[0], lines[-1]] if lines else []):
        bare = _BARE_CHOICE.match(candidate)
        if bare:
            return _choice(bare.group(1))
    return None


def parse_reason(text: str) -> str:
    """The judge's reasoning: a JSON "reason" when there is one, else the reply without its verdict line."""
    for data in reversed(_json_objects(text)):
        for key in _REASON_KEYS:
            if isinstance(data.get(key), str):
                return _clip(data[key].strip(), MAX_REASON_CHARS)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and (parse_score(lines[-1]) is not None or parse_preference(lines[-1]) is not None):
        lines = lines[:-1]
    return _clip("\n".join(lines).strip(), MAX_REASON_CHARS)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------- verdicts


@dataclass
class ScoreVerdict:
    """A rubric score on 0..10 with the judge's reason, the exact prompt and every reply."""

    score: float
    reason: str
    prompt: str
    replies: list[str]

    @property
    def retried(self) -> bool:
        return len(self.replies) > 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "retried": self.retried}


@dataclass
class OrderVerdict:
    """One order of a pairwise comparison: `first` was shown as Answer A, `second` as Answer B."""

    first: str
    second: str
    verdict: Preference
    reason: str
    prompt: str
    replies: list[str]

    @property
    def winner(self) -> str | None:
        return {"A": self.first, "B": self.second}.get(self.verdict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "winner": self.winner, "retried": len(self.replies) > 1}


@dataclass
class PairVerdict:
    """Both orders of `a` vs `b`. `points_a` is a's share over the two orders (1 win, 0.5 tie, 0 loss),
    so a judge that always picks the first position gives 0.5: a tie, not a win."""

    a: str
    b: str
    orders: list[OrderVerdict] = field(default_factory=list)

    @property
    def points_a(self) -> float:
        points = [1.0 if o.winner == self.a else 0.0 if o.winner == self.b else 0.5 for o in self.orders]
        return sum(points) / len(points) if points else 0.5

    @property
    def outcome(self) -> Literal["win", "tie", "loss"]:
        """a's result: win, tie or loss."""
        p = self.points_a
        return "win" if p > 0.5 else "loss" if p < 0.5 else "tie"

    @property
    def consistent(self) -> bool:
        """Both orders named the same answer (or both said tie): the verdict does not depend on position."""
        return len({o.winner for o in self.orders}) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "orders": [o.to_dict() for o in self.orders], "points_a": self.points_a,
                "outcome": self.outcome, "consistent": self.consistent}


async def _ask_parsed(ask: Ask, model: str, prompt: str, parse: Callable[[str], Any], strict_suffix: str,
                      what: str) -> tuple[Any, list[str]]:
    """Ask; when the reply cannot be read, ask once more with a stricter prompt; then give up loudly."""
    replies = [await ask(model, prompt)]
    value = parse(replies[0])
    if value is None:
        replies.append(await ask(model, prompt.rstrip() + strict_suffix))
        value = parse(replies[1])
    if value is None:
        raise JudgeUnparseable(model, what, replies)
    return value, replies


async def judge_score(ask: Ask, model: str, question: str, answer: str, *, template: str | None = None,
                      reference: str | None = None, context: Mapping[str, Any] | None = None) -> ScoreVerdict:
    """The judge's rubric score of one answer. The template sees question, answer, reference and `context`."""
    prompt = await render_async(template or DEFAULT_SCORE_PROMPT,
                                {**(context or {}), "question": question, "answer": answer,
                                 "reference": reference or ""}, where="judge prompt")
    score, replies = await _ask_parsed(ask, model, prompt, parse_score, STRICT_SCORE_SUFFIX, "score")
    return ScoreVerdict(float(score), parse_reason(replies[-1]), prompt, replies)


async def judge_order(ask: Ask, model: str, question: str, first: tuple[str, str], second: tuple[str, str], *,
                      template: str | None = None, reference: str | None = None,
                      context: Mapping[str, Any] | None = None) -> OrderVerdict:
    """One comparison: `first` (label, text) shown as Answer A, `second` as Answer B."""
    prompt = await render_async(template or DEFAULT_PAIRWISE_PROMPT,
                                {**(context or {}), "question": question, "answer_a": first[1],
                                 "answer_b": second[1], "reference": reference or ""}, where="judge prompt")
    verdict, replies = await _ask_parsed(ask, model, prompt, parse_preference, STRICT_PAIRWISE_SUFFIX, "verdict")
    return OrderVerdict(first[0], second[0], verdict, parse_reason(replies[-1]), prompt, replies)


async def judge_pair(ask: Ask, model: str, question: str, a: tuple[str, str], b: tuple[str, str], *,
                     template: str | None = None, reference: str | None = None,
                     context: Mapping[str, Any] | None = None) -> PairVerdict:
    """`a` vs `b` (each (label, text)), asked in both orders: a as Answer A, then b as Answer A."""
    verdict = PairVerdict(a[0], b[0])
    for first, second in ((a, b), (b, a)):
        verdict.orders.append(await judge_order(ask, model, question, first, second, template=template,
                                                reference=reference, context=context))
    return verdict


__all__ = ["DEFAULT_PAIRWISE_PROMPT", "DEFAULT_SCORE_PROMPT", "Ask", "JudgeUnparseable", "OrderVerdict",
           "PairVerdict", "ScoreVerdict", "judge_order", "judge_pair", "judge_score", "parse_preference",
           "parse_reason", "parse_score"]
