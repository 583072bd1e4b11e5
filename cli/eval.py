"""`chorus eval [QUESTIONS.jsonl]`, `chorus eval list`, `chorus eval show ID`, `chorus eval resume ID`.

Progress (a bar with the ETA) goes to stderr, the report (or JSON) to stdout. The first Ctrl-C stops the
eval cleanly: what is done is kept, and `chorus eval resume ID` continues it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from cli.output import print_table
from cli.run import ctrl_c_cancels, given_file
from orchestrator.app import Chorus, install_signal_cleanup
from orchestrator.config.schema import load_config
from orchestrator.engine.run import CancelToken
from orchestrator.eval.items import BUNDLED, load_questions
from orchestrator.eval.report import EvalReport, build_report
from orchestrator.eval.run import EvalError, EvalRunner, EvalSpec, Progress
from orchestrator.eval.scoring import Interval
from orchestrator.eval.store import EvalStore
from orchestrator.limits import JUDGE_MAX_TOKENS

ACTIONS = ("list", "show", "resume")


class ProgressBar:
    """`[#####-----] 12/80  15%  ETA 3m20s  last step` on one line of a terminal; elsewhere a line per 10%."""

    def __init__(self, out: TextIO | None = None, width: int = 30) -> None:
        self.out = out or sys.stderr
        self.width = width
        self.tty = self.out.isatty()
        self._last_decile = -1

    def __call__(self, progress: Progress) -> None:
        filled = int(self.width * progress.fraction)
        eta = progress.eta_s
        line = (f"[{'#' * filled}{'-' * (self.width - filled)}] {progress.done}/{progress.total} "
                f"{progress.fraction:4.0%}  ETA {fmt_duration(eta) if eta is not None else '?'}  {progress.last}")
        if self.tty:
            self.out.write("\r" + line[:160].ljust(160))
            if progress.done >= progress.total:
                self.out.write("\n")
            self.out.flush()
            return
        decile = int(progress.fraction * 10)
        if decile != self._last_decile:
            self._last_decile = decile
            print(line, file=self.out, flush=True)


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_interval(interval: Interval | None, *, percent: bool) -> str:
    if interval is None:
        return "-"
    if percent:
        return f"{interval.mean:.0%} [{interval.low:.0%}, {interval.high:.0%}] n={interval.n}"
    return f"{interval.mean:.2f} [{interval.low:.2f}, {interval.high:.2f}] n={interval.n}"


def print_report(report: EvalReport, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up at call time (print_table's default is bound at import)
    e = report.eval
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created_at"])) if e.get("created_at") else "-"
    judge = (e["spec"].get("judge") or {}).get("model")
    print(f"{report.id}  {e['status']}  {when}  pipeline '{e['pipeline']}'  questions {e['source']}"
          + (f"  judge {judge}" if judge else ""), file=out)
    if e.get("error"):
        print(f"error: {e['error']}", file=out)
    print(file=out)
    print_table([(s.system, s.kind, s.answered, s.failed, fmt_interval(s.accuracy, percent=True),
                  fmt_interval(s.judge_score, percent=False) + (f" ({s.judge_errors} failed)" if s.judge_errors
                                                                else ""),
                  None if s.completion_tokens is None else f"{s.completion_tokens:.0f}",
                  None if s.seconds is None else f"{s.seconds:.2f}") for s in report.systems],
                ["SYSTEM", "KIND", "ANSWERS", "FAILED", "ACCURACY [95% CI]", "JUDGE 0-10 [95% CI]", "TOKENS/ANS",
                 "S/ANS"], out=out)
    if report.versus:
        print(file=out)
        print_table([(f"pipeline vs {v.baseline}", _wtl(v.by_reference), _wtl(v.by_judge) if v.by_judge else "-",
                      f"{v.judge_consistent}/{sum(v.by_judge.values())}" if v.by_judge else "-")
                     for v in report.versus], ["", "WIN/TIE/LOSS (REFERENCE)", "WIN/TIE/LOSS (JUDGE)",
                                              "SAME IN BOTH ORDERS"], out=out)
    if report.judge.failed:  # a judge that fails shows as '-' above: say so, and why
        print(file=out)
        print(f"judge: {report.judge.failed} of {report.judge.asked} verdict(s) failed: {report.judge.first_error}",
              file=out)
    print(file=out)
    print(f"items and their sessions: chorus eval show {report.id} --items", file=out)


def _wtl(counts: dict[str, int]) -> str:
    return f"{counts.get('win', 0)}/{counts.get('tie', 0)}/{counts.get('loss', 0)}"


def print_items(report: EvalReport, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rows = []
    for item in report.items:
        for name, s in item["systems"].items():
            mark = "-" if s["correct"] is None else "ok" if s["correct"] else "wrong"
            judged = s["judge_score"] if s["judge_score"] is not None else "failed" if s.get("judge_error") else None
            found = " ".join(s["found"].split())[:20] if s.get("found") is not None else None
            rows.append((item["id"], name, s["status"], mark, found, judged, s["session_id"],
                         " ".join((s["answer"] or "").split())[:50]))
    print_table(rows, ["ITEM", "SYSTEM", "RUN", "REFERENCE", "FOUND", "JUDGE", "SESSION", "ANSWER"], out=out)


# ---------------------------------------------------------------- commands


def _emit(report: EvalReport, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str))
    else:
        print_report(report)
        if getattr(args, "items", False):
            print()
            print_items(report)
    return 0 if report.eval["status"] == "completed" else 1


def _run(runner: EvalRunner, eval_id: str, chorus: Chorus, *, concurrency: int | None = None) -> EvalReport:
    install_signal_cleanup()
    cancel = CancelToken()
    try:
        with ctrl_c_cancels(cancel):
            report = runner.run(eval_id, cancel=cancel, concurrency=concurrency)
    finally:
        chorus.close()
    if report.eval["status"] != "completed":
        print(f"eval {eval_id} {report.eval['status']}: continue it with `chorus eval resume {eval_id}`",
              file=sys.stderr)
    return report


def fixed_at_start(args: argparse.Namespace) -> list[str]:
    """The options given that only a new eval takes: a resume runs the eval as it was started (its
    questions, systems and judge are in eval.db); only --concurrency (and how the report prints) applies."""
    given = {"--judge": args.judge is not None,
             "--judge-max-tokens": args.judge_max_tokens is not None,
             "--pipeline": args.pipeline is not None,
             "--baselines": args.baselines is not None,
             "--set": bool(args.set),
             "--limit": args.limit is not None}
    return [option for option, present in given.items() if present]


def cmd_eval(args: argparse.Namespace) -> int:
    config = load_config(args.config_dir)
    store = EvalStore(config.sessions_dir)
    if args.target == "list":
        rows = store.list(limit=args.limit or 50)
        if args.json:
            print(json.dumps(rows, indent=2, ensure_ascii=False, default=str))
        elif not rows:
            print("no eval yet")
        else:
            print_table([(r["id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])), r["status"],
                          r["pipeline"], r["n_items"], r["n_answers"], (r["spec"].get("judge") or {}).get("model"),
                          r["source"]) for r in rows],
                        ["ID", "CREATED", "STATUS", "PIPELINE", "ITEMS", "ANSWERS", "JUDGE", "QUESTIONS"],
                        out=sys.stdout)
        return 0
    if args.target in ("show", "resume"):
        if not args.id:
            raise EvalError(f"`chorus eval {args.target}` needs an eval id", hint="`chorus eval list` shows them.")
        if args.target == "show":
            return _emit(build_report(store, store.get(args.id)["id"]), args)
        eval_id = store.get(args.id)["id"]
        fixed = fixed_at_start(args)
        if fixed:
            raise EvalError(f"resume continues {eval_id} as it was started: {', '.join(fixed)} cannot be changed",
                            hint=f"Leave {'it' if len(fixed) == 1 else 'them'} out (--concurrency may be given), "
                                 "or start a new eval with them: `chorus eval [QUESTIONS.jsonl] ...`.")
        chorus = Chorus(config)
        runner = chorus.eval_runner(on_progress=ProgressBar())
        return _emit(_run(runner, eval_id, chorus, concurrency=args.concurrency), args)
    if args.id:
        raise EvalError(f"unexpected argument {args.id!r}", hint="Usage: chorus eval [QUESTIONS.jsonl] [options].")
    path = Path(args.target) if args.target else BUNDLED
    items = load_questions(path, limit=args.limit)
    base = args.pipeline in (None, "base")
    pipeline_file = None if base else given_file(Path(args.pipeline), "--pipeline")  # missing: where it was looked for
    chorus = Chorus(config)
    pipeline = chorus.eval_pipeline(pipeline_file, mode="base" if base else "manual", overrides=args.set)
    spec: EvalSpec = chorus.eval_spec(pipeline, baselines=args.baselines in (None, "members"), judge=args.judge,
                                      judge_max_tokens=args.judge_max_tokens or JUDGE_MAX_TOKENS,
                                      concurrency=args.concurrency)
    chorus.require_binary(pipeline)
    runner = chorus.eval_runner(on_progress=ProgressBar())
    source = "bundled:basic.jsonl" if args.target is None else str(path.resolve())
    eval_id = chorus.start_eval(spec, items, source=source, runner=runner)
    print(f"{eval_id}: {len(items)} question(s) x {len(spec.systems)} system(s) "
          f"({', '.join(s.name for s in spec.systems)})" + (f", judge {args.judge}" if args.judge else "")
          + f", {spec.concurrency} at once" + ("" if args.concurrency else " (what fits)"),
          file=sys.stderr)
    return _emit(_run(runner, eval_id, chorus), args)
