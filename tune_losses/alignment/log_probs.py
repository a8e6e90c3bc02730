"""The one place the alignment losses reach the engine: per-token log-probabilities of the labels.

Every fused alignment loss is a small formula over :func:`tune_losses.linear_log_probs` (the engine's
log-probability term in its one chunk loop); nothing here loops over chunks or makes logits.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from tune_losses.fused.functional import linear_log_probs
from tune_losses.validation import check_float


def _check_hidden(name: str, hidden: torch.Tensor, labels: torch.Tensor) -> None:
    check_float(name, hidden)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{name}: expected shape [B, S, H] with [B, S] = labels' {tuple(labels.shape)}, got {tuple(hidden.shape)}"
        )


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    name: str = "hidden",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``[B, S]`` log-probabilities of ``labels`` under ``hidden @ weight.T + bias`` at ``temperature``
    (0 at ignored tokens), and with ``return_entropy`` the per-token entropy ``[B, S]``.

    hidden ``[B, S, H]``, weight ``[V, H]``, labels ``[B, S]``. Differentiable to hidden, weight and bias.
    """
    _check_hidden(name, hidden, labels)
    return linear_log_probs(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
