#!/usr/bin/env bash
# Creates ./.venv (once) and installs tune-losses with every extra (dev: tests, lint, type check;
# train, torchtune, hf) at the exact versions of constraints.txt, saying what it does and how long each
# step takes. A repeat call takes seconds: pip runs again only when pyproject.toml or constraints.txt
# changed since the last install, recorded in .venv/.tune-losses-installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.tune-losses-installed
T_ALL=$(date +%s)
t0=$T_ALL
say() { printf 'setup: %s\n' "$*"; }
took() { local now; now=$(date +%s); say "  done in $((now - t0)) s"; t0=$now; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
  took
fi

# `dev` pulls in the other extras (train, torchtune, hf), so every test can run.
extras=dev
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) extras=$extras"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  say "install up to date (pyproject.toml and constraints.txt unchanged since the last install): pip skipped"
  installed=0
else
  torch_pin=$(grep -oE '^torch==[^ ]+' constraints.txt || true)
  if [ -f "$STAMP" ]; then why="pyproject.toml, constraints.txt or the extras changed since the last install"
  else why="first install: a few minutes, longer on a busy machine"; fi
  say "installing ${torch_pin:-torch} (CPU) and tune-losses[$extras] at constraints.txt's versions (editable; $why)"
  # torchtune 0.6.1 requires `huggingface_hub[hf_transfer]`, an extra that the installed
  # huggingface-hub no longer has (nothing here downloads, so nothing needs it): pip's warning about
  # it is dropped, and so are the notes on missing local index folders; every other message is kept.
  pip_log=$VENV/pip-install.log
  status=0
  # torch first, alone, so that the CPU wheel is chosen before any other package asks for torch.
  { "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt torch &&
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"; } \
    >"$pip_log" 2>&1 || status=$?
  grep -v -E "is ignored: it is neither a file nor a directory|does not provide the extra 'hf_transfer'" \
    "$pip_log" || true
  [ "$status" = 0 ] || { say "pip install failed (exit $status)" >&2; exit 1; }
  echo "$want" > "$STAMP"
  installed=1
  took
fi

# `tune run recipes/x.py` imports our recipe as the module `recipes.x`; torchtune installs a top-level
# `recipes` package of its own in site-packages. This .pth puts the repository root ahead of
# site-packages for every interpreter of this venv (no environment variable needed).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import sys; sys.path.insert(0, '$PWD')" > "$site/tune_losses_repository.pth"

# `source .venv/bin/activate` also keeps Hugging Face libraries offline (nothing here downloads).
# The block sits between two marker lines that occur nowhere else (the venv's own path may contain
# "tune-losses"), and is rewritten in place, so repeat calls stay correct.
BEGIN="# >>> tune-losses setup_env.sh >>>"
END="# <<< tune-losses setup_env.sh <<<"
block="$BEGIN
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
$END"
act=$VENV/bin/activate
current=$(sed -n "/^$BEGIN\$/,/^$END\$/p" "$act")
if [ "$current" != "$block" ]; then
  # Drop an older block (ours, or the single-marker block of earlier versions that also set
  # PYTHONPATH) before appending.
  sed -i -e "/^$BEGIN\$/,/^$END\$/d" \
         -e '/^# tune-losses: repository root first on the import path; no hub access$/,+2d' "$act"
  printf '%s\n' "$block" >> "$act"
  say "$act: sets HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
fi

# torchao (imported by torchtune before any of our code runs) logs "Skipping import of cpp extensions
# due to incompatible torch version" on every start: its prebuilt C++ kernels target another torch,
# and nothing here uses them. A logging filter on the `torchao` logger, loaded at interpreter start
# by a .pth file in this venv only, drops exactly that message; every other torchao message stays.
cat > "$site/tune_losses_quiet_torchao.pth" <<'PTH'
# Written by tune-losses' scripts/setup_env.sh: silence torchao's known, harmless "Skipping import of cpp extensions" warning.
import logging; logging.getLogger("torchao").addFilter(lambda r: not str(r.msg).startswith("Skipping import of cpp extensions due to incompatible torch version"))
PTH

if [ "$installed" = 1 ]; then
  say "checking the install (import torch, torchtune, tune_losses; ~10-40 s)"
  "$VENV/bin/python" -c "import torch, torchtune, tune_losses
print(f'setup:   torch {torch.__version__}, torchtune {torchtune.__version__}, tune_losses from {tune_losses.__path__[0]}')" \
    || { say "install check failed" >&2; exit 1; }
else
  # A repeat call checks the installed versions and where tune_losses resolves, without importing
  # torch (whose import alone takes 10 s and more on a busy machine).
  say "checking the install (versions and paths, no imports)"
  "$VENV/bin/python" - <<'PY' || { say "install check failed: rerun after deleting .venv" >&2; exit 1; }
import importlib.metadata as md, importlib.util, os
spec = importlib.util.find_spec("tune_losses")
assert spec and os.path.samefile(os.path.dirname(spec.origin), "tune_losses"), f"tune_losses resolves to {spec and spec.origin}"
print(f"setup:   torch {md.version('torch')}, torchtune {md.version('torchtune')}, tune_losses from {os.getcwd()}")
PY
fi
took
say "ready in $(( $(date +%s) - T_ALL )) s; activate with: source $act"
