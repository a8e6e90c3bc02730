"""Fused linear losses: no [N, V] logits in forward or backward."""

from tune_losses.fused.functional import (
    FusedOutput,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_kd_loss,
    linear_log_probs,
)
from tune_losses.fused.modules import LinearCrossEntropyLoss, LinearDistillationLoss

__all__ = [
    "FusedOutput",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_kd_loss",
    "linear_log_probs",
]
