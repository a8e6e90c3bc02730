"""The one token splitter.

Every producer of logit chunks in this package (model heads, recipes, the fused losses' own
chunk loop) splits tokens with :func:`split_tokens`, which has ``torch.tensor_split`` semantics:
``n`` chunks whose sizes differ by at most one, the larger ones first, for any length.

The losses never re-split labels by a chunk *count*: they split labels by the sizes of the chunks
they are actually handed (:func:`split_like`). So chunks from torchtune 0.6.1's decoder (which
uses ``.chunk`` and may return fewer, uneven chunks) pair with the right labels too.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from tune_losses.options import ArgumentTypeError, check_int_option
from tune_losses.validation import check_tensor


def split_tokens(x: torch.Tensor, num_chunks: int, dim: int = 1) -> List[torch.Tensor]:
    """Split ``x`` into ``num_chunks`` views along ``dim`` (``tensor_split`` semantics).

    Args:
        x: e.g. hidden states ``[B, S, H]`` or labels ``[B, S]``.
        num_chunks: number of chunks, >= 1. More chunks than tokens give empty trailing chunks.
        dim: the token dimension.

    Returns:
        ``num_chunks`` views whose sizes along ``dim`` add up to ``x.size(dim)``.
    """
    check_tensor("x", x)
    check_int_option("num_chunks", num_chunks, 1)
    check_int_option("dim", dim)
    return list(torch.tensor_split(x, num_chunks, dim=dim))


def chunk_sizes(chunks: Sequence[torch.Tensor], dim: int = 1) -> List[int]:
    """Sizes of ``chunks`` along ``dim``."""
    return [int(c.shape[dim]) for c in chunks]


def split_like(
    x: torch.Tensor, chunks: Sequence[torch.Tensor], dim: int = 1, *, name: str = "logits"
) -> List[torch.Tensor]:
    """Split ``x`` along ``dim`` into pieces the sizes of ``chunks`` along the same ``dim``.

    Args:
        name: the caller's argument that holds ``chunks``, for the error message
            (e.g. ``"student_logits"``).

    Raises:
        ValueError: if the chunk sizes do not add up to ``x.size(dim)``.
    """
    check_tensor("x", x)
    check_int_option("dim", dim)
    if not isinstance(chunks, (list, tuple)) or not all(isinstance(c, torch.Tensor) for c in chunks):
        raise ArgumentTypeError(
            f"{name}: expected a list of chunk tensors, got {type(chunks).__name__}"
            + (f" of {[type(c).__name__ for c in chunks]}" if isinstance(chunks, (list, tuple)) else "")
        )
    sizes = chunk_sizes(chunks, dim)
    if sum(sizes) != x.shape[dim]:
        raise ValueError(
            f"{name}: expected chunk sizes along dim {dim} adding up to labels' {x.shape[dim]} "
            f"tokens, got chunk sizes {sizes} (sum {sum(sizes)})"
        )
    return list(torch.split(x, sizes, dim=dim))


def token_chunk_bounds(num_tokens: int, chunk_size: int) -> List[tuple]:
    """``(start, end)`` bounds of consecutive chunks of at most ``chunk_size`` flat tokens.

    Used by the fused losses, which chunk flattened ``[N, H]`` hidden states by a size rather
    than a count; equivalent to :func:`split_tokens` with ``ceil(N / chunk_size)`` chunks when
    ``chunk_size`` divides ``N``.
    """
    check_int_option("num_tokens", num_tokens, 0)
    check_int_option("chunk_size", chunk_size, 1)
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]
