"""Detached per-token statistics for training logs (TRL's ``entropy`` and ``mean_token_accuracy``),
one chunk of logits at a time: no ``[tokens, V]`` tensor, no autograd graph."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tune_losses.chunking import chunk_policy
from tune_losses.fused.placement import materialize_weight


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
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """Entropy of ``softmax(logits)`` and top-1 hits at the valid tokens of ``logits = hidden @ weight.T + bias``
    (softcapped when ``softcap``).

    Args:
        hidden: ``[..., H]``; weight ``[V, H]`` (a DTensor is gathered); labels ``[...]``.
    """
    weight = materialize_weight(weight.detach(), hidden.dtype)
    bias = None if bias is None else materialize_weight(bias.detach(), hidden.dtype)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    x = hidden.detach().reshape(-1, hidden.shape[-1])[valid]
    y = flat_labels[valid]
    entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    size = chunk_size or chunk_policy(max(x.shape[0], 1), weight.shape[0], hidden.device)
    for start in range(0, x.shape[0], size):
        xc, yc = x[start : start + size], y[start : start + size]
        z = torch.nn.functional.linear(xc, weight, bias).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        lse = torch.logsumexp(z, dim=-1)
        entropy += (lse - (torch.softmax(z, dim=-1) * z).sum(-1)).sum()
        correct += (z.argmax(-1) == yc).sum()
    return TokenStats(entropy, correct, valid.sum())
