"""What the training loop needs from a loss, declared as protocols, and the one adapter it calls.

A loss of this package reports ``(sum over valid tokens, valid-token count)`` with
``sum_and_count(*outputs, labels, scale=None)``; a fused loss also takes the model's output projection
(``set_model_output``) and, for distillation, the teacher's (``set_teacher_output``). Any other loss
(torchtune's own, ``torch.nn.CrossEntropyLoss``) returns a mean; :class:`TrainingLoss` multiplies it back
by its count, so the loop sees one interface.

``scale``: the loop knows the step's global valid-token count before the first forward and passes
``scale = data_parallel_size / global_count`` (a 0-dim fp32 tensor). A loss that takes it applies it in
fp32 before any cast to the input dtype (a bf16 gradient computed in forward is rounded once, not twice);
for one that does not, the adapter multiplies the result, which is the same value.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from tune_losses.accounting import LossSum
from tune_losses.options import IGNORE_INDEX


@runtime_checkable
class SumAndCountLoss(Protocol):
    """``sum_and_count(*outputs, labels) -> LossSum``: the sum over valid tokens and their count.

    ``outputs`` are what the model emits (full logits ``[B, S, V]``, a list of chunks ``[B, S_i, V]``,
    or hidden states ``[B, S, H]``) and, for distillation, the teacher's; labels ``[B, S]``, shifted.
    May take ``scale=`` (see the module docstring).
    """

    def sum_and_count(self, *args: Any, **kwargs: Any) -> LossSum: ...


@runtime_checkable
class ModelOutputLoss(Protocol):
    """A loss that computes the output projection itself (fused): it takes the model's projection
    and switches the model to return hidden states ``[B, S, H]``."""

    def set_model_output(self, model: nn.Module) -> None: ...


@runtime_checkable
class TeacherOutputLoss(Protocol):
    """A distillation loss that also takes the teacher's projection and carries its own ``kd_ratio``
    (``(1 - kd_ratio) * CE + kd_ratio * KD`` in one call)."""

    kd_ratio: float

    def set_teacher_output(self, teacher: nn.Module) -> None: ...


def _takes_scale(fn) -> bool:
    try:
        return "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class TrainingLoss:
    """The loop's single view of a loss: ``loss(*outputs, labels, scale=None) -> LossSum``.

    With ``scale``, every value returned (``total`` and each of ``parts``) is multiplied by it; the
    count is not.
    """

    def __init__(self, loss: nn.Module):
        self.loss: Any = loss  # duck-typed: sum_and_count or forward, checked below
        self.ignore_index: int = getattr(loss, "ignore_index", IGNORE_INDEX)
        self.native = isinstance(loss, SumAndCountLoss)
        self.native_scale = self.native and _takes_scale(loss.sum_and_count)

    @property
    def name(self) -> str:
        return type(self.loss).__name__

    def __call__(self, *outputs: Any, labels: torch.Tensor, scale: Optional[torch.Tensor] = None) -> LossSum:
        if self.native_scale:
            return self.loss.sum_and_count(*outputs, labels, scale=scale)
        result = self.loss.sum_and_count(*outputs, labels) if self.native else self._from_mean(*outputs, labels)
        return result if scale is None else _scaled(result, scale)

    def _from_mean(self, *args: Any) -> LossSum:
        """A foreign mean loss times its count: 0 when no token is valid (torchtune's gives NaN)."""
        labels = args[-1]
        count = (labels != self.ignore_index).sum()
        if isinstance(self.loss, nn.CrossEntropyLoss):  # torch's wants [N, V] / [N]
            args = tuple(a.reshape(-1, a.shape[-1]) for a in args[:-1]) + (labels.reshape(-1),)
        mean = self.loss(*args)
        return LossSum(torch.where(count > 0, mean * count, torch.zeros_like(mean)), count)


def _scaled(result: LossSum, scale: torch.Tensor) -> LossSum:
    parts: Optional[Dict[str, torch.Tensor]] = None
    if result.parts is not None:
        parts = {k: v * scale for k, v in result.parts.items()}
    return LossSum(result.total * scale, result.num_tokens, parts)
