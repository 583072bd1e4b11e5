#!/usr/bin/env bash
# Set everything up, then run the main job on the demo model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
echo "== chorus check"
.venv/bin/chorus check
if .venv/bin/chorus run --help >/dev/null 2>&1; then
  echo "== chorus run (base pipeline on the demo model)"
  .venv/bin/chorus run "${1:-Why is the sky blue?}"
fi
