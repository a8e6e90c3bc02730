"""Detached per-token statistics for training logs (TRL's ``entropy`` and ``mean_token_accuracy``),
on the engine's one chunk loop: a values-only term (:class:`tune_losses.terms.TokenStatsTerm`), no
``[tokens, V]`` tensor, no autograd graph."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tune_losses.fused.engine import LossPlan, chunk_pass
from tune_losses.fused.placement import materialize_weight
from tune_losses.fused.valid_rows import select_valid_rows
from tune_losses.options import IGNORE_INDEX
from tune_losses.terms import TokenStatsTerm


class TokenStats(NamedTuple):
    """Sums over valid tokens (0-dim tensors): ``entropy`` (nats, fp32), ``correct`` (argmax == label), ``count``."""

    entropy: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


@torch.no_grad()
def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """Entropy of ``softmax(logits)`` and top-1 hits at the valid tokens of ``logits = hidden @ weight.T + bias``
    (softcapped when ``softcap``).

    Args:
        hidden: ``[..., H]``; weight ``[V, H]`` (a DTensor is gathered); labels ``[...]``, the
            caller's ``ignore_index`` marking tokens left out.
        chunk_size: tokens per chunk (None: :func:`tune_losses.chunking.chunk_policy`).
    """
    weight = materialize_weight(weight.detach(), hidden.dtype)
    bias = None if bias is None else materialize_weight(bias.detach(), hidden.dtype)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    x = hidden.detach().reshape(-1, hidden.shape[-1])
    # Only the valid tokens' rows reach the chunk loop (one host sync, as logging can afford).
    x, _, y, _ = select_valid_rows(x, None, flat_labels, ignore_index)
    plan = LossPlan((TokenStatsTerm(softcap),), ignore_index, chunk_size)
    outputs, *_ = chunk_pass(x, weight, bias, y, None, None, None, plan)
    entropy = outputs["entropy"].sum().to(torch.float32)
    correct = outputs["correct"].sum().round().to(torch.int64)
    return TokenStats(entropy, correct, valid.sum())
