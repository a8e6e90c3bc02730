#!/usr/bin/env bash
# Creates ./.venv (once) and installs tune-losses with its pinned dependencies.
# Idempotent: a second call only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml; pip takes the local CPU wheel for it.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 \
  | grep -v -E "is ignored: it is neither a file nor a directory" || true
# `tune run recipes/x.py` imports our recipes as `recipes.x`, but torchtune ships its own top-level
# `recipes` package: put the repository root first on the import path whenever this venv is active,
# and keep Hugging Face libraries offline (nothing here downloads).
if ! grep -q "tune-losses" .venv/bin/activate; then
  cat >> .venv/bin/activate <<ACT
# tune-losses: repository root first on the import path; no hub access
export PYTHONPATH="$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ACT
fi
# `tune run recipes/x.py` imports our recipe as the module `recipes.x`; torchtune installs a top-level
# `recipes` package of its own in site-packages. This .pth puts the repository root ahead of
# site-packages for every interpreter of this venv (no environment variable needed).
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.path.insert(0, '$PWD')" > "$SITE/tune_losses_repository.pth"
.venv/bin/python -c "import torch, torchtune, tune_losses" 2>/dev/null \
  || { echo "setup_env: install failed" >&2; exit 1; }
