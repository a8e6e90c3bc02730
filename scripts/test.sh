#!/usr/bin/env bash
# The tests, set-up included. Default: the fast suite (minutes on 2 cores).
#   bash scripts/test.sh           fast tests (slow / distributed ones deselected)
#   bash scripts/test.sh --all     everything: + end-to-end recipes, 2-rank gloo runs, first use in a
#                                  fresh clone, benchmark smoke (CI)
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
# On a shared machine, OpenMP threads that spin while waiting for each other slow small-tensor work
# many times over (a 30-step tiny run: 40 s with 1 thread, 290 s with 2 spinning threads, load 5 on
# 2 cores); passive waiting costs little on an idle machine.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
echo "test: building the tiny offline assets (seconds)"
python -m tune_losses.tiny >/dev/null
echo "test: python -m pytest ${markers[*]} $*"
python -m pytest "${markers[@]}" "$@"
