"""The alignment losses' options objects and grouped inputs, checked when they are made.

* :class:`PreferenceOptions`: the DPO family's non-tensor options (:func:`tune_losses.linear_preference_loss`);
* :class:`KTOOptions`: the unpaired losses' (:func:`tune_losses.linear_kto_loss`);
* :class:`Reference`: a frozen reference model's final hidden states and output layer, one argument
  instead of three (its three tensors only mean something together);
* :class:`KLEstimate`: the mismatched completions TRL's ``KTOTrainer`` estimates its KL reference
  point from.

The policy losses' options are :class:`tune_losses.alignment.policy_formulas.PolicyOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from tune_losses.alignment.formulas import (
    KTO_LOSS_TYPES,
    LABEL_SMOOTHING_TYPES,
    MEAN_LOG_PROB_TYPES,
    PREFERENCE_LOSS_TYPES,
)
from tune_losses.options import ArgumentTypeError, check_bool_option, check_choice, check_float_option


def _check_optional_bool(name: str, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise ArgumentTypeError(f"{name}: expected None, True or False, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class PreferenceOptions:
    """Options of a preference loss (TRL 1.16 ``DPOConfig`` names); hashable.

    Attributes:
        loss_type: ``sigmoid`` | ``ipo`` | ``hinge`` | ``simpo`` | ``orpo`` | ``robust`` | ``exo_pair``
            | ``nca_pair`` | ``bco_pair`` | ``sppo_hard`` | ``apo_zero`` | ``apo_down`` | ``discopop``
            (formulas: :func:`tune_losses.alignment.formulas.preference_pair_losses`).
        beta: the inverse temperature of the implicit reward (> 0).
        gamma: SimPO's target margin.
        label_smoothing: conservative DPO / SimPO (in [0, 0.5]), ``robust`` (in [0, 0.5)),
            ``exo_pair`` (in (0, 1), required); the other loss types take none.
        discopop_tau: DiscoPOP's modulation temperature (> 0; TRL's default 0.05).
        nll_weight: weight of the chosen sequences' mean NLL per valid token (RPO / CPO); ORPO always
            adds it with weight 1, plus this.
        average_log_prob: a sequence's log-prob as the mean over its valid tokens (None: the default
            of the loss type, mean for ipo / simpo / orpo, sum for the others).
        validate: check the label range (one host sync per model side per call).
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    gamma: float = 0.0
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    nll_weight: float = 0.0
    average_log_prob: Optional[bool] = None
    validate: bool = True

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, PREFERENCE_LOSS_TYPES)
        check_float_option("beta", self.beta, 0.0, low_open=True)
        check_float_option("gamma", self.gamma)
        check_float_option("label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_float_option("discopop_tau", self.discopop_tau, 0.0, low_open=True)
        smoothing, loss_type = self.label_smoothing, self.loss_type
        if smoothing and loss_type not in LABEL_SMOOTHING_TYPES:
            raise ValueError(
                f"label_smoothing: only the {LABEL_SMOOTHING_TYPES} losses take it, got "
                f"{smoothing} with loss_type={loss_type!r}"
            )
        if loss_type in ("sigmoid", "simpo") and smoothing > 0.5:
            raise ValueError(
                f"label_smoothing: expected a value in [0, 0.5] for loss_type={loss_type!r}, got {smoothing}"
            )
        if loss_type == "robust" and smoothing >= 0.5:
            raise ValueError(f"label_smoothing: expected a value in [0, 0.5) for loss_type='robust', got {smoothing}")
        if loss_type == "exo_pair" and not 0.0 < smoothing < 1.0:
            raise ValueError(
                f"label_smoothing: expected a value in (0, 1) for loss_type='exo_pair' (the EXO paper uses "
                f"1e-3), got {smoothing}"
            )
        check_float_option("nll_weight", self.nll_weight, 0.0)
        _check_optional_bool("average_log_prob", self.average_log_prob)
        check_bool_option("validate", self.validate)

    @property
    def average(self) -> bool:
        """Whether sequence log-probs are means over valid tokens (``average_log_prob`` resolved)."""
        return self.loss_type in MEAN_LOG_PROB_TYPES if self.average_log_prob is None else self.average_log_prob

    @property
    def total_nll_weight(self) -> float:
        """The NLL term's weight in the loss: ``nll_weight``, plus 1 for ORPO (its loss includes it)."""
        return self.nll_weight + (1.0 if self.loss_type == "orpo" else 0.0)

    def formula(self) -> dict:
        """The keywords of :func:`tune_losses.alignment.formulas.counted_pair_losses`."""
        return dict(
            loss_type=self.loss_type,
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
        )


@dataclass(frozen=True)
class KTOOptions:
    """Options of an unpaired preference loss (TRL 1.16 ``KTOConfig`` names); hashable.

    Attributes:
        loss_type: ``kto`` or ``apo_zero_unpaired``.
        beta: the inverse temperature (> 0).
        desirable_weight, undesirable_weight: TRL's weights of the two kinds of completion (>= 0).
        average_log_prob: a sequence's log-prob as the mean over its valid tokens instead of TRL's sum.
        validate: check the label range (one host sync per model side per call).
    """

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    average_log_prob: bool = False
    validate: bool = True

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, KTO_LOSS_TYPES)
        check_float_option("beta", self.beta, 0.0, low_open=True)
        check_float_option("desirable_weight", self.desirable_weight, 0.0)
        check_float_option("undesirable_weight", self.undesirable_weight, 0.0)
        check_bool_option("average_log_prob", self.average_log_prob)
        check_bool_option("validate", self.validate)


class Reference(NamedTuple):
    """A frozen reference model as the fused losses take it: its final hidden states ``[B, S, H']``
    (the batch's rows, aligned with the labels), its output projection ``weight`` ``[V, H']`` and
    ``bias`` ``[V]`` or None. Its log-probabilities are made under no-grad by the same engine."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class KLEstimate(NamedTuple):
    """What TRL's ``KTOTrainer`` estimates the KL reference point from: mismatched (prompt,
    completion) pairs of the batch, ``kl = max(mean(policy - reference), 0)`` over their sequence
    log-probs (no gradient).

    Attributes:
        hidden: ``[B', S', H]`` the policy's hidden states of the mismatched pairs.
        labels: ``[B', S']`` their labels (``ignore_index`` at prompt and padding).
        ref_hidden: ``[B', S', H']`` the reference model's (through the call's ``reference`` output
            layer), or
        ref_logps: ``[B']`` its sequence log-probs, or neither (a zero reference).
    """

    hidden: torch.Tensor
    labels: torch.Tensor
    ref_hidden: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
