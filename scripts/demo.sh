#!/usr/bin/env bash
# Set everything up, then run the main job (the base pipeline) on the two demo models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
echo "== chorus check"
.venv/bin/chorus check
echo "== chorus run (the base pipeline on the two demo models)"
.venv/bin/chorus run "${1:-Why is the sky blue?}"
