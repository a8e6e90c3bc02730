"""Drop-ins for torchtune 0.6.1's ``torchtune.rlhf.loss.DPOLoss`` and ``RSOLoss``.

Same constructors, same ``forward(policy_chosen_logps, policy_rejected_logps,
reference_chosen_logps, reference_rejected_logps)`` on ``[B]`` sequence log-probabilities, same three
outputs ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` (per-pair losses, not reduced;
rewards detached), same values: the math is :func:`tune_losses.alignment.formulas.preference_pair_losses`.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from tune_losses.alignment.formulas import preference_pair_losses
from tune_losses.options import check_float_option


def _check_logps(**tensors: torch.Tensor) -> None:
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a floating-point tensor of sequence log-probs [B], got {got}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)} (as {first}), got {tuple(t.shape)}")


class _PairLoss(nn.Module):
    loss_type = ""

    def _coefficient(self) -> float:
        raise NotImplementedError

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All inputs ``[B]``; returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``."""
        _check_logps(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reference_chosen_logps=reference_chosen_logps,
            reference_rejected_logps=reference_rejected_logps,
        )
        c = self._coefficient()
        losses = preference_pair_losses(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            loss_type=self.loss_type,
            beta=c,
            label_smoothing=getattr(self, "label_smoothing", 0.0),
        )
        chosen_rewards = c * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = c * (policy_rejected_logps - reference_rejected_logps).detach()
        return losses, chosen_rewards, rejected_rewards


class DPOLoss(_PairLoss):
    """Direct Preference Optimization (Rafailov et al. 2023), torchtune's ``DPOLoss``.

    Per pair, with ``d = (pc - pr) - (rc - rr)``:
    ``-(1 - label_smoothing) log s(beta d) - label_smoothing log s(-beta d)``.

    Args:
        beta: temperature of the implicit reward, typically 0.1 to 0.5.
        label_smoothing: probability that a preference label is flipped (conservative DPO).
    """

    loss_type = "sigmoid"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        check_float_option("beta", beta, 0.0, low_open=True)
        check_float_option("label_smoothing", label_smoothing, 0.0, 0.5)
        self.beta = beta
        self.label_smoothing = label_smoothing

    def _coefficient(self) -> float:
        return self.beta


class RSOLoss(_PairLoss):
    """Statistical Rejection Sampling Optimization's hinge loss (Liu et al. 2023), torchtune's ``RSOLoss``.

    Per pair: ``max(0, 1 - gamma d)``, ``d = (pc - pr) - (rc - rr)``; rewards ``gamma (p - r)``.

    Args:
        gamma: the DPO-like temperature.
    """

    loss_type = "hinge"

    def __init__(self, gamma: float = 0.1):
        super().__init__()
        check_float_option("gamma", gamma, 0.0, low_open=True)
        self.gamma = gamma

    def _coefficient(self) -> float:
        return self.gamma
