"""Cross-entropy over one chunk of logits as a Triton kernel, in the logits' own dtype.

One program per token row: a first sweep over the vocabulary in blocks keeps the running maximum
and sum of exponentials (online softmax), the label's logit and, with label smoothing, the sum of
logits, all in fp32 registers; the token's loss and logsumexp are written out; a second sweep
writes the gradient ``w (softmax (1 + 2 c lse) - (1 - eps) onehot - eps / V)`` (times the
softcap's ``1 - tanh^2``) over the logits, in their dtype. For bf16 logits no fp32 ``[n, V]``
buffer exists: the gradient is rounded to bf16 once, as eager autograd's logit gradient is, and
goes straight into the dX / dW matmuls.

Distillation (two logit sets, every divergence, with or without this cross-entropy) and the
log-probabilities are :mod:`tune_losses.kernels.triton_terms`'s kernels.

Same contract as :func:`tune_losses.divergences.ce_chunk` (values 0 at ignored tokens, a NaN or
+inf logit at a counted token gives a NaN loss, ``-inf`` logits are masked entries) on one process.
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Triton is
imported on first use: importing this module needs torch only.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Tuple

import torch

from tune_losses.options import CEOptions

_MAX_BLOCK = 4096


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` works here."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no Triton path
        return False
    return True


def triton_wanted(device: torch.device) -> bool:
    """The Triton path's switch: ``TUNE_LOSSES_TRITON`` ``0`` turns it off, ``1`` turns it on
    wherever Triton runs (CPU tensors need ``TRITON_INTERPRET=1``), ``auto`` (default) on CUDA."""
    mode = os.environ.get("TUNE_LOSSES_TRITON", "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    if device.type == "cuda":
        return triton_importable()
    if device.type == "cpu" and mode in ("1", "true", "on", "yes"):
        return os.environ.get("TRITON_INTERPRET") == "1" and triton_importable()
    return False


def num_warps(block: int) -> int:
    """Warps per row program: more for wider blocks (Triton's softmax heuristic). At 4 warps the
    widest kernels need 128-166 registers per thread on sm_90 (few programs per SM for a
    memory-bound loop); 8 / 16 warps bring that to about 80 / 50 (one register spilled in one
    variant: benchmarks/results/triton_registers_sm90.md; tests/triton_compile_check.py checks)."""
    return 16 if block >= 4096 else 8 if block >= 2048 else 4


def launch(source: str, name: str, rows: int, width: int, *args, **flags) -> None:
    """Runs kernel ``name`` of ``tune_losses.kernels.<source>`` (one program per token row) on
    ``args`` with the constexpr ``flags``, ``BLOCK=width`` and :func:`num_warps` for it."""
    # Triton decides at decoration whether a kernel is interpreted (TRITON_INTERPRET): one per setting.
    kernel = _decorated(os.environ.get("TRITON_INTERPRET", "0"), source, name)
    kernel[(rows,)](*args, **flags, BLOCK=width, num_warps=num_warps(width))


@functools.cache
def _decorated(interpret: str, source: str, name: str):
    import triton

    return triton.jit(getattr(importlib.import_module(f"tune_losses.kernels.{source}"), name))


def check_rows(z: torch.Tensor, name: str) -> None:
    """``z`` must be ``[n, V]`` with contiguous rows (the kernels step along a row by 1)."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(
            f"{name}: expected [n, V] with contiguous rows, got shape {tuple(z.shape)} strides {z.stride()}"
        )


def block_width(vocab: int, block: Optional[int], cap: int = _MAX_BLOCK) -> int:
    """Vocabulary columns per step: ``block``, or the next power of two of ``vocab`` up to ``cap``."""
    import triton

    return block or min(cap, triton.next_power_of_2(vocab))


def fp32_or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A per-token weight as the kernels read it (fp32, contiguous); ``dummy`` (any fp32 tensor on
    the device) stands for an absent one: its pointer is passed but never read."""
    return dummy if t is None else t.to(torch.float32).contiguous()


def ce_chunk_triton(
    z: torch.Tensor,
    labels: torch.Tensor,
    opts: CEOptions,
    weight: Optional[torch.Tensor] = None,
    block: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of one chunk; the gradient is written over ``z`` when ``weight`` is given.

    Args:
        z: ``[n, V]`` logits, bf16 / fp16 / fp32, rows contiguous (``z.stride(1) == 1``).
        labels: ``[n]`` int64; ``opts.ignore_index`` marks ignored tokens.
        weight: ``[n]`` per-token gradient weight (0 at ignored tokens), or None for values only.
        block: vocabulary columns per step (a power of two; default ``min(4096, next pow2 of V)``).

    Returns:
        ``(loss [n], lse [n])`` in fp32; ``loss`` is 0 at ignored tokens.
    """
    check_rows(z, "z")
    n, vocab = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    if n == 0:
        return loss, lse
    launch(
        "triton_ce_source",
        "ce_kernel",
        n,
        block_width(vocab, block),
        z,
        z.stride(0),
        labels.contiguous(),
        fp32_or(weight, loss),
        loss,
        lse,
        vocab,
        opts.ignore_index,
        float(opts.label_smoothing),
        float(opts.z_loss),
        float(opts.softcap or 1.0),
        HAS_GRAD=weight is not None,
        HAS_SMOOTH=opts.label_smoothing > 0,
        HAS_ZLOSS=opts.z_loss > 0,
        HAS_SOFTCAP=opts.softcap is not None,
        ROUND_BF16=z.dtype == torch.bfloat16,
    )
    return loss, lse
