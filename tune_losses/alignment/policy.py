"""Policy-optimization losses (the GRPO family) on the fused log-probability term.

:func:`linear_policy_loss` takes a group of completions' final hidden states ``[G, S, H]``, the output
weight, labels ``[G, S]`` (completion tokens; ``ignore_index`` at prompt and padding) and one advantage
per completion ``[G]``. Per-token log-probabilities (and entropies) come from
:func:`tune_losses.linear_log_probs`; the clipped surrogate, the k3 KL penalty and the aggregation
(:mod:`tune_losses.alignment.formulas`) run on ``[G, S]`` values, and autograd carries each token's
weight back into the engine's chunk loop.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

from tune_losses.alignment.log_probs import token_log_probs
from tune_losses.alignment.policy_formulas import (
    POLICY_LOSS_TYPES,
    aggregate_policy_loss,
    masked_mean,
    policy_token_losses,
)
from tune_losses.alignment.preference import check_count
from tune_losses.options import check_choice, check_float_option, check_int_option


class PolicyOutput(NamedTuple):
    """Result of :func:`linear_policy_loss`: ``loss`` (0-dim, differentiable) and detached 0-dim
    ``metrics``: ``clip_ratio/low``, ``clip_ratio/high`` (fractions of valid tokens whose ratio the
    clip cut off), ``kl`` (mean k3 KL, when ``beta > 0``), ``entropy`` (mean policy entropy)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def check_policy_options(loss_type, beta, epsilon_low, epsilon_high, temperature, max_completion_length) -> None:
    """Raise a ValueError / TypeError naming the first bad option (finite numbers only)."""
    check_choice("loss_type", loss_type, POLICY_LOSS_TYPES)
    check_float_option("beta", beta, 0.0)
    check_float_option("epsilon_low", epsilon_low, 0.0, 1.0)
    if epsilon_low == 1.0:
        raise ValueError(f"epsilon_low: expected a number in [0, 1), got {epsilon_low!r}")
    check_float_option("epsilon_high", epsilon_high, 0.0, allow_none=True)
    check_float_option("temperature", temperature, 0.0, low_open=True)
    check_int_option("max_completion_length", max_completion_length, 1, allow_none=True)


def _check_like(name: str, t, shape, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(shape):
        got = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a floating-point tensor of shape {tuple(shape)}, got {got}")
    return t.detach().to(device)


def policy_loss_from_log_probs(
    logps: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    loss_type: str = "grpo",
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
) -> PolicyOutput:
    """The policy loss from per-token log-probabilities ``logps [G, S]`` (any source; differentiable).

    ``entropy [G, S]`` (optional) only feeds the ``entropy`` metric. Other arguments: as
    :func:`linear_policy_loss`.
    """
    check_policy_options(loss_type, beta, epsilon_low, epsilon_high, 1.0, max_completion_length)
    check_count("num_items_in_batch", num_items_in_batch)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            f"labels: expected a [G, S] tensor, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    shape = tuple(labels.shape)
    advantages = _check_like("advantages", advantages, shape[:1], logps.device)
    if beta > 0 and ref_logps is None:
        raise ValueError(
            f"ref_logps: expected the reference's per-token log-probs [G, S] with beta={beta} > 0, got None"
        )
    mask = labels != ignore_index
    zeros = torch.zeros_like(logps)
    # Old / reference values at ignored tokens are whatever the caller had there (often -inf or
    # garbage): replace them by the policy's own so exp() stays finite where the mask drops the token.
    if old_logps is None:
        old = logps.detach()
    else:
        old = torch.where(
            mask, _check_like("old_logps", old_logps, shape, logps.device).to(logps.dtype), logps.detach()
        )
    ref = None
    if beta > 0:
        ref = torch.where(
            mask, _check_like("ref_logps", ref_logps, shape, logps.device).to(logps.dtype), logps.detach()
        )
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    token_loss, info = policy_token_losses(
        torch.where(mask, logps, zeros),
        old,
        advantages,
        epsilon_low=epsilon_low,
        epsilon_high=eps_high,
        beta=beta,
        ref_logps=ref,
    )
    loss = aggregate_policy_loss(
        token_loss,
        mask,
        loss_type=loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    metrics = {
        "clip_ratio/low": masked_mean(info["low_clipped"], mask, loss.dtype),
        "clip_ratio/high": masked_mean(info["high_clipped"], mask, loss.dtype),
    }
    if "kl" in info:
        metrics["kl"] = masked_mean(info["kl"], mask, loss.dtype)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, mask, loss.dtype)
    return PolicyOutput(loss, metrics)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    loss_type: str = "grpo",
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    temperature: float = 1.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    return_entropy: bool = True,
) -> PolicyOutput:
    """Fused clipped policy-gradient loss (GRPO, BNPO, Dr. GRPO, DAPO) with an optional k3 KL penalty.

    Args:
        hidden: ``[G, S, H]`` the policy's final hidden states for G completions.
        weight: ``[V, H]`` output projection; bias ``[V]`` or None.
        labels: ``[G, S]`` completion tokens aligned with ``hidden``; ``ignore_index`` elsewhere.
        advantages: ``[G]`` one advantage per completion.
        loss_type: the aggregation over valid tokens m: ``grpo`` mean over sequences of per-sequence
            means; ``bnpo`` sum / sum m; ``dr_grpo`` sum / (G * max_completion_length (default S));
            ``dapo`` sum / ``num_items_in_batch`` (default sum m; pass the step's global count for exact
            gradient accumulation).
        old_logps: ``[G, S]`` log-probs of the policy that sampled (default: the current ones,
            detached: ratio 1, the on-policy case).
        ref_logps: ``[G, S]`` the reference's log-probs; needed when ``beta > 0``.
        beta: weight of the k3 KL estimate ``exp(ref - logp) - (ref - logp) - 1``.
        epsilon_low, epsilon_high: the clip range ``[1 - eps_low, 1 + eps_high]`` (high defaults to low).
        temperature: logits are divided by it before the log-softmax (as at sampling).
        chunk_size: tokens per chunk of the engine's loop (None: its default).
        return_entropy: also compute the per-token entropy for the ``entropy`` metric (one more
            reduction per chunk; False skips it).

    Returns:
        :class:`PolicyOutput` ``(loss, metrics)``.
    """
    check_policy_options(loss_type, beta, epsilon_low, epsilon_high, temperature, max_completion_length)
    check_count("num_items_in_batch", num_items_in_batch)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            f"labels: expected a [G, S] tensor, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    out = token_log_probs(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
    logps, entropy = out if return_entropy else (out, None)
    return policy_loss_from_log_probs(
        logps,
        labels,
        advantages,
        entropy=None if entropy is None else entropy.detach(),
        loss_type=loss_type,
        old_logps=old_logps,
        ref_logps=ref_logps,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
    )
