"""``SparseDistillationLoss``: distillation from a cached teacher as an ``nn.Module`` for recipes and YAML.

It follows :class:`tune_losses.LinearDistillationLoss`'s calling convention with the teacher's
cached ``teacher_ids`` / ``teacher_logprobs`` in place of its hidden states: ``set_model_output(model)``
takes the student's output projection (the model then returns hidden states), ``sum_and_count``
reports ``(sum, valid-token count, parts)`` for the training loop's exact normalization
(:mod:`tune_losses.accounting`), ``forward`` the mean. It has no ``set_teacher_output``: no teacher
model is loaded.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tune_losses.fused.functional import FusedOutput
from tune_losses.fused.modules import DistillationLossBase
from tune_losses.fused.sparse import linear_sparse_distillation_loss
from tune_losses.options import (
    IGNORE_INDEX,
    CEOptions,
    ExecutionOptions,
    SparseDistillationOptions,
    SparseKDOptions,
    check_int_option,
)


class SparseDistillationLoss(DistillationLossBase):
    """``(1 - kd_ratio) * CE + kd_ratio * sparse KD`` from student hidden states and a cached teacher.

    Args:
        kd_ratio: weight of the distillation term, in [0, 1].
        temperature: the cache's temperature (its log-probabilities are at T): the student's logits
            are divided by T, the KD term multiplied by T^2.
        tail: ``"renormalize"`` or ``"bucket"`` (see :class:`tune_losses.options.SparseKDOptions`).
        ignore_index, label_smoothing, chunk_size, algorithm, validate: as
            :class:`tune_losses.LinearDistillationLoss`.
        mask_ignored_tokens: drop ignored tokens' rows before the chunk loop (one host sync per call).

    The arguments become ``options`` (:class:`~tune_losses.options.SparseDistillationOptions`) and
    ``execution`` once, here. ``forward(hidden, teacher_ids, teacher_logprobs, labels)``: hidden
    ``[B, S, H]``, teacher_ids / teacher_logprobs ``[B, S, k]``, labels ``[B, S]``; ``sum_and_count``
    (same tensors, ``scale=``) reports the parts (detached sums) as ``parts={"class_loss", "kd_loss"}``.

    Usage::

        loss_fn = SparseDistillationLoss(kd_ratio=0.5, temperature=1.0)
        loss_fn.set_model_output(model)                       # model now returns hidden states
        loss = loss_fn(model(tokens), teacher_ids, teacher_logprobs, labels)
    """

    INPUTS = ("hidden", "teacher_ids", "teacher_logprobs", "labels")

    def __init__(
        self,
        kd_ratio: float = 0.5,
        temperature: float = 1.0,
        tail: str = "renormalize",
        ignore_index: int = IGNORE_INDEX,
        chunk_size: Optional[int] = None,
        label_smoothing: float = 0.0,
        algorithm: str = "auto",
        validate: bool = True,
        *,
        mask_ignored_tokens: bool = True,
    ):
        super().__init__()
        # The options objects are made (and checked) here, so a bad config fails when it is built.
        check_int_option("chunk_size", chunk_size, 1, allow_none=True)
        kd = SparseKDOptions(temperature, tail, ignore_index, validate)
        ce = CEOptions(ignore_index, label_smoothing, validate=validate)
        self.options = SparseDistillationOptions(kd_ratio, kd, ce)
        self.execution = ExecutionOptions(algorithm, mask_ignored_tokens)
        self.chunk_size = chunk_size

    @property
    def kd_ratio(self) -> float:
        return self.options.kd_ratio

    @property
    def temperature(self) -> float:
        """The loss's temperature: the recipe checks it against the teacher cache's."""
        return self.options.kd.temperature

    @property
    def ignore_index(self) -> int:
        return self.options.kd.ignore_index

    def _call(self, inputs: Sequence[torch.Tensor], **kwargs) -> FusedOutput:
        hidden, teacher_ids, teacher_logprobs, labels = inputs
        p = self.output_projection()
        return linear_sparse_distillation_loss(
            hidden, p.weight, labels, teacher_ids, teacher_logprobs, bias=p.bias, **kwargs
        )
