#!/usr/bin/env bash
# The main job, set-up included: environment + install, tiny offline assets, teacher SFT, student KD,
# the no-KD control, held-out losses, loss curves (PNG) and the loss's peak memory, chunked vs fused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source .venv/bin/activate
python scripts/demo.py "$@"
