"""Tensor checks shared by every public entry point.

Each error names the argument, what was expected and what came. A wrong type or dtype raises
:class:`~tune_losses.options.ArgumentTypeError` (a ``TypeError`` that is also a ``ValueError``), a
wrong shape or value ``ValueError``. Only :func:`check_label_range` reads tensor values (one host
sync); callers run it once per call and only when ``validate=True``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tune_losses.options import ArgumentTypeError

LABEL_DTYPES = (torch.int64, torch.int32)
"""Label dtypes accepted (the per-chunk gather index is made int64, as torch 2.7 needs)."""


def _describe(value) -> str:
    """``list of 2 items`` / ``ndarray`` / ``int``: what came, for an error message."""
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where torch has no distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def check_tensor(name: str, t, what: str = "") -> torch.Tensor:
    """``t`` must be a ``torch.Tensor`` (a DTensor is one); returns it. ``what`` describes the expected shape."""
    if not isinstance(t, torch.Tensor):
        pieces = isinstance(t, (list, tuple)) and len(t) > 0 and all(isinstance(x, torch.Tensor) for x in t)
        hint = " (one tensor, not a list of pieces: torch.cat / torch.stack them)" if pieces else ""
        what = f" {what}" if what else ""
        raise ArgumentTypeError(f"{name}: expected a torch.Tensor{what}, got {_describe(t)}{hint}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if not t.is_floating_point():
        raise ArgumentTypeError(f"{name}: expected a floating-point tensor (fp32/bf16/fp16/fp64), got dtype {t.dtype}")


def check_labels_dtype(labels: torch.Tensor, name: str = "labels") -> None:
    """Labels must be a tensor of dtype int64 or int32 (other integer dtypes are not cast silently)."""
    check_tensor(name, labels, "of integer class ids")
    if labels.dtype not in LABEL_DTYPES:
        raise ArgumentTypeError(
            f"{name}: expected dtype torch.int64 or torch.int32 (class ids), got dtype {labels.dtype}"
            + ("" if labels.is_floating_point() or labels.dtype == torch.bool else "; cast with labels.long()")
        )


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if any label other than ``ignore_index`` lies outside ``[0, vocab_size)``.

    One host sync; skipped by callers when their ``validate`` option is off. Inside a
    ``torch.compile`` trace (a user's compiled model + loss) the check runs on the device instead
    (``torch._assert_async``: no host sync, no graph break; a bad label fails the step with the
    message below, on CUDA as a device-side assertion).
    """
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if torch.compiler.is_compiling():
        torch._assert_async(
            ~bad.any(), f"labels: expected class ids in [0, {vocab_size}) or ignore_index={ignore_index}"
        )
        return
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels: expected class ids in [0, {vocab_size}) or ignore_index={ignore_index}, "
            f"got {int(bad.sum())} out of range (e.g. {first})"
        )


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (as {name_a}), got {tuple(b.shape)}")


def check_fused_inputs(labels: torch.Tensor, *, local_shard: bool = False, **tensors: Optional[torch.Tensor]) -> None:
    """Types and basic shapes of a fused loss's tensors, before any dispatch touches them.

    Args:
        labels: the class ids (int64 / int32 tensor).
        local_shard: the weights are this rank's vocabulary shard (``process_group=``): their row
            count is checked over the group later, so that every rank raises alike.
        tensors: by argument name: ``*hidden`` ``[..., H]`` (at least 1-D), ``*weight`` ``[V, H]``
            (V >= 1, H >= 1, unless ``local_shard``), ``*bias`` ``[V]`` or None.
    """
    for name, t in tensors.items():
        if name.endswith("bias") and t is None:
            continue
        if name.endswith("weight"):
            t = check_tensor(name, t, "[V, H]")
            if t.dim() != 2:
                raise ValueError(f"{name}: expected shape [V, H], got {tuple(t.shape)}")
            if t.shape[1] < 1 or (t.shape[0] < 1 and not local_shard):
                raise ValueError(f"{name}: expected shape [V, H] with V >= 1 and H >= 1, got {tuple(t.shape)}")
        elif name.endswith("hidden"):
            t = check_tensor(name, t, "[..., H]")
            if t.dim() < 1:
                raise ValueError(f"{name}: expected shape [..., H] (at least 1-D), got a 0-dim tensor")
        else:
            check_tensor(name, t)
    check_labels_dtype(labels)


def check_chunk_list(name: str, chunks: Sequence[torch.Tensor], labels: torch.Tensor) -> int:
    """Check a list of logits chunks ``[B, S_i, V]`` against labels ``[B, S]``; return V (>= 1)."""
    if len(chunks) == 0:
        raise ValueError(f"{name}: expected a non-empty list of logits chunks [B, S_i, V], got an empty list")
    vocab: Optional[int] = None
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
            if vocab < 1:
                raise ValueError(
                    f"{name}[{i}]: expected a vocab size V >= 1 (last dimension), got shape {tuple(c.shape)}"
                )
        elif c.shape[-1] != vocab:
            raise ValueError(f"{name}[{i}]: expected vocab size {vocab} like {name}[0], got shape {tuple(c.shape)}")
    assert vocab is not None  # set by the first chunk
    return vocab


def check_paired_chunks(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], *, wider_teacher: bool = False
) -> None:
    """Student and teacher chunks pair up: as many, of the same ``[B, S_i]``, and the same vocabulary
    size, or (``wider_teacher``) a teacher vocabulary at least the student's."""
    if len(student) != len(teacher):
        raise ValueError(f"teacher_logits: expected {len(student)} chunks like student_logits, got {len(teacher)}")
    for i, (s, t) in enumerate(zip(student, teacher)):
        same_tokens = s.shape[:-1] == t.shape[:-1]
        if same_tokens and wider_teacher and t.shape[-1] > s.shape[-1]:
            continue
        if s.shape != t.shape:
            wider = " or a wider vocabulary (padding rows)" if wider_teacher else ""
            raise ValueError(
                f"teacher_logits[{i}]: expected shape {tuple(s.shape)} (as student_logits[{i}]){wider}, "
                f"got {tuple(t.shape)}"
                + (
                    ". A teacher vocabulary smaller than the student's cannot be aligned: pad the teacher's "
                    "output projection to the student's size"
                    if same_tokens and t.shape[-1] < s.shape[-1]
                    else ""
                )
            )
