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
.venv/bin/python -c "import torch, torchtune, tune_losses" 2>/dev/null \
  || { echo "setup_env: install failed" >&2; exit 1; }
