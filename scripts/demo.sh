#!/usr/bin/env bash
# The main job, set-up included: environment + install (timed and printed separately), tiny offline
# assets, teacher SFT, student KD, the no-KD control, held-out losses, loss curves (PNG) and the
# loss's peak memory, chunked vs fused.
#   bash scripts/demo.sh            the quick version (1 epoch per run)
#   bash scripts/demo.sh --full     the long version (2 epochs per run)
# Other arguments go to scripts/demo.py (--seed, --out, --epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source .venv/bin/activate
python scripts/demo.py "$@"
