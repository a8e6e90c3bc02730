"""The alignment losses' math on sequence and token log-probabilities, written once.

Everything here works on log-probabilities already gathered at the labels, wherever they came from:
the fused path (:func:`tune_losses.linear_log_probs`), full logits, or a caller's own numbers. The
linear losses (:mod:`tune_losses.alignment.preference`, :mod:`tune_losses.alignment.policy`), the
torchtune drop-ins (:mod:`tune_losses.alignment.torchtune_compat`) and the modules all call these.

Shapes: a batch of pairs is ``[2B, S]``, the B chosen rows first (torchtune's ``padded_collate_dpo``);
sequence quantities are ``[2B]`` or ``[B]``; policy batches are ``[G, S]`` with advantages ``[G]``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

PREFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
"""``sigmoid`` (DPO), ``ipo``, ``hinge`` (RSO / SLiC), ``simpo`` and ``orpo`` (both reference-free)."""

REFERENCE_FREE = ("simpo", "orpo")
MEAN_LOG_PROB_TYPES = ("ipo", "simpo", "orpo")
"""Loss types whose sequence log-probability defaults to the mean over tokens (the others: the sum)."""

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def sequence_log_probs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Per-sequence log-probability: sum (or mean) of the valid tokens' log-probabilities.

    Args:
        token_logps: ``[R, S]`` per-token log-probabilities (any value at masked tokens).
        mask: ``[R, S]`` bool, True at valid tokens.
        average: mean over valid tokens instead of the sum (0 for a sequence with none).

    Returns:
        ``[R]`` in ``token_logps``' dtype.
    """
    # where, not multiply: a value at an ignored token (even inf) must contribute nothing.
    total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    if not average:
        return total
    return total / mask.sum(dim=-1).clamp(min=1).to(total.dtype)


def split_pairs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...]`` -> (chosen ``[B, ...]``, rejected ``[B, ...]``): torchtune's DPO layout."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair preference loss ``[B]`` from sequence log-probabilities ``[B]`` (policy and reference).

    With ``d = (pc - pr) - (rc - rr)`` and ``eps = label_smoothing``:

    * ``sigmoid``: ``-(1 - eps) log s(beta d) - eps log s(-beta d)``
    * ``ipo``: ``(d - 1 / (2 beta))^2``
    * ``hinge``: ``max(0, 1 - beta d)``
    * ``simpo``: ``z = beta (pc - pr) - gamma``; ``-(1 - eps) log s(z) - eps log s(-z)`` (no reference)
    * ``orpo``: ``-beta log s(L)``, ``L = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr))`` (no reference;
      pc, pr are mean log-probabilities, so negative; the chosen NLL is added by the caller)
    """
    if loss_type == "orpo":
        log_odds = (policy_chosen - policy_rejected) - (_log1m_exp(policy_chosen) - _log1m_exp(policy_rejected))
        return -beta * F.logsigmoid(log_odds)
    if loss_type == "simpo":
        z = beta * (policy_chosen - policy_rejected) - gamma
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    d = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)).square()
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    raise ValueError(f"loss_type: expected one of {PREFERENCE_LOSS_TYPES}, got {loss_type!r}")


def counted_pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    counted: torch.Tensor,
    **options,
) -> torch.Tensor:
    """:func:`preference_pair_losses` ``[B]`` at the pairs that count (``counted`` ``[B]`` bool), 0 elsewhere.

    ``options``: ``loss_type``, ``beta``, ``gamma``, ``label_smoothing``. An uncounted pair's loss and
    its gradient are exactly 0 (never NaN), whatever its sequence log-probabilities are.
    """
    # ORPO's log(1 - e^p) is -inf at p = 0 (an empty sequence): feed uncounted pairs a harmless value so
    # neither their loss nor its gradient can become NaN before the mask drops them.
    safe_c = torch.where(counted, chosen, torch.full_like(chosen, -1.0))
    safe_r = torch.where(counted, rejected, torch.full_like(rejected, -1.0))
    per_pair = preference_pair_losses(safe_c, safe_r, ref_chosen, ref_rejected, **options)
    return torch.where(counted, per_pair, torch.zeros_like(per_pair))


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
