"""The `chorus` command line. Each subcommand is one small function; errors print as one paragraph.

Building the parser imports no engine (the commands' arguments are in cli/commands.py): `chorus --help` and
an argument error answer at once, and a command imports its own module when it runs."""

from __future__ import annotations

import signal
import sys


def _interrupted_while_importing(_signum: int, _frame: object) -> None:
    """Ctrl-C before main() runs (the imports below take a while on a busy machine): exit 130, no traceback."""
    print("chorus: interrupted", file=sys.stderr)
    raise SystemExit(130)


def _quiet_ctrl_c_during_imports() -> None:
    """Install that handler before anything heavy is imported (put back by `_restore_ctrl_c` below)."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is handled already
            signal.signal(signal.SIGINT, _interrupted_while_importing)
    except ValueError:  # not the main thread (imported by a server's worker): nothing to do
        pass


_quiet_ctrl_c_during_imports()

import argparse  # noqa: E402  # (every import below comes after the Ctrl-C handler above)
import logging  # noqa: E402
import os  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from cli.commands import add_commands  # noqa: E402
from cli.parser import SuggestingParser  # noqa: E402
from orchestrator.errors import ChorusError  # noqa: E402


def _restore_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt again, which main() turns into exit 130 (and `chorus run` into a cancel)."""
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass


_restore_ctrl_c()

log = logging.getLogger("chorus")


def global_options(*, defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. The top parser holds the defaults; the
    subcommands' copies default to SUPPRESS, so an option given before the subcommand is not overwritten
    by the subcommand's own default (`chorus --config-dir X check`, `chorus -v run ...`)."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", type=Path, default=default(None),
                        help="folder with app.yaml, models.yaml, pipeline.yaml "
                             "(default: $CHORUS_CONFIG_DIR, $CHORUS_HOME/config, ./config, ~/.config/chorus, else "
                             "the packaged default config; see `chorus init`)")
    common.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log chorus's debug details to stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = global_options(defaults=False)
    parser: argparse.ArgumentParser = SuggestingParser(
        prog="chorus", parents=[global_options(defaults=True)],
        description="Run several local GGUF models together in pipelines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_commands(sub, common)
    return parser


def format_error(exc: ChorusError) -> str:
    """`chorus: error: MESSAGE Hint: HINT`, wrapped at 100 columns, as README and `chorus check` show it."""
    text = f"chorus: error: {exc.message}"
    if exc.hint:
        text += f" {exc.hint}" if exc.hint.startswith("Hint:") else f" Hint: {exc.hint}"
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


class OneLineFormatter(logging.Formatter):
    """Log records on stderr as one line each: a debug or info record's traceback (NVML not there, a probe
    that failed) is shortened to its exception's one-line text; warnings and errors keep theirs."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.levelno < logging.WARNING:
            exc = record.exc_info[1]
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
        return super().format(record)


def setup_stderr_logging(verbose: bool) -> None:
    """Warnings on stderr; with -v chorus's own debug lines too, not those of the HTTP or asyncio libraries."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "chorus_stderr", False)]:
        root.removeHandler(old)  # main() called again in one process (tests): one stderr handler
    handler = logging.StreamHandler(sys.stderr)
    handler.chorus_stderr = True  # type: ignore[attr-defined]  # our marker on a stdlib handler (getattr above)
    handler.setFormatter(OneLineFormatter("chorus: %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)  # a log file may want more than stderr
    root.addHandler(handler)  # the root stays at WARNING: other libraries' debug lines never show
    if verbose:
        logging.getLogger("chorus").setLevel(logging.DEBUG)


def check_config_dir(path: Path | None) -> None:
    """`--config-dir FILE` (app.yaml itself, say) is said to be a file, not reported as a folder not found."""
    if path is not None and path.expanduser().exists() and not path.expanduser().is_dir():
        from orchestrator.errors import ConfigError

        raise ConfigError(str(path), "is a file, not a folder",
                          hint=f"--config-dir takes the folder that holds app.yaml, models.yaml and pipeline.yaml "
                               f"(perhaps {path.expanduser().absolute().parent}).")


def quiet_broken_pipe() -> int:
    """stdout's reader went away (`chorus ... | head`): no traceback, and no second error when Python flushes
    stdout at exit (the Python docs' recipe). 141 = 128 + SIGPIPE, what a shell reports for such a pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        from orchestrator.logs import setup_app_log_for  # after parsing: it reads app.yaml (pydantic)

        setup_stderr_logging(args.verbose)
        setup_app_log_for(getattr(args, "config_dir", None), getattr(args, "command", None))  # <logs_dir>/chorus.log
    except KeyboardInterrupt:  # Ctrl-C while the parser or the log's imports load: no traceback
        print("chorus: interrupted", file=sys.stderr)
        return 130
    try:
        check_config_dir(getattr(args, "config_dir", None))
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a pipe's reader that left shows here, not at exit
        return code
    except BrokenPipeError:
        return quiet_broken_pipe()
    except ChorusError as exc:
        print(format_error(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chorus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
