"""Non-tensor options of every loss, in one place.

Functional entry points, modules and recipes all build one of these frozen dataclasses and hand it
down, so the math never takes a long positional argument list and an option means the same thing
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DIVERGENCES = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CEOptions:
    """Options of token-level cross-entropy.

    Attributes:
        ignore_index: label value that marks a token to skip (torch's default -100).
        label_smoothing: eps in ``(1 - eps) * CE + eps * (lse - mean(z))``, in [0, 1].
        z_loss: c in the auxiliary ``c * lse^2`` (PaLM's z-loss), >= 0.
        softcap: s in ``z = s * tanh(z / s)`` applied to logits first (Gemma 2), > 0, or None.
        validate: check label range on the host once per call (one device sync); turn off for speed.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    validate: bool = True

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a float in [0, 1], got {self.label_smoothing!r}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss: expected a float >= 0, got {self.z_loss!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap: expected a float > 0 or None, got {self.softcap!r}")


@dataclass(frozen=True)
class KDOptions:
    """Options of a distillation divergence between teacher p and student q, per token.

    Attributes:
        divergence: one of ``forward_kl`` (KL(p||q)), ``reverse_kl`` (KL(q||p)),
            ``symmetric_kl`` (``r * FKL + (1 - r) * RKL``), ``jsd`` (generalized JSD(beta)), ``tvd``.
        temperature: T; both sides' logits are divided by T.
        scale_by_temperature_squared: multiply the loss by T^2 (Hinton et al.), so gradient
            magnitudes do not shrink as T grows.
        beta: JSD's mixture weight: ``beta KL(p||m) + (1 - beta) KL(q||m)``, ``m = beta p + (1 - beta) q``.
            beta = 0 and beta = 1 are taken as the limits used by TRL and Liger: forward KL and
            reverse KL (the unscaled formula is identically 0 there).
        sym_kd_ratio: r of ``symmetric_kl``, in [0, 1] (torchtune's name).
        true_kl: for the forward-KL term: True gives ``sum p (log p - log q)``; False gives
            torchtune 0.6.1's logged value ``-sum p log q`` (KL plus the teacher's entropy).
            Both have the same gradient with respect to the student.
        ignore_index: label value of tokens left out of the loss.
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    scale_by_temperature_squared: bool = True
    beta: float = 0.5
    sym_kd_ratio: float = 0.5
    true_kl: bool = True
    ignore_index: int = -100

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {self.divergence!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a float > 0, got {self.temperature!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: expected a float in [0, 1], got {self.beta!r}")
        if not 0.0 <= self.sym_kd_ratio <= 1.0:
            raise ValueError(f"sym_kd_ratio: expected a float in [0, 1], got {self.sym_kd_ratio!r}")

    @property
    def loss_scale(self) -> float:
        """Factor applied to the divergence: T^2 when enabled, else 1."""
        return self.temperature**2 if self.scale_by_temperature_squared else 1.0


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction
