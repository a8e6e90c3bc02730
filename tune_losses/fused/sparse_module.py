"""``SparseDistillationLoss``: distillation from a cached teacher as an ``nn.Module`` for recipes and YAML.

It follows :class:`tune_losses.LinearDistillationLoss`'s calling convention with the teacher's
cached ``teacher_ids`` / ``teacher_logprobs`` in place of its hidden states: ``set_model_output(model)``
takes the student's output projection (the model then returns hidden states), ``sum_and_count``
reports ``(sum, valid-token count, parts)`` for the training loop's exact normalization
(:mod:`tune_losses.accounting`), ``forward`` the mean. It has no ``set_teacher_output``: no teacher
model is loaded.
"""

from __future__ import annotations

from typing import Optional

import torch

from tune_losses.accounting import LossSum
from tune_losses.fused.functional import FusedOutput
from tune_losses.fused.modules import HiddenStatesLoss
from tune_losses.fused.sparse import linear_sparse_distillation_loss
from tune_losses.options import IGNORE_INDEX, CEOptions, ExecutionOptions, check_float_option, check_int_option
from tune_losses.sparse_teacher import SparseKDOptions


class SparseDistillationLoss(HiddenStatesLoss):
    """``(1 - kd_ratio) * CE + kd_ratio * sparse KD`` from student hidden states and a cached teacher.

    Args:
        kd_ratio: weight of the distillation term, in [0, 1].
        temperature: the cache's temperature (its log-probabilities are at T): the student's logits
            are divided by T, the KD term multiplied by T^2.
        tail: ``"renormalize"`` or ``"bucket"`` (see :func:`tune_losses.linear_sparse_kd_loss`).
        ignore_index, label_smoothing, chunk_size, algorithm, validate: as
            :class:`tune_losses.LinearDistillationLoss`.
        mask_ignored_tokens: drop ignored tokens' rows before the chunk loop (one host sync per call).

    ``sum_and_count`` reports the parts (detached sums) as ``parts={"class_loss", "kd_loss"}``.

    Usage::

        loss_fn = SparseDistillationLoss(kd_ratio=0.5, temperature=1.0)
        loss_fn.set_model_output(model)                       # model now returns hidden states
        loss = loss_fn(model(tokens), teacher_ids, teacher_logprobs, labels)
    """

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
        check_float_option("kd_ratio", kd_ratio, 0.0, 1.0)
        check_int_option("chunk_size", chunk_size, 1, allow_none=True)
        self.sparse = SparseKDOptions(temperature=temperature, tail=tail)
        self.ce = CEOptions(ignore_index, label_smoothing, validate=validate)
        self.execution = ExecutionOptions(algorithm, mask_ignored_tokens)
        self.kd_ratio = kd_ratio
        self.chunk_size = chunk_size

    @property
    def ignore_index(self) -> int:
        return self.ce.ignore_index

    def fused(
        self,
        hidden: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor,
        reduction: str = "mean",
        scale: Optional[torch.Tensor] = None,
    ) -> FusedOutput:
        p, ce = self.output_projection(), self.ce
        return linear_sparse_distillation_loss(
            hidden, p.weight, labels, teacher_ids, teacher_logprobs, kd_ratio=self.kd_ratio, bias=p.bias,
            temperature=self.sparse.temperature, tail=self.sparse.tail, ignore_index=ce.ignore_index,
            reduction=reduction, label_smoothing=ce.label_smoothing, chunk_size=self.chunk_size,
            validate=ce.validate, scale=scale, execution=self.execution,
        )  # fmt: skip

    def sum_and_count(
        self,
        hidden: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
    ) -> LossSum:
        """Summed total, its parts (detached) and the valid-token count; ``scale`` multiplies every sum.

        hidden ``[B, S, H]``, teacher_ids / teacher_logprobs ``[B, S, k]``, labels ``[B, S]``.
        """
        out = self.fused(hidden, teacher_ids, teacher_logprobs, labels, reduction="sum", scale=scale)
        return LossSum(out.loss, out.num_tokens, {"class_loss": out.ce, "kd_loss": out.kd})

    def forward(
        self, hidden: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean total loss over valid tokens (0-dim fp32; 0 when none)."""
        return self.fused(hidden, teacher_ids, teacher_logprobs, labels).loss
