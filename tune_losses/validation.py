"""Input checks shared by every public entry point.

Each error names the argument, what was expected and what came. Only :func:`check_label_range`
reads tensor values (one host sync); callers run it once per call and only when
``validate=True``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor (fp32/bf16/fp16), got dtype {t.dtype}")


def check_labels_dtype(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels: expected a torch.Tensor of integer class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor (int64/int32), got dtype {labels.dtype}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if any label other than ``ignore_index`` lies outside ``[0, vocab_size)``.

    One host sync; skipped by callers when their ``validate`` option is off.
    """
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels: expected class ids in [0, {vocab_size}) or ignore_index={ignore_index}, "
            f"got {int(bad.sum())} out of range (e.g. {first})"
        )


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (as {name_a}), got {tuple(b.shape)}")


def check_chunk_list(name: str, chunks: Sequence[torch.Tensor], labels: torch.Tensor) -> int:
    """Check a list of logits chunks ``[B, S_i, V]`` against labels ``[B, S]``; return V."""
    if len(chunks) == 0:
        raise ValueError(f"{name}: expected a non-empty list of logits chunks [B, S_i, V], got an empty list")
    vocab = None
    for i, c in enumerate(chunks):
        check_float(f"{name}[{i}]", c)
        if c.dim() != 3:
            raise ValueError(f"{name}[{i}]: expected a 3-D chunk [B, S_i, V], got shape {tuple(c.shape)}")
        if c.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name}[{i}]: expected batch size {labels.shape[0]} (labels {tuple(labels.shape)}), "
                f"got shape {tuple(c.shape)}"
            )
        if vocab is None:
            vocab = c.shape[-1]
        elif c.shape[-1] != vocab:
            raise ValueError(f"{name}[{i}]: expected vocab size {vocab} like {name}[0], got shape {tuple(c.shape)}")
    return int(vocab)


def check_paired_chunks(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
    if len(student) != len(teacher):
        raise ValueError(
            f"teacher_logits: expected {len(student)} chunks like student_logits, got {len(teacher)}"
        )
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(
                f"teacher_logits[{i}]: expected shape {tuple(s.shape)} (as student_logits[{i}]), got {tuple(t.shape)}"
            )
