"""The merge step of a stage: turn the answers of a stage's models into one output.

Kinds: concat, majority_vote, synthesis, custom_template, custom, and judge (a judge model scores the
answers, or compares them in pairs with positions swapped, and the best one wins; judge.py reads the replies).

`aggregate` is the single entry point. It always returns a complete AggregationRecord or raises
AggregationError; whatever users supply (templates, regex, custom functions) fails as a ChorusError.
Templates render off the event loop with a time limit (`render_async`), vote patterns run in the `regex`
engine with a timeout, and custom functions come only from the allowed places (`config/aggregators.py`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from launcher.errors import ChorusError
from orchestrator.config import aggregators
from orchestrator.config.schema import AggregationSpec, VoteOptions, label_format_pieces
from orchestrator.engine.judge import JudgeUnparseable, PairVerdict, ScoreVerdict, judge_pair, judge_score
from orchestrator.engine.templates import TemplateError, render_async
from orchestrator.records import AggregationRecord, ErrorInfo


@dataclass(frozen=True)
class Candidate:
    """One model's successful answer, as the merge step sees it."""

    label: str
    model: str
    text: str


SynthesizeFn = Callable[[str, str], Awaitable[str]]
"""(model_name, prompt) -> generated text; supplied by the engine, may raise ChorusError."""


class AggregationError(ChorusError):
    """A stage's answers could not be merged; `kind` is the aggregation type, `reason` says why."""

    def __init__(self, kind: str, reason: str, *, hint: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(f"aggregation '{kind}' failed: {reason}", hint=hint)
        self.kind = kind
        self.reason = reason
        self.details = dict(details or {})


DEFAULT_SYNTHESIS_PROMPT = """\
You are given a question and several answers to it from different assistants.
Write one answer that combines them: keep what they agree on, settle disagreements in favour of the \
most accurate and best-supported information, and drop mistakes and repetition.
Reply with the final answer only.

Question:
{{ question }}

{% for r in responses %}Answer {{ loop.index }} ({{ r.label }}):
{{ r.text }}

{% endfor %}Final answer:
"""

TIE_BREAK_PROMPT = """\
Several answers to the question below received the same number of votes.
Pick the one that is most likely correct. Reply with that answer exactly as written and nothing else.

Question:
{{ question }}

Tied answers:
{% for answer in answers %}- {{ answer }}
{% endfor %}"""


async def aggregate(spec: AggregationSpec, question: str, candidates: list[Candidate], *,
                    synthesize: SynthesizeFn | None = None,
                    config_dir: Path | None = None,
                    context: dict[str, Any] | None = None) -> AggregationRecord:
    """Merge a stage's answers as `spec` says; raises AggregationError rather than returning a half record."""
    kind = spec.type
    inputs = [{"label": c.label, "model": c.model, "text": c.text} for c in candidates]
    if not candidates:
        raise AggregationError(kind, "no model answered",
                               hint="Every model of the stage failed; see the stage's responses for why.")
    details: dict[str, Any]
    if kind == "concat":
        output, details = _concat(spec, candidates), {}
    elif kind == "majority_vote":
        output, details = await _majority_vote(spec, question, candidates, synthesize)
    elif kind == "synthesis":
        output, details = await _synthesis(spec, question, inputs, synthesize, context)
    elif kind == "custom_template":
        output, details = await _custom_template(spec, question, inputs, context)
    elif kind == "custom":
        output, details = await _custom(spec, question, inputs, config_dir)
    elif kind == "judge":
        output, details = await _judge(spec, question, candidates, synthesize, context)
    else:
        raise AggregationError(kind, f"unknown aggregation type {kind!r}")
    return AggregationRecord(kind=kind, inputs=inputs, output=output, details=details)


# ---------------------------------------------------------------- concat

def _concat(spec: AggregationSpec, candidates: Sequence[Candidate]) -> str:
    """Labelled blocks joined by the separator; a single answer is passed through unlabelled."""
    if len(candidates) == 1:
        return candidates[0].text
    pieces = _parse_label_format(spec.label_format)
    blocks = []
    for c in candidates:
        heading = "".join(text if name is None else getattr(c, name) for text, name in pieces)
        blocks.append(f"{heading}\n{c.text}" if heading else c.text)
    return spec.separator.join(blocks)


def _parse_label_format(fmt: str) -> list[tuple[str, str | None]]:
    """`label_format_pieces` (the schema refuses a bad one when the pipeline is loaded); a spec built without
    validation still fails here as an AggregationError."""
    try:
        return label_format_pieces(fmt)
    except ValueError as exc:
        raise AggregationError("concat", str(exc),
                               hint="Use {label} and {model}; write {{ and }} for literal braces.") from None


# ---------------------------------------------------------------- majority vote

_NUMBER_JOINERS = ".,"  # kept between digits: 3.14, 1,000


def normalise(answer: str) -> str:
    """Comparable form of an answer: casefolded, punctuation dropped, whitespace collapsed.

    Apostrophes vanish (don't -> dont), other punctuation becomes a space, except '.'/',' between
    digits and a '-' sign before a number. Symbols such as '$' or '+' are kept.
    """
    text = unicodedata.normalize("NFKC", answer).casefold()
    out: list[str] = []
    for i, ch in enumerate(text):
        if not unicodedata.category(ch).startswith("P"):
            out.append(ch)
        elif ch in "'’":
            continue
        elif _kept_in_number(text, i):
            out.append(ch)
        else:
            out.append(" ")
    return " ".join("".join(out).split())


def _kept_in_number(text: str, i: int) -> bool:
    """'.' or ',' between digits (3.14, 1,000), or a minus sign starting a number (-5)."""
    ch, before, after = text[i], text[i - 1] if i else " ", text[i + 1] if i + 1 < len(text) else " "
    if ch in _NUMBER_JOINERS:
        return before.isdigit() and after.isdigit()
    return ch == "-" and after.isdigit() and before.isspace()


def similarity(a: str, b: str) -> float:
    """Character-level similarity of two normalised answers: difflib's ratio, 1.0 only when equal.

    Character level suits short extracted answers (numbers, names, one-liners), where one typo or a
    plural should still count as the same answer. The cheap upper bounds are tried first.
    """
    if a == b:
        return 1.0
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    if matcher.real_quick_ratio() == 0 or matcher.quick_ratio() == 0:
        return 0.0
    return matcher.ratio()


def extract_answer(text: str, vote: VoteOptions) -> tuple[str | None, str | None]:
    """The part of a reply that votes, and why it abstains when there is none: (answer, abstain_reason).

    `regex` uses the *last* match, since models tend to state their final answer last, and its first
    capture group that took part in the match (the whole match when the pattern has no groups).
    """
    if vote.extract == "whole":
        answer = text.strip()
    elif vote.extract == "last_line":
        answer = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    else:
        answer_or_none = _regex_answer(text, vote.pattern or "")
        if answer_or_none is None:
            return None, "the pattern did not match"
        answer = answer_or_none.strip()
    if not normalise(answer):
        return None, "empty answer"
    return answer, None


VOTE_REGEX_TIMEOUT_S = 1.0
"""How long vote.pattern may search one answer: `(a|aa)+$` over 'aaa…b' would backtrack for hours."""


def _regex_answer(text: str, pattern: str) -> str | None:
    """Search with the `regex` engine: it gives up after a timeout, and releases the GIL while it works.
    Imported here: it costs ~80 ms at start-up, and only a vote with a pattern needs it."""
    import regex

    try:
        matches = list(regex.finditer(pattern, text, timeout=VOTE_REGEX_TIMEOUT_S, concurrent=True))
    except TimeoutError:
        raise AggregationError("majority_vote", f"vote pattern {pattern!r} took longer than "
                                                f"{VOTE_REGEX_TIMEOUT_S:g} s on a {len(text):,}-character answer "
                                                "and was stopped",
                               hint="Simplify vote.pattern: nested repeats such as (a+)+ or (a|aa)+ can backtrack "
                                    "without end.", details={"pattern": pattern}) from None
    except (regex.error, re.error, RecursionError, OverflowError, ValueError) as exc:
        raise AggregationError("majority_vote", f"vote pattern {pattern!r} failed: {exc}",
                               hint="Fix vote.pattern in the stage's aggregation.") from None
    if not matches:
        return None
    last = matches[-1]
    groups = [g for g in last.groups() if g is not None]
    if last.re.groups:
        return groups[0] if groups else None
    return last.group(0)


@dataclass
class _Group:
    """Answers counted as one: founded by the earliest voter, compared by its normalised answer."""

    normalised: str
    members: list[int] = field(default_factory=list)  # candidate indices, ascending

    @property
    def first(self) -> int:
        return self.members[0]


def group_answers(normalised: Sequence[str | None], threshold: float) -> list[_Group]:
    """Group votes: exact normalised matches first, then near-equal groups merged into larger ones.

    Deterministic: exact groups are visited largest first (earliest member breaks ties); each joins
    the first already-kept group whose founding answer has similarity >= threshold, else is kept.
    Comparing with founding answers only stops chains of small edits from drifting. The result is
    ordered by earliest member.
    """
    exact: dict[str, _Group] = {}
    for index, norm in enumerate(normalised):
        if norm is not None:
            exact.setdefault(norm, _Group(norm)).members.append(index)
    kept: list[_Group] = []
    for group in sorted(exact.values(), key=lambda g: (-len(g.members), g.first)):
        target = next((k for k in kept if similarity(k.normalised, group.normalised) >= threshold), None)
        if target is None:
            kept.append(group)
        else:
            target.members = sorted(target.members + group.members)
    return sorted(kept, key=lambda g: g.first)


async def _majority_vote(spec: AggregationSpec, question: str, candidates: Sequence[Candidate],
                         synthesize: SynthesizeFn | None) -> tuple[str, dict[str, Any]]:
    vote = spec.vote
    # off the event loop: a slow pattern must not freeze other stages, Ctrl-C or the UI's Stop button
    extracted = await asyncio.to_thread(lambda: [extract_answer(c.text, vote) for c in candidates])
    norms = [normalise(answer) if answer is not None else None for answer, _ in extracted]
    groups = group_answers(norms, vote.similarity)
    group_of = {i: gid for gid, g in enumerate(groups, 1) for i in g.members}
    votes = [{"label": c.label, "model": c.model, "extracted": answer, "normalised": norms[i],
              "group": group_of.get(i), "abstained": reason}
             for i, (c, (answer, reason)) in enumerate(zip(candidates, extracted, strict=True))]
    details: dict[str, Any] = {
        "extract": vote.extract, "similarity": vote.similarity, "votes": votes,
        "groups": [{"id": gid, "answer": extracted[g.first][0], "normalised": g.normalised,
                    "members": [candidates[i].label for i in g.members], "size": len(g.members)}
                   for gid, g in enumerate(groups, 1)],
    }
    if not groups:
        raise AggregationError("majority_vote", "every model abstained: no answer could be extracted",
                               hint="Check vote.extract / vote.pattern against what the models write.",
                               details=details)
    top = max(len(g.members) for g in groups)
    tied = [g for g in groups if len(g.members) == top]
    winner = tied[0]
    details.update(tie=len(tied) > 1, tie_break=None)
    if len(tied) > 1:
        winner = await _break_tie(spec, question, tied, [a for a, _ in extracted], synthesize, details)
    voters = sum(1 for n in norms if n is not None)
    winner_id = next(gid for gid, g in enumerate(groups, 1) if g is winner)
    details.update(winner_group=winner_id, winner_answer=extracted[winner.first][0],
                   winner_label=candidates[winner.first].label, voters=voters,
                   abstained=len(candidates) - voters, agreement=len(winner.members) / voters)
    return candidates[winner.first].text, details


async def _break_tie(spec: AggregationSpec, question: str, tied: list[_Group], answers: Sequence[str | None],
                     synthesize: SynthesizeFn | None, details: dict[str, Any]) -> _Group:
    """`first`: the tied group with the earliest voter. `synthesis`: ask a model, falling back to first."""
    if spec.vote.tie_break == "first":
        details["tie_break"] = "first"
        return tied[0]
    if synthesize is None or not spec.synthesis_model:
        raise AggregationError("majority_vote", "tie_break 'synthesis' needs a synthesis model and a "
                                                "synthesize function", details=details)
    options = [answers[g.first] or "" for g in tied]
    prompt = await _render("majority_vote", TIE_BREAK_PROMPT, {"question": question, "answers": options},
                           "tie-break prompt")
    details.update(tie_break_model=spec.synthesis_model, tie_break_prompt=prompt)
    try:
        reply = await synthesize(spec.synthesis_model, prompt)
    except Exception as exc:
        details.update(tie_break="first", tie_break_fallback=f"the tie-break model failed: {exc}",
                       tie_break_error=ErrorInfo.of(exc).to_dict())
        return tied[0]
    details["tie_break_reply"] = reply
    chosen = match_reply(reply, [g.normalised for g in tied], spec.vote.similarity)
    if chosen is None:
        details.update(tie_break="first", tie_break_fallback="the tie-break reply matched none of the tied answers")
        return tied[0]
    details["tie_break"] = "synthesis"
    return tied[chosen]


def match_reply(reply: str, options: Sequence[str], threshold: float) -> int | None:
    """Which normalised option a model's free-text reply names, or None.

    Tried in order: an exact match of the reply or its last line; the best similarity >= threshold;
    exactly one option appearing as whole words inside the reply.
    """
    lines = [line for line in reply.splitlines() if line.strip()]
    tries = [normalise(reply)] + ([normalise(lines[-1])] if lines else [])
    for text in tries:
        if text in options:
            return options.index(text)
    best = max(((similarity(t, o), -i, i) for t in tries for i, o in enumerate(options)), default=None)
    if best is not None and best[0] >= threshold and best[0] > 0:
        return best[2]
    inside = [i for i, o in enumerate(options) if re.search(rf"(?<!\w){re.escape(o)}(?!\w)", tries[0])]
    return inside[0] if len(inside) == 1 else None


# ---------------------------------------------------------------- synthesis and templates

async def _render(kind: str, template: str, context: dict[str, Any], where: str) -> str:
    try:
        return await render_async(template, context, where=where)
    except TemplateError as exc:
        raise AggregationError(kind, str(exc), details={"template_error": exc.to_dict()}) from exc


def _template_context(question: str, inputs: list[dict[str, str]], context: dict[str, Any] | None) -> dict[str, Any]:
    return {**(context or {}), "question": question, "responses": inputs}


async def _synthesis(spec: AggregationSpec, question: str, inputs: list[dict[str, str]],
                     synthesize: SynthesizeFn | None, context: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Ask the synthesis model to write one answer from all of them."""
    model = spec.synthesis_model
    if synthesize is None or not model:
        raise AggregationError("synthesis", "needs a synthesis_model and a synthesize function")
    template = spec.synthesis_prompt or DEFAULT_SYNTHESIS_PROMPT
    prompt = await _render("synthesis", template, _template_context(question, inputs, context), "synthesis prompt")
    details: dict[str, Any] = {"synthesis_model": model, "synthesis_prompt": prompt}
    try:
        reply = await synthesize(model, prompt)
    except Exception as exc:
        raise AggregationError("synthesis", f"synthesis model '{model}' failed: {exc}",
                               details={**details, "synthesis_error": ErrorInfo.of(exc).to_dict()}) from exc
    details["synthesis_output"] = reply
    if not reply.strip():
        raise AggregationError("synthesis", f"synthesis model '{model}' returned an empty answer", details=details,
                               hint="Raise max_tokens or check the synthesis prompt.")
    return reply.strip(), details


async def _custom_template(spec: AggregationSpec, question: str, inputs: list[dict[str, str]],
                           context: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    template = spec.template or ""
    output = await _render("custom_template", template, _template_context(question, inputs, context),
                           "aggregation template")
    return output.strip(), {"template": template}


# ---------------------------------------------------------------- judge

async def _judge(spec: AggregationSpec, question: str, candidates: Sequence[Candidate],
                 synthesize: SynthesizeFn | None, context: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The judge model scores every answer (or compares them two at a time, both orders); the best one wins.

    Ties go to the earliest answer. Every verdict, with the judge's reason, prompt and replies, is kept.
    """
    model = spec.judge_model
    if synthesize is None or not model:
        raise AggregationError("judge", "needs a judge_model and a synthesize function")
    details: dict[str, Any] = {"judge_model": model, "judge_mode": spec.judge_mode,
                               "judge_prompt_template": spec.judge_prompt}
    labels = [c.label for c in candidates]
    try:
        if spec.judge_mode == "pairwise":
            points, pairs = await _judge_pairs(model, spec.judge_prompt, question, candidates, synthesize, context)
            details.update(pairs=[p.to_dict() for p in pairs], points=dict(zip(labels, points, strict=True)),
                           consistent_pairs=sum(p.consistent for p in pairs))
        else:
            scores: list[ScoreVerdict] = []
            for c in candidates:  # one at a time: the judge's server has one slot for the stage's merge
                scores.append(await judge_score(synthesize, model, question, c.text, template=spec.judge_prompt,
                                                context={**(context or {}), "label": c.label, "model": c.model}))
            points = [s.score for s in scores]
            details["scores"] = [{"label": c.label, "model": c.model, **s.to_dict()}
                                 for c, s in zip(candidates, scores, strict=True)]
    except JudgeUnparseable as exc:
        raise AggregationError("judge", exc.message, hint=exc.hint,
                               details={**details, "replies": exc.replies}) from exc
    except TemplateError as exc:
        raise AggregationError("judge", str(exc), details={**details, "template_error": exc.to_dict()}) from exc
    except ChorusError as exc:
        raise AggregationError("judge", f"judge model '{model}' failed: {exc}",
                               details={**details, "judge_error": ErrorInfo.of(exc).to_dict()}) from exc
    best = max(points)
    winner = points.index(best)
    details.update(winner_label=labels[winner], winner_score=best,
                   tie=[label for label, p in zip(labels, points, strict=True) if p == best] if points.count(best) > 1
                   else None)
    return candidates[winner].text, details


async def _judge_pairs(model: str, template: str | None, question: str, candidates: Sequence[Candidate],
                       synthesize: SynthesizeFn, context: dict[str, Any] | None,
                       ) -> tuple[list[float], list[PairVerdict]]:
    """Every pair in both orders; an answer's points are its wins (1) and ties (0.5) summed over its pairs."""
    points = [0.0] * len(candidates)
    pairs: list[PairVerdict] = []
    for i, a in enumerate(candidates):
        for j in range(i + 1, len(candidates)):
            b = candidates[j]
            pair = await judge_pair(synthesize, model, question, (a.label, a.text), (b.label, b.text),
                                    template=template, context=context)
            pairs.append(pair)
            points[i] += pair.points_a
            points[j] += 1 - pair.points_a
    return points, pairs


# ---------------------------------------------------------------- custom functions

async def _custom(spec: AggregationSpec, question: str, inputs: list[dict[str, str]],
                  config_dir: Path | None) -> tuple[str, dict[str, Any]]:
    """Call the user's `module:function` with question= and responses=; it may be sync or async."""
    name = spec.function or ""
    fn, source = _load_function(name, config_dir)
    try:
        if inspect.iscoroutinefunction(fn):
            result = await fn(question=question, responses=[dict(r) for r in inputs])
        else:
            result = await asyncio.to_thread(fn, question=question, responses=[dict(r) for r in inputs])
            if inspect.isawaitable(result):
                result = await result
    except (Exception, SystemExit) as exc:
        raise AggregationError("custom", f"function '{name}' raised {type(exc).__name__}: {exc}",
                               details={"function": name, "source": source}) from exc
    output, extra = _custom_result(name, result)
    details: dict[str, Any] = {"function": name, "source": source}
    if extra is not None:
        details["function_details"] = extra
    return output, details


def _custom_result(name: str, result: Any) -> tuple[str, dict[str, Any] | None]:
    """A str, or {"output": str, "details": dict}; details must be JSON-safe because sessions store them."""
    if isinstance(result, str):
        return result, None
    if isinstance(result, dict) and isinstance(result.get("output"), str):
        extra = result.get("details")
        if extra is not None and not isinstance(extra, dict):
            raise AggregationError("custom", f"function '{name}' returned details of type {type(extra).__name__}, "
                                             "not a dict")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise AggregationError("custom", f"function '{name}' returned details that are not JSON-safe: "
                                             f"{exc}") from None
        return result["output"], extra
    raise AggregationError("custom", f"function '{name}' returned {type(result).__name__}, not a str",
                           hint='Return the merged text, or {"output": text, "details": {...}}.')


def _load_function(name: str, config_dir: Path | None) -> tuple[Callable[..., Any], str]:
    """Find an allowed `module:function` (aggregators.py decides, before anything is imported) and load it."""
    try:
        allowed = aggregators.resolve(name, config_dir)
    except aggregators.AggregatorNotAllowed as exc:
        raise AggregationError("custom", exc.message, hint=exc.hint,
                               details={"function": name, "allowed": exc.allowed}) from None
    try:
        fn = aggregators.load(allowed)
    except (Exception, SystemExit) as exc:
        raise AggregationError("custom", f"could not load function '{name}': {type(exc).__name__}: {exc}",
                               hint=f"Check {allowed.source}.", details={"function": name}) from exc
    if not callable(fn):
        raise AggregationError("custom", f"'{name}' is a {type(fn).__name__}, not a function")
    return fn, allowed.source
