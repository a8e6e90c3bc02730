#!/usr/bin/env bash
# The tests, set-up included. Default: the fast suite (minutes on 2 cores).
#   bash scripts/test.sh           fast tests (slow / distributed ones deselected)
#   bash scripts/test.sh --all     everything: + end-to-end recipes, 2-rank gloo runs, benchmark smoke (CI)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source .venv/bin/activate
markers=(-m "not slow and not distributed")
if [ "${1:-}" = "--all" ]; then
  shift
  markers=(-m "slow or distributed or not slow")
fi
python -m tune_losses.tiny >/dev/null
python -m pytest "${markers[@]}" "$@"
