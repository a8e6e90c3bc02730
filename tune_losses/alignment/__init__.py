"""Alignment losses: preference optimization (DPO family) and policy optimization (GRPO family).

All are small formulas (:mod:`tune_losses.alignment.formulas`) over the engine's per-token
log-probabilities (:func:`tune_losses.linear_log_probs`): one chunk loop, no ``[N, V]`` logits. The
preference losses also have a grad-in-forward path over chunks of whole pairs
(:mod:`tune_losses.alignment.pair_chunks`), taken where it applies.
"""

from tune_losses.alignment.kto import KTOOutput, linear_kto_loss
from tune_losses.alignment.modules import LinearPolicyLoss, LinearPreferenceLoss
from tune_losses.alignment.options import KLEstimate, KTOOptions, PreferenceOptions, Reference
from tune_losses.alignment.policy import PolicyOutput, linear_policy_loss, policy_loss_from_log_probs
from tune_losses.alignment.policy_formulas import PolicyOptions
from tune_losses.alignment.preference import (
    PreferenceOutput,
    PreferenceTerms,
    linear_preference_loss,
    linear_preference_terms,
    preference_terms,
)
from tune_losses.alignment.torchtune_compat import DPOLoss, RSOLoss

__all__ = [
    "DPOLoss",
    "KLEstimate",
    "KTOOptions",
    "KTOOutput",
    "LinearPolicyLoss",
    "LinearPreferenceLoss",
    "PolicyOptions",
    "PolicyOutput",
    "PreferenceOptions",
    "PreferenceOutput",
    "PreferenceTerms",
    "RSOLoss",
    "Reference",
    "linear_kto_loss",
    "linear_policy_loss",
    "linear_preference_loss",
    "linear_preference_terms",
    "policy_loss_from_log_probs",
    "preference_terms",
]
