"""An eval's results, read from the store: per system accuracy and judge score with 95% bootstrap intervals,
win/tie/loss of the pipeline against each baseline, tokens and wall time per answer, and every item."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.eval.scoring import Interval, bootstrap_ci, outcome_by_reference, tally
from orchestrator.eval.store import EvalStore


@dataclass
class SystemSummary:
    system: str
    kind: str
    answered: int = 0               # runs stored (completed, partial or failed)
    failed: int = 0
    accuracy: Interval | None = None    # over items with a reference
    judge_score: Interval | None = None  # 0..10, over judged answers
    judge_errors: int = 0
    prompt_tokens: float | None = None   # per answer
    completion_tokens: float | None = None
    seconds: float | None = None


@dataclass
class Versus:
    """The pipeline against one baseline: by reference (who was correct) and by the judge (both orders)."""

    baseline: str
    by_reference: dict[str, int] = field(default_factory=dict)
    by_judge: dict[str, int] = field(default_factory=dict)
    judge_consistent: int = 0
    judge_errors: int = 0


@dataclass
class JudgeHealth:
    """How the judge did: verdicts asked of it (rubric scores and pairs; not those decided without it, for a
    run that gave no answer), how many failed (an unreadable verdict, a judge that could not run), the first
    failure's message."""

    asked: int = 0
    failed: int = 0
    first_error: str | None = None


@dataclass
class EvalReport:
    eval: dict[str, Any]
    systems: list[SystemSummary]
    versus: list[Versus]
    items: list[dict[str, Any]]
    judge: JudgeHealth = field(default_factory=JudgeHealth)

    @property
    def id(self) -> str:
        return str(self.eval["id"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge_health(scores: dict[tuple[int, str, str], dict[str, Any]],
                 pairs: dict[tuple[int, str], dict[str, Any]]) -> JudgeHealth:
    """Every verdict the judge was asked for, in item order, and those that failed."""
    verdicts = [v for k, v in sorted(scores.items()) if k[2] == "judge"] + [v for _, v in sorted(pairs.items())]
    health = JudgeHealth()
    for verdict in verdicts:
        raw = verdict.get("detail")
        detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if detail.get("note") and "error" not in detail:
            continue  # decided without the judge
        health.asked += 1
        failed = "error" in detail or verdict.get("outcome") == "error" or (
            "method" in verdict and verdict.get("value") is None)
        if failed:
            health.failed += 1
            error = detail.get("error")
            if health.first_error is None:
                health.first_error = (str(error.get("message")) if isinstance(error, dict) and error.get("message")
                                      else "no readable verdict")
    return health


def _error_message(judge: dict[str, Any] | None) -> str | None:
    """Why the judge gave no score for one answer, or None when it gave one (or was not asked)."""
    if judge is None or judge.get("value") is not None:
        return None
    error = (judge.get("detail") or {}).get("error") if isinstance(judge.get("detail"), dict) else None
    return str(error.get("message")) if isinstance(error, dict) and error.get("message") else "no readable verdict"


def _found(reference: dict[str, Any] | None) -> str | None:
    """What reference scoring read in the answer (the number, the matched words or text), for the reader
    to see why an answer counts as right or wrong."""
    detail = reference.get("detail") if reference else None
    found = detail.get("found") if isinstance(detail, dict) else None
    return None if found is None else str(found)


def build_report(store: EvalStore, eval_id: str) -> EvalReport:
    row = store.get(eval_id)
    eval_id = row["id"]
    systems = row["spec"].get("systems", [])
    items = store.items(eval_id)
    answers, scores, pairs = store.answers(eval_id), store.scores(eval_id), store.pairs(eval_id)
    summaries = []
    for system in systems:
        name = system["name"]
        mine = [answers[(it.index, name)] for it in items if (it.index, name) in answers]
        reference = [scores[(it.index, name, "reference")]["value"] for it in items
                     if (it.index, name, "reference") in scores]
        judged = [scores[(it.index, name, "judge")] for it in items if (it.index, name, "judge") in scores]
        summaries.append(SystemSummary(
            name, system["kind"], answered=len(mine), failed=sum(a["status"] == "failed" for a in mine),
            accuracy=bootstrap_ci(reference), judge_score=bootstrap_ci([j["value"] for j in judged
                                                                        if j["value"] is not None]),
            judge_errors=sum(j["value"] is None for j in judged),
            prompt_tokens=_mean([a["prompt_tokens"] or 0 for a in mine]),
            completion_tokens=_mean([a["completion_tokens"] or 0 for a in mine]),
            seconds=_mean([a["wall_s"] or 0.0 for a in mine])))
    pipeline = next((s["name"] for s in systems if s["kind"] == "pipeline"), None)
    versus = []
    for system in systems:
        if system["kind"] != "baseline" or pipeline is None:
            continue
        name = system["name"]
        ref = [outcome_by_reference(bool(scores[(it.index, pipeline, "reference")]["value"]),
                                    bool(scores[(it.index, name, "reference")]["value"]))
               for it in items
               if (it.index, pipeline, "reference") in scores and (it.index, name, "reference") in scores]
        judged = [pairs[(it.index, name)] for it in items if (it.index, name) in pairs]
        versus.append(Versus(name, tally(ref), tally(p["outcome"] for p in judged if p["outcome"] != "error"),
                             judge_consistent=sum(bool(p["consistent"]) for p in judged),
                             judge_errors=sum(p["outcome"] == "error" for p in judged)))
    rows = []
    for it in items:
        per_system = {}
        for system in systems:
            name = system["name"]
            answer = answers.get((it.index, name))
            ref_score, judge = scores.get((it.index, name, "reference")), scores.get((it.index, name, "judge"))
            per_system[name] = {
                "session_id": answer["session_id"] if answer else None, "status": answer["status"] if answer else None,
                "answer": answer["answer"] if answer else None,
                "correct": None if ref_score is None else bool(ref_score["value"]),
                "found": _found(ref_score),
                "judge_score": judge["value"] if judge else None,
                "judge_reason": (judge["detail"] or {}).get("reason") if judge else None,
                "judge_error": _error_message(judge)}
        rows.append({"index": it.index, "id": it.id, "question": it.question,
                     "reference": it.reference_text or it.regex,
                     "systems": per_system,
                     "pairs": {b: {"outcome": p["outcome"], "points": p["points"], "consistent": p["consistent"]}
                               for (idx, b), p in pairs.items() if idx == it.index}})
    return EvalReport(row, summaries, versus, rows, judge_health(scores, pairs))
