"""The one token splitter and the one chunk-size policy.

``chunk_size`` means tokens per chunk everywhere in this package (the fused losses, the
preference losses' chunks of whole pairs, the token statistics); :func:`chunk_policy` picks it
when the caller does not.

Every producer of logit chunks in this package (model heads, recipes, the fused losses' own
chunk loop) splits tokens with :func:`split_tokens`, which has ``torch.tensor_split`` semantics:
``n`` chunks whose sizes differ by at most one, the larger ones first, for any length.

The losses never re-split labels by a chunk *count*: they split labels by the sizes of the chunks
they are actually handed (:func:`split_like`). So chunks from torchtune 0.6.1's decoder (which
uses ``.chunk`` and may return fewer, uneven chunks) pair with the right labels too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from tune_losses.options import IGNORE_INDEX, ArgumentTypeError, check_int_option
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


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[..., 1:]`` with an ignored last position, same shape
    (``[B, S] -> [B, S]``): position ``t`` is scored against token ``t + 1``."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def token_chunk_bounds(num_tokens: int, chunk_size: int) -> List[tuple]:
    """``(start, end)`` bounds of consecutive chunks of at most ``chunk_size`` flat tokens.

    Used by the fused losses, which chunk flattened ``[N, H]`` hidden states by a size rather
    than a count; equivalent to :func:`split_tokens` with ``ceil(N / chunk_size)`` chunks when
    ``chunk_size`` divides ``N``.
    """
    check_int_option("num_tokens", num_tokens, 0)
    check_int_option("chunk_size", chunk_size, 1)
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


# The rule and the measurements behind it: benchmarks/results/chunk_policy.md. A power of two near
# _TARGET_CHUNK_ELEMENTS / (V * logit sets) tokens, at least _MIN_CHUNK_TOKENS per logit set, and on
# CPU at least H / 2 once the fp32 dW [V, H] outgrows the caches.
_TARGET_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}
_MIN_CHUNK_TOKENS = 128
_CACHED_DW_BYTES = 64 << 20
# A chunk of whole pairs is widened to the longest pair, up to this many policy chunks.
_MAX_PAIR_CHUNK_FACTOR = 4


def chunk_policy(
    num_tokens: int,
    vocab_size: int,
    device: torch.device,
    num_logit_sets: int = 1,
    hidden_size: Optional[int] = None,
) -> int:
    """Tokens per chunk: a power of two near ``target_elements / (V * num_logit_sets)``, within
    [``_MIN_CHUNK_TOKENS * num_logit_sets``, N]; on CPU with an fp32 dW ``[V, hidden_size]`` larger
    than the caches, at least ``hidden_size / 2``. On CUDA the target is not divided by the number
    of logit sets (measured there: benchmarks/results/chunk_policy.md).

    ``num_logit_sets`` is 2 for distillation (student and teacher chunks alive together).
    """
    target = _TARGET_CHUNK_ELEMENTS.get(device.type, _TARGET_CHUNK_ELEMENTS["cuda"])
    sets = num_logit_sets if device.type == "cpu" else 1  # measured per device
    n = max(target // max(vocab_size * sets, 1), 1)
    n = max(1 << (n.bit_length() - 1), _MIN_CHUNK_TOKENS * num_logit_sets)
    if hidden_size and device.type == "cpu" and vocab_size * hidden_size * 4 > _CACHED_DW_BYTES:
        n = max(n, 1 << (max(hidden_size // 2, 1).bit_length() - 1))
    return max(1, min(n, num_tokens))


def max_pair_chunk(policy_tokens: int) -> int:
    """The most tokens a chunk of whole pairs may hold when the policy chose ``policy_tokens``: a
    pair is never split, so its chunk widens to the pair, up to this bound."""
    return policy_tokens * _MAX_PAIR_CHUNK_FACTOR
