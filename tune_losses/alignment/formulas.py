"""The alignment losses' math on sequence and token log-probabilities, written once.

Everything here works on log-probabilities already gathered at the labels, wherever they came from:
the fused path (:func:`tune_losses.linear_log_probs`), full logits, or a caller's own numbers. The
linear losses (:mod:`tune_losses.alignment.preference`, :mod:`tune_losses.alignment.policy`), the
torchtune drop-ins (:mod:`tune_losses.alignment.torchtune_compat`) and the modules all call these.

Shapes: a batch of pairs is ``[2B, S]``, the B chosen rows first (torchtune's ``padded_collate_dpo``);
sequence quantities are ``[2B]`` or ``[B]``. The policy (GRPO family) formulas live in
:mod:`tune_losses.alignment.policy_formulas` and are re-exported here for older imports.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

PREFERENCE_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "simpo",
    "orpo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
"""``sigmoid`` (DPO), ``ipo``, ``hinge`` (RSO / SLiC), ``simpo`` and ``orpo`` (both reference-free), and
TRL's other ``DPOConfig.loss_type`` values (formulas in :func:`preference_pair_losses`)."""

LABEL_SMOOTHING_TYPES = ("sigmoid", "simpo", "robust", "exo_pair")
"""Loss types that read ``label_smoothing`` (the rest refuse a nonzero one)."""

REFERENCE_FREE = ("simpo", "orpo")
MEAN_LOG_PROB_TYPES = ("ipo", "simpo", "orpo")
"""Loss types whose sequence log-probability defaults to the mean over tokens (the others: the sum)."""


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


def counted_pairs(n_chosen: torch.Tensor, n_rejected: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the pairs that count, those whose chosen and rejected rows both have a valid token
    (``n_chosen``, ``n_rejected``: ``[B]`` valid-token counts)."""
    return (n_chosen > 0) & (n_rejected > 0)


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
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Per-pair preference loss ``[B]`` from sequence log-probabilities ``[B]`` (policy and reference).

    With the log-ratios ``c = pc - rc``, ``r = pr - rr``, ``d = c - r``, ``eps = label_smoothing`` and
    ``s`` the logistic sigmoid (TRL 1.16's ``DPOTrainer`` definitions where TRL has the type):

    * ``sigmoid``: ``-(1 - eps) log s(beta d) - eps log s(-beta d)`` (eps > 0: conservative DPO)
    * ``ipo``: ``(d - 1 / (2 beta))^2``
    * ``hinge``: ``max(0, 1 - beta d)``
    * ``simpo``: ``z = beta (pc - pr) - gamma``; ``-(1 - eps) log s(z) - eps log s(-z)`` (no reference)
    * ``orpo``: ``-beta log s(L)``, ``L = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr))`` (no reference;
      pc, pr are mean log-probabilities, so negative; the chosen NLL is added by the caller)
    * ``robust``: ``(-(1 - eps) log s(beta d) + eps log s(-beta d)) / (1 - 2 eps)``, eps in [0, 0.5)
    * ``exo_pair``: ``KL([s(beta d), s(-beta d)] || [1 - eps, eps])``, eps in (0, 1)
    * ``nca_pair``: ``-log s(beta c) - log s(-beta c) / 2 - log s(-beta r) / 2``
    * ``bco_pair``: ``-log s(beta c) - log s(-beta r)`` (TRL 1.16 and Liger: no running-mean shift)
    * ``sppo_hard``: ``(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2``
    * ``apo_zero``: ``1 - s(beta c) + s(beta r)``
    * ``apo_down``: ``s(beta c) + 1 - s(beta d)``
    * ``discopop``: ``m = s(beta d / tau)``; ``(1 - m) (-log s(beta d)) + m exp(-beta d)``
    """
    if loss_type == "orpo":
        log_odds = (policy_chosen - policy_rejected) - (_log1m_exp(policy_chosen) - _log1m_exp(policy_rejected))
        return -beta * F.logsigmoid(log_odds)
    if loss_type == "simpo":
        z = beta * (policy_chosen - policy_rejected) - gamma
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    c = policy_chosen - ref_chosen
    r = policy_rejected - ref_rejected
    d = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)).square()
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        # KL of the policy's two-way softmax over (chosen, rejected) from the smoothed labels.
        log_q_win, log_q_lose = F.logsigmoid(beta * d), F.logsigmoid(-beta * d)
        return log_q_win.exp() * (log_q_win - math.log1p(-eps)) + log_q_lose.exp() * (log_q_lose - math.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta).square() + (r + 0.5 / beta).square()
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * d)
    if loss_type == "discopop":
        z = beta * d
        # m exp(-z) as exp(-z + log m): finite where exp(-z) alone overflows and m underflows to 0.
        return -torch.sigmoid(-z / discopop_tau) * F.logsigmoid(z) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
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

    ``options``: ``loss_type``, ``beta``, ``gamma``, ``label_smoothing``, ``discopop_tau``. An uncounted pair's loss and
    its gradient are exactly 0 (never NaN), whatever its sequence log-probabilities are.
    """
    # ORPO's log(1 - e^p) is -inf at p = 0 (an empty sequence): feed uncounted pairs a harmless value so
    # neither their loss nor its gradient can become NaN before the mask drops them.
    safe_c = torch.where(counted, chosen, torch.full_like(chosen, -1.0))
    safe_r = torch.where(counted, rejected, torch.full_like(rejected, -1.0))
    per_pair = preference_pair_losses(safe_c, safe_r, ref_chosen, ref_rejected, **options)
    return torch.where(counted, per_pair, torch.zeros_like(per_pair))


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
"""Unpaired (KTO-style) losses: TRL 1.16 ``KTOConfig.loss_type`` values."""


def unpaired_preference_losses(
    logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, opts
) -> torch.Tensor:
    """Per-sequence unpaired loss ``[B]`` from log-ratios ``r = policy - reference`` ``[B]``, labels
    ``desirable`` ``[B]`` bool and the KL reference point ``kl`` (0-dim, no gradient); TRL 1.16's
    ``KTOTrainer``, with ``opts`` a :class:`~tune_losses.alignment.options.KTOOptions` (``beta``,
    weights ``w_d`` / ``w_u``):

    * ``kto``: ``w_d (1 - s(beta (r - kl)))`` for a desirable sequence, ``w_u (1 - s(beta (kl - r)))``
      for an undesirable one
    * ``apo_zero_unpaired``: ``w_d (1 - s(beta r))``, ``w_u s(beta r)`` (no KL term)
    """
    beta = opts.beta
    if opts.loss_type == "kto":
        margin = torch.where(desirable, logratios - kl, kl - logratios)
        per = 1 - torch.sigmoid(beta * margin)
    else:  # apo_zero_unpaired (KTOOptions admits no other)
        z = torch.sigmoid(beta * logratios)
        per = torch.where(desirable, 1 - z, z)
    weights = torch.tensor([opts.undesirable_weight, opts.desirable_weight], dtype=per.dtype, device=per.device)
    return per * weights[desirable.long()]


# Re-exported: the policy formulas moved to their own file; old imports keep working.
from tune_losses.alignment.policy_formulas import (  # noqa: E402, F401
    POLICY_LOSS_TYPES,
    aggregate_policy_loss,
    masked_mean,
)
