#!/usr/bin/env bash
# Set everything up, then run the tests. Two tiers (markers set in tests/conftest.py):
#   scripts/test.sh            everything: ruff, mypy, every test (unit, integration against the real
#                              llama-server and demo models, UI)
#   scripts/test.sh --fast     the fast tier only: every test that needs neither llama-server nor a model
#                              file (fake backend, config, plan, templates, aggregation, history,
#                              architecture...; synthetic GGUF files), on every core (pytest-xdist). Sets up
#                              .venv if missing, never fetches a model nor builds llama-server; ruff, no mypy.
#   scripts/test.sh --rest     the other tier: full setup, mypy, the integration and browser tests.
# `--fast` then `--rest` (what .ci/run does) runs every test once. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tier=all
case "${1:-}" in
  --fast) tier=fast; shift ;;
  --rest) tier=rest; shift ;;
esac

if [[ $tier == fast ]]; then
  scripts/setup.sh --venv-only
else
  scripts/setup.sh
fi

if [[ $tier != fast ]]; then
  # The browser test drives Debian's chromium through Playwright (no browser download needed).
  if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing chromium for the browser test"
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
        || echo "warning: could not install chromium; the browser test will fail in CI and skip locally" >&2
    else
      echo "warning: chromium not found; install Debian's chromium to run the browser test" >&2
    fi
  fi
fi

if [[ $tier != rest ]]; then
  echo "== ruff"
  .venv/bin/ruff check .
fi
if [[ $tier != fast ]]; then
  echo "== mypy"  # strict on launcher/ and orchestrator/ ([tool.mypy] in pyproject.toml); an error stops here
  # Its incremental cache lives beside the llama-server build cache, so a fresh clone checks only what
  # changed (mypy compares each file's hash when its path or mtime differ): half a minute on 2 cores, else.
  .venv/bin/mypy --cache-dir "${CHORUS_CACHE_DIR:-$HOME/.cache/chorus}/mypy"
fi

# Bytecode is cached (__pycache__/, git-ignored) even where PYTHONDONTWRITEBYTECODE is set: otherwise every
# xdist worker and every chorus process a test starts compiles the same files again, pytest's rewriting of
# the test modules' asserts included (half of the fast tier's collection time).
unset PYTHONDONTWRITEBYTECODE

markers=()
case $tier in
  # The fast tier spreads over the cores (pytest-xdist): its tests hold no shared port, folder or server.
  # A test file stays on one worker, so an expensive module fixture (the installed wheel, the parsed
  # sources) is built once: --dist loadfile, as loadgroup's xdist_group marks are ignored with pytest 9.2
  # (pytest-xdist #1386) and the wheel was built on both workers. One worker more than the cores: its tests
  # also wait (for a `chorus api` subprocess to answer, a paced fake), and on 2 cores a third worker took
  # 40-45 s where two took 46-48. `-n 0` among the extra arguments runs it in one process.
  fast) markers=(-m "not integration and not browser" -n "$(( $(nproc) + 1 ))" --dist loadfile)
        # Its temporary folders (a config copy per test, sessions, SQLite indexes, synthetic GGUF files) on
        # tmpfs where there is one: on a virtual disk the writes and fsyncs were a tenth of its time. An
        # explicit --basetemp among the extra arguments wins (it comes later).
        if [[ -d /dev/shm && -w /dev/shm ]]; then
          scratch=$(mktemp -d /dev/shm/chorus-fast-tests.XXXXXX)
          trap 'rm -rf "$scratch"' EXIT
          markers+=(--basetemp "$scratch/pytest")
        fi ;;
  # The rest tier: first the tests marked serial (they measure real memory) in a pass of their own, then the
  # others on two workers, each on its half of the cores with its llama-servers (the servers of two workers
  # on the same cores slow each other down more than the second worker gains). A test file stays on one
  # worker, so a module fixture (a `chorus api`, a browser) starts once; the session's warm servers start
  # once per worker; the longest files start first (tests/conftest.py). --dist loadfile, as loadgroup's
  # groups are ignored with pytest 9.2 (pytest-xdist #1386).
  rest) markers=(-m "(integration or browser) and not serial" -n 2 --dist loadfile --no-loadscope-reorder)
        export CHORUS_TESTS_SPLIT_CORES=1 ;;
esac
serial_rc=5
if [[ $tier == rest ]]; then
  echo "== pytest (rest, serial)"
  set +e
  .venv/bin/python -m pytest -m "(integration or browser) and serial" "$@"
  serial_rc=$?
  set -e
fi
if [[ $tier == fast ]]; then
  .venv/bin/python scripts/warm_test_caches.py  # a fresh clone: its caches filled once, not once per worker
fi
echo "== pytest ($tier)"
set +e
.venv/bin/python -m pytest "${markers[@]}" "$@"
rc=$?
set -e
if [[ $rc -eq 5 || ($rc -eq 0 && $serial_rc -ne 5) ]]; then
  rc=$serial_rc  # each pass's failure counts; no tests collected only when neither pass found any
fi
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
