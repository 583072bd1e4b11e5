"""`chorus ARGS` run by `cli.main.main` inside the test process, answered as `subprocess.run` would answer.

Why: a new Python process costs about 0.6 s of CPU before chorus does anything (the imports behind
orchestrator.app), and most CLI tests check what a command prints and how it exits, which does not depend
on being a separate process. Tests of what does (signals, stdin bytes and their decoding, a killed or
inherited process, the installed console script) keep starting a real one; every command family keeps at
least one such test.

What a process would not share is saved and restored around the call: the environment, the working
folder, the root logger's handlers and the levels main() sets, and the signal handlers the commands install.
An exception that escapes main() is printed to stderr with its traceback and gives exit status 1, as the
interpreter does, so "no traceback" checks still see it. stdout and stderr encode as a child's would.
`run_mains_in_child` runs several commands in one new process, for conditions that hold for a whole process.
"""

from __future__ import annotations

import contextlib
import io
import json
import locale
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from cli.main import main

REPO = Path(__file__).resolve().parent.parent
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _process_state(env: Mapping[str, str] | None, cwd: str | os.PathLike[str], stdin: str) -> Iterator[None]:
    """What one chorus process may change for itself, put back afterwards."""
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    root, chorus_log = logging.getLogger(), logging.getLogger("chorus")
    saved_handlers, saved_levels = list(root.handlers), (root.level, chorus_log.level)
    saved_signals = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.environ.setdefault("COLUMNS", "80")  # argparse's help width: a process on a pipe gets 80 too
        os.chdir(cwd)
        sys.stdin = io.StringIO(stdin)
        yield
    finally:
        sys.stdin = saved_stdin
        for handler in [h for h in root.handlers if h not in saved_handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_levels[0])
        chorus_log.setLevel(saved_levels[1])
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_main(*args: str | os.PathLike[str], input: str | None = None, env: Mapping[str, str] | None = None,
             cwd: str | os.PathLike[str] = REPO) -> subprocess.CompletedProcess[str]:
    """`chorus ARGS` in this process: exit status, stdout and stderr. `input` is stdin's text (default
    empty, as /dev/null); `env`, when given, is the whole environment, as for subprocess.run."""
    argv = [os.fspath(a) for a in args]
    stdout, stderr = _pipe_like(sys.__stdout__), _pipe_like(sys.__stderr__)
    with _process_state(env, cwd, input or ""), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help, a usage error
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=stderr)
        except Exception:
            traceback.print_exc(file=stderr)
            code = 1
    return subprocess.CompletedProcess(["chorus", *argv], code, _read(stdout), _read(stderr))


def _pipe_like(real: TextIO | None) -> io.TextIOWrapper:
    """A stream that encodes as a child's stdout or stderr on a pipe would (the encoding and error handler
    Python picks from the locale, the same for this process), so text a real stream cannot take fails here
    too; not a terminal, no file descriptor."""
    encoding, errors = (real.encoding, real.errors) if real is not None else ("utf-8", "strict")
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors)


def _read(stream: io.TextIOWrapper) -> str:
    """What subprocess.run(text=True) would give for the bytes written (the locale's encoding, strict)."""
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode(locale.getpreferredencoding(False))



def run_mains_in_child(*calls: list[str], preexec_fn: Callable[[], None] | None = None,
                       timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """Each of `calls` (argv lists) through main(), one after another, in one new Python process.

    For conditions that hold for a whole process, such as a file-size limit set by `preexec_fn` (a full
    disk): the process is real, and its Python start is paid once for all the calls, not once per call.
    """
    script = ("import json, sys\nfrom tests.clirun import run_main\n"
              "out = [run_main(*argv) for argv in json.loads(sys.stdin.read())]\n"
              "print(json.dumps([[r.returncode, r.stdout, r.stderr] for r in out]))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(calls), capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, preexec_fn=preexec_fn)
    assert done.returncode == 0, done.stderr
    return [subprocess.CompletedProcess(["chorus", *argv], code, out, err)
            for argv, (code, out, err) in zip(calls, json.loads(done.stdout), strict=True)]
