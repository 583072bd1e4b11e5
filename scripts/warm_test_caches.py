"""Fill the caches a first run of the fast tier would fill once per pytest-xdist worker, once, on every core.

In a fresh clone four caches are empty, and each of the fast tier's three workers filled all of them:
- pytest's rewritten test modules (`tests/**/__pycache__/*-pytest-*.pyc`): every worker collects every
  module, and rewrote all of them, 5.5 s of CPU each on 2 cores;
- Hypothesis's constants of the local source (`.hypothesis/constants/`): a worker's first `@given` test
  parses every project module it has loaded, 2-3 s of CPU each;
- Hypothesis's Unicode tables (`.hypothesis/unicode_data/`): the first `st.text()` tries every code point
  against UTF-8, about 2 s each;
- the packages' plain bytecode, compiled by every worker at once.
Here each is filled once, spread over the cores, with pytest's and Hypothesis's own functions, nothing of
ours imported or run. Where their internals differ (other versions) a cache is left to the workers, as
before. When the caches are warm: a hash per file.
"""

from __future__ import annotations

import compileall
import os
import sys
import types
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
PACKAGES = ("launcher", "orchestrator", "api", "cli", "ui")


def rewrite_if_stale(module: Path) -> bool:
    """True when the module's cached rewrite was missing or stale and has been written."""
    from _pytest.assertion import rewrite

    pyc = rewrite.get_cache_dir(module) / f"{module.stem}.{rewrite.PYTEST_TAG}.pyc"
    if rewrite._read_pyc(module, pyc) is not None:
        return False
    source_hash, code = rewrite._rewrite_test(module, None)  # type: ignore[arg-type]  # None: no pass hook
    pyc.parent.mkdir(exist_ok=True)
    quiet = types.SimpleNamespace(trace=lambda _message: None)  # the one attribute _write_pyc reads of its state
    return rewrite._write_pyc(quiet, code, source_hash, pyc)  # type: ignore[arg-type]


def cache_constants(source: Path) -> bool:
    """Hypothesis's constants of one source file, read from its cache or parsed and cached (by content)."""
    from hypothesis.internal.constants_ast import constants_from_module

    module = types.ModuleType(source.stem)
    module.__file__ = str(source)  # read, not run
    constants_from_module(module)
    return True


def draw_a_text() -> bool:
    """Hypothesis's Unicode tables, built by drawing one text as a test would."""
    import warnings

    from hypothesis import strategies as st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .example() outside a test is meant for the REPL; it is what we need
        st.text(max_size=2).example()
    return True


def fill(pool: ProcessPoolExecutor, what: str, job: Callable[[Path], bool], files: list[Path]) -> int:
    try:
        return sum(pool.map(job, files, chunksize=4))
    except Exception as exc:  # other versions' internals: the workers fill it as they always did
        print(f"warm_test_caches: {what} left to the workers ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 0


def main() -> int:
    if sys.dont_write_bytecode:
        return 0  # pytest would neither write nor read its cache
    os.chdir(ROOT)  # Hypothesis keeps its cache in .hypothesis/ under the working directory, as under pytest
    tests = sorted(p for p in TESTS.rglob("*.py") if p.name.startswith("test_") or p.name == "conftest.py")
    sources = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        tables = pool.submit(draw_a_text)
        written = fill(pool, "pytest's rewritten asserts", rewrite_if_stale, tests)
        fill(pool, "Hypothesis's constants", cache_constants, sources)
        try:
            tables.result()
        except Exception as exc:
            print(f"warm_test_caches: Hypothesis's Unicode tables left to the workers ({exc!r})", file=sys.stderr)
    for package in (*PACKAGES, "tests"):
        compileall.compile_dir(ROOT / package, quiet=1, workers=0)
    if written:
        print(f"== warmed the test caches ({written} test modules rewritten)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
