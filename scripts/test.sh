#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit, integration against the real
# llama-server and demo model, UI). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
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
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"  # strict on launcher/ and orchestrator/ ([tool.mypy] in pyproject.toml); an error stops here
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
