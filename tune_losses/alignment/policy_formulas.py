"""The policy-optimization (GRPO family) math on per-token log-probabilities, written once.

Works on log-probabilities already gathered at the labels, wherever they came from (the fused path,
full logits, a caller's own numbers). Policy batches are ``[G, S]`` with advantages ``[G]``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def policy_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token clipped policy-gradient loss (GRPO family) ``[G, S]`` and its per-token diagnostics.

    ``r = exp(logp - old)``, ``l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, plus with
    ``beta > 0`` the k3 KL estimate ``beta (exp(ref - logp) - (ref - logp) - 1)``.

    Args:
        logps, old_logps: ``[G, S]`` (callers mask invalid tokens; values there must be finite).
        advantages: ``[G]``, one per sequence.
        ref_logps: ``[G, S]``, needed when ``beta > 0``.

    Returns:
        ``(loss [G, S], {"low_clipped", "high_clipped": bool [G, S], "kl": [G, S] or absent})``.
        A token is low-clipped when ``r < 1 - eps_low`` with ``A < 0`` and high-clipped when
        ``r > 1 + eps_high`` with ``A > 0`` (where the clip takes the gradient away; TRL's definition).
    """
    adv = advantages.unsqueeze(-1).to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    info = {
        "low_clipped": (ratio < 1 - epsilon_low) & (adv < 0),
        "high_clipped": (ratio > 1 + epsilon_high) & (adv > 0),
    }
    if beta > 0:
        delta = ref_logps.to(logps.dtype) - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        info["kl"] = kl
    return loss, info


def aggregate_policy_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """Reduce per-token losses ``[G, S]`` over the valid tokens ``mask`` to a 0-dim loss.

    * ``grpo``: mean over the G sequences of (sum over its tokens / its token count);
    * ``bnpo``: sum / number of valid tokens;
    * ``dr_grpo``: sum / (G * max_completion_length), the length defaulting to S;
    * ``dapo``: sum / ``num_items_in_batch`` (default: the valid tokens here; pass the whole step's
      count for exact gradient accumulation).

    Counts are clamped to at least 1: no valid token gives 0, never NaN.
    """
    masked = torch.where(mask, token_losses, torch.zeros_like(token_losses))
    if loss_type == "grpo":
        per_seq = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1).to(masked.dtype)
        return per_seq.mean() if per_seq.numel() else masked.sum()
    total = masked.sum()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1).to(total.dtype)
    if loss_type == "dr_grpo":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        return total / max(mask.shape[0] * length, 1)
    if loss_type == "dapo":
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        n = torch.as_tensor(n, device=total.device)
        return total / n.clamp(min=1).to(total.dtype)
    raise ValueError(f"loss_type: expected one of {POLICY_LOSS_TYPES}, got {loss_type!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty), detached, in ``dtype``."""
    x = x.detach().to(dtype)
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)
