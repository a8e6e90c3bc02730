"""Checkpoints that are never half-written: the torchtune-format export and the resume state.

A kill during ``torch.save`` leaves a truncated file; if that file replaced the previous good one,
both are lost. Everything is written under a temporary name first and moved into place with
``os.replace`` (atomic on one file system): the export into ``<checkpointer output>/.export.tmp/``, the
resume state as ``resume/state.pt.tmp``. Leftovers of a killed run are removed at the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

log = logging.getLogger(__name__)

RESUME_FILE = "resume/state.pt"
STAGING_DIR = ".export.tmp"
TMP_SUFFIX = ".tmp"


def remove_partial_files(*dirs: Union[str, os.PathLike]) -> List[Path]:
    """Delete ``*.tmp`` files and staging folders left directly in ``dirs`` and their ``resume/``."""
    removed = []
    for d in dirs:
        for folder in (Path(d), Path(d) / "resume"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.endswith(TMP_SUFFIX):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
    if removed:
        log.warning(f"removed partial files of an interrupted save: {[str(p) for p in removed]}")
    return removed


def export_atomically(checkpointer: Any, state_dict: Dict[str, Any], epoch: int) -> List[Path]:
    """``checkpointer.save_checkpoint(state_dict, epoch)`` with every file it writes staged first.

    torchtune's checkpointers write under their ``_output_dir``; it is pointed at a staging folder for
    the call, then each file is moved to the same relative place under the real one. Their own log
    lines (which would name the staging folder) are held back. Returns the final paths.
    """
    out = Path(checkpointer._output_dir)
    staging = out / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    checkpointer._output_dir = staging
    tt_log = logging.getLogger("torchtune.utils._logging")
    level = tt_log.level
    tt_log.setLevel(logging.WARNING)
    try:
        checkpointer.save_checkpoint(state_dict, epoch=epoch, intermediate_checkpoint=False)
    finally:
        checkpointer._output_dir = out
        tt_log.setLevel(level)
    moved = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        dst = out / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        moved.append(dst)
    shutil.rmtree(staging)
    return moved


def save_resume_state(output_dir: Union[str, os.PathLike], state: Dict[str, Any]) -> Path:
    path = Path(output_dir) / RESUME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_resume_state(output_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    path = Path(output_dir) / RESUME_FILE
    if not path.exists():
        raise ValueError(f"resume_from_checkpoint: expected a resume state at {path}, found none")
    return torch.load(path, map_location="cpu", weights_only=False)
