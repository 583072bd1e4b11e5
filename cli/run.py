"""`chorus run` and `chorus history ...`: progress to stderr, the answer (or JSON) to stdout."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli.progress import ProgressPrinter
from orchestrator.app import Chorus, Pipeline, install_signal_cleanup
from orchestrator.config.schema import load_config
from orchestrator.engine.run import CancelToken, SequentialQuestion
from orchestrator.errors import ConfigError
from orchestrator.history.store import SessionError, SessionStore
from orchestrator.runs import RunOutcome


def ask_sequential_on_tty(question: SequentialQuestion) -> bool:
    waves = " then ".join("+".join(w) for w in question.waves)
    print(f"\nStage '{question.stage}': its models do not fit in memory together. {question.reason}\n"
          f"Run them in {len(question.waves)} waves ({waves})? [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except (OSError, ValueError):
        return False


def sequential_policy(args: argparse.Namespace, manual: bool) -> bool | Callable[[SequentialQuestion], bool]:
    if args.allow_sequential or not manual:
        return True
    return ask_sequential_on_tty if sys.stdin.isatty() else False


@contextmanager
def ctrl_c_cancels(cancel: CancelToken) -> Iterator[None]:
    """First Ctrl-C cancels the run cleanly (the session is kept as cancelled); a second one aborts."""
    def handler(_signum: int, _frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        print("\ncancelling... (Ctrl-C again to abort)", file=sys.stderr, flush=True)
        cancel.cancel()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def emit_outcome(outcome: RunOutcome, as_json: bool, printer: ProgressPrinter | None = None) -> int:
    """The JSON view, or the answer (unless `printer` streamed it already) and the status on stderr."""
    if printer is not None and printer.broken_pipe:
        raise BrokenPipeError  # stdout's reader went away (`| head`): main ends quietly
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2, ensure_ascii=False, default=str))
    else:
        shown = printer is not None and printer.answer_shown(outcome.run.final)
        if outcome.run.status in ("completed", "partial") and not shown:
            print(outcome.run.final.strip())
        err = outcome.run.error.text() if outcome.run.error else ""
        print(f"\nstatus: {outcome.run.status}" + (f" ({err})" if err else ""), file=sys.stderr)
        if (took := run_time(outcome)) is not None:
            print(f"time: {took:.1f}s for the whole run, server starts included", file=sys.stderr)
        if outcome.session_dir:
            incomplete = ", incomplete" if outcome.history_error else ""
            print(f"session: {outcome.session_id} ({outcome.session_dir}{incomplete})", file=sys.stderr)
        if outcome.history_error:
            print(f"warning: {outcome.history_error}", file=sys.stderr)
    return EXIT_CODES.get(outcome.run.status, 1)


def run_time(outcome: RunOutcome) -> float | None:
    """The run's wall time in seconds, from its start to its end (servers started on the way included), for
    the `time:` line; not the sum of the models' lines, as a stage's models run side by side."""
    run = outcome.run
    return None if run.finished_at is None else max(0.0, run.finished_at - run.started_at)


EXIT_CODES = {"completed": 0, "partial": 3}  # failed, cancelled: 1; errors before the run: 2


def read_question(text: str) -> str:
    """The question as given, or all of stdin for `-` (`echo ... | chorus run -`), without echo's newline."""
    return sys.stdin.read().strip() if text == "-" else text


def terminal_printer(as_json: bool) -> ProgressPrinter:
    """Progress on stderr; the answer streams to stdout unless stdout carries JSON."""
    return ProgressPrinter(sys.stderr, answer_out=None if as_json else sys.stdout)


def given_file(path: Path | None, option: str) -> Path | None:
    """A pipeline file named on the command line, checked here so that a missing one is said to be missing
    where the user pointed (relative to the current directory), not blamed on the config folder."""
    if path is None or path.expanduser().exists():
        return path.expanduser() if path is not None else None
    where = "" if path.expanduser().is_absolute() else f" (relative to the current directory, {Path.cwd()})"
    raise ConfigError(str(path), f"the {option} file was not found{where}",
                      hint=f"Check the path, or give the file's full path: {option} /path/to/pipeline.yaml")


def pipeline_of(args: argparse.Namespace, chorus: Chorus, *, blocked_ok: bool = False) -> Pipeline:
    """The pipeline `run` and `plan` are about, checked by the front door: --manual FILE (manual mode) or
    --pipeline FILE, else the base pipeline.yaml (base mode), with every --set applied. `blocked_ok`: a base
    pipeline with missing models is let through (`chorus plan` shows it blocked)."""
    manual = given_file(args.manual, "--manual")
    given = manual or given_file(args.pipeline, "--pipeline")
    return chorus.pipeline(given, mode="manual" if manual is not None else "base", overrides=args.set,
                           require_models=False if blocked_ok else None)


def cmd_run(args: argparse.Namespace) -> int:
    text = read_question(args.question)  # cleaned by the front door, before anything is started or saved
    with Chorus.from_dir(args.config_dir) as chorus:
        pipeline = pipeline_of(args, chorus)
        install_signal_cleanup()
        cancel = CancelToken()
        printer = terminal_printer(args.json)
        try:
            with ctrl_c_cancels(cancel):
                outcome = chorus.run(pipeline, text, cancel=cancel, observers=[printer],
                                     allow_sequential=sequential_policy(args, pipeline.mode == "manual"))
        finally:
            printer.close()
    return emit_outcome(outcome, args.json, printer)


# ---------------------------------------------------------------- history


def _store(args: argparse.Namespace) -> SessionStore:
    """The sessions of the config; stdout replaces what it cannot print (old text with lone surrogates,
    a terminal that is not UTF-8) instead of failing halfway through a session."""
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]  # a TextIOWrapper in practice
    return SessionStore(load_config(args.config_dir).sessions_dir)


def _when(ts: object) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not ts:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    except (OverflowError, OSError, ValueError):  # a time no calendar date can show (a damaged file)
        return "-"


def _short(text: str | None, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def cmd_history_list(args: argparse.Namespace) -> int:
    from cli.output import print_table

    rows, total = _store(args).list_page(limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no sessions yet")
        return 0
    print_table([(r["id"], _when(r["created_at"]), r["mode"], "damaged" if r["problems"] else r["status"],
                  _short(r["question"]), r["parent_session"] or "") for r in rows],
                ["ID", "CREATED", "MODE", "STATUS", "QUESTION", "PARENT"])
    for r in rows:
        if r["problems"]:
            status = f" ({r['status']})" if r["status"] else ""
            print(f"{r['id']} is damaged{status}: {'; '.join(r['problems'])}", file=sys.stderr)
    if total > len(rows):
        print(f"({total - len(rows)} older session(s) not shown: --limit {total} shows all)", file=sys.stderr)
    return 0


def cmd_history_show(args: argparse.Namespace) -> int:
    session = _store(args).load(args.id)
    if args.png:
        from orchestrator.charts import save_png, timeline_chart

        path = save_png(timeline_chart(session), args.png)
        print(f"timeline of {session.id} written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(session.to_dict(), indent=2, ensure_ascii=False, default=str))
        return 0
    if session.problems:
        print(f"warning: {session.id} is damaged, showing what could be read: {'; '.join(session.problems)}",
              file=sys.stderr)
    m = session.meta
    status = m.get("status") or ("damaged" if session.problems else "unknown")
    print(f"{session.id}  {m.get('mode') or '-'}  {status}  {_when(m.get('created_at'))}")
    if m.get("parent_session"):
        print(f"rerun of {m['parent_session']} from stage {m.get('rerun_from_stage')}")
    if session.recovered:
        print(f"({' and '.join(session.recovered)} recovered from config_snapshot.json)")
    question = m.get("question")
    print(f"question: {question if question is not None else '(unknown: not readable)'}\n")
    if session.error:  # why the run was refused, failed or cancelled (need vs have for a refused one)
        print(f"why: {session.error.text()}\n")
    for stage in session.stages:
        print(f"== step {stage.index}: {stage.name} [{stage.status}]")
        if len(stage.waves) > 1:
            print(f"   in {len(stage.waves)} waves: " + " then ".join("+".join(w) for w in stage.waves))
        if stage.error and stage.status != "ok":
            print(f"   error: {stage.error.text()}")
        for r in stage.responses:
            why = f" {r.status}: {r.error.text() if r.error else ''}" if not r.ok else ""
            head = f"-- {r.label} ({r.model})" + why
            print(head)
            if r.text:
                print(r.text.strip())
        if stage.aggregation and len(stage.responses) > 1:
            print(f"-- merged by {stage.aggregation.kind}:\n{stage.output.strip()}")
        print()
    if session.final is not None:
        print(f"== final\n{session.final.strip()}")
    return 0


def cmd_history_search(args: argparse.Namespace) -> int:
    from cli.output import print_table

    hits = _store(args).search(args.text, limit=args.limit)
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print("no match")
        return 0
    print_table([(h["id"], h["status"], _short(h["question"], 40), h["field"], _short(h["snippet"], 70))
                 for h in hits], ["ID", "STATUS", "QUESTION", "FOUND IN", "SNIPPET"])
    return 0


def cmd_history_rerun(args: argparse.Namespace) -> int:
    config = load_config(args.config_dir)
    parent = SessionStore(config.sessions_dir).load(args.id)  # a bad or unknown id: one short error, before the engine
    unknown = [k for k in ("question", "mode") if not (parent.meta.get(k) or "").strip()]
    if unknown:  # session.json and the snapshot both damaged: never run an empty question, or in a guessed mode
        raise SessionError(parent.dir, f"cannot be rerun: its {' and '.join(unknown)} could not be read "
                           f"({'; '.join(parent.problems) or 'not recorded'})",
                           hint="Run the question again with `chorus run`.")
    install_signal_cleanup()
    cancel = CancelToken()
    with Chorus(config) as chorus, ctrl_c_cancels(cancel):
        prepared = chorus.prepare_rerun(args.id, args.stage, overrides=args.set)
        outcome = chorus.rerun(prepared, cancel=cancel, observers=[printer := terminal_printer(args.json)],
                               allow_sequential=sequential_policy(args, manual=True))
    return emit_outcome(outcome, args.json, printer)


def cmd_history_export(args: argparse.Namespace) -> int:
    from orchestrator.history.export import default_export_name, export_session

    session = _store(args).load(args.id)
    text = export_session(session, args.format)
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(text)
        return 0
    path = args.output / default_export_name(session, args.format) if args.output.is_dir() else args.output
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SessionError(path, f"cannot write the export ({exc.strerror})",
                           hint="Check that the folder exists and is writable.") from None
    if session.problems:
        print(f"warning: {session.id} is damaged; the export holds what could be read", file=sys.stderr)
    print(f"{session.id} exported to {path}", file=sys.stderr)
    return 0


def cmd_history_rm(args: argparse.Namespace) -> int:
    from orchestrator.history.export import remove_sessions

    for sid in remove_sessions(_store(args), args.ids, force=args.force):
        print(f"removed {sid}")
    return 0


def cmd_history_prune(args: argparse.Namespace) -> int:
    from orchestrator.history.export import prune_sessions

    report = prune_sessions(_store(args), args.older_than, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    before = _when(report.cutoff)
    if report.removed:
        print(f"{verb} {len(report.removed)} session(s) created before {before}: {', '.join(report.removed)}")
    else:
        print(f"no session created before {before}")
    for sid, why in report.busy.items():
        print(f"kept {sid}: it {why}", file=sys.stderr)
    if report.stale_rows:
        print(f"{'would drop' if args.dry_run else 'dropped'} index rows of sessions whose files are gone: "
              f"{', '.join(report.stale_rows)}")
    return 0


def cmd_history_reindex(args: argparse.Namespace) -> int:
    store = _store(args)
    report = store.reindex()
    damaged = f", {len(report.damaged)} of them damaged" if report.damaged else ""
    print(f"reindexed {report.indexed} session(s) from {store.dir}{damaged}")
    for sid, problems in report.damaged.items():
        print(f"  {sid}: damaged: {'; '.join(problems)}")
    for sid, why in report.skipped.items():
        print(f"  {sid}: skipped: {why}")
    return 0
