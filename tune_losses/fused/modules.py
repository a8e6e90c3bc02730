"""``nn.Module`` wrappers of the fused linear losses, for recipes and YAML ``_component_``s.

Both follow torchtune's SFTLoss protocol: ``set_model_output(model)`` takes the model's output
projection and switches the model to return hidden states; ``forward`` then takes hidden states.

The constructors keep their flat, positional torchtune-compatible arguments (YAML configs name them
one by one), so they are the exception to "options as objects"; each builds its options objects
(:class:`~tune_losses.options.CEOptions`, ...) once, and every call passes those down unchecked.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from tune_losses.accounting import LossSum
from tune_losses.chunking import _MIN_CHUNK_TOKENS as MIN_CHUNK_TOKENS
from tune_losses.chunking import chunk_policy
from tune_losses.fused.functional import FusedOutput, linear_cross_entropy, linear_distillation_loss
from tune_losses.heads import OutputProjection, set_output_mode
from tune_losses.options import (
    IGNORE_INDEX,
    CEOptions,
    DistillationOptions,
    ExecutionOptions,
    KDOptions,
    VocabParallelOptions,
    check_bool_option,
    check_int_option,
)


def check_torchtune_main_options(num_output_chunks, tp_enabled, mask_ignored_tokens) -> None:
    """torchtune main's constructor arguments: an int >= 1 or None, and two bools."""
    if num_output_chunks is not None:
        check_int_option("num_output_chunks", num_output_chunks, 1)
    check_bool_option("tp_enabled", tp_enabled)
    check_bool_option("mask_ignored_tokens", mask_ignored_tokens)


def chunk_size_hint(
    chunk_size: Optional[int], num_output_chunks: Optional[int], hidden: torch.Tensor, weight: torch.Tensor
) -> Optional[int]:
    """Tokens per chunk: ``chunk_size`` when given; else the memory rule, at most
    ``ceil(N / num_output_chunks)`` tokens (never below the rule's minimum) when that hint is given."""
    if chunk_size is not None or not num_output_chunks or hidden.dim() < 1:
        return chunk_size
    tokens = hidden.numel() // max(hidden.shape[-1], 1)
    rule = chunk_policy(tokens, weight.shape[0], hidden.device, hidden_size=hidden.shape[-1])
    cap = max(-(-tokens // num_output_chunks), min(MIN_CHUNK_TOKENS, tokens))
    return max(1, min(rule, cap))


def _require(proj: Optional[OutputProjection], who: str) -> OutputProjection:
    if proj is None:
        raise ValueError(f"{who}: no output projection; call set_model_output(model) first (or pass weight=)")
    return proj


class HiddenStatesLoss(nn.Module):
    """Base of the losses that take the model's final hidden states instead of its logits."""

    projection: Optional[OutputProjection] = None

    def set_model_output(self, model: nn.Module) -> None:
        """Take ``model``'s output projection and make the model return hidden states."""
        self.projection = set_output_mode(model, "hidden")

    def output_projection(self) -> OutputProjection:
        """The projection :meth:`set_model_output` took (an error naming the fix when there is none)."""
        return _require(self.projection, type(self).__name__)


class DistillationLossBase(HiddenStatesLoss):
    """Base of the ``(1 - kd_ratio) * CE + kd_ratio * KD`` modules (a dense or a cached teacher).

    A subclass names what :meth:`forward` takes (``INPUTS``), holds ``options`` / ``execution`` /
    ``chunk_size`` and maps the inputs and its projections onto its fused function
    (:meth:`_call`); the calls, their keyword arguments and the parts' names are made here once.
    """

    INPUTS: Tuple[str, ...] = ()
    options: Any  # DistillationOptions or SparseDistillationOptions, made in __init__
    execution: ExecutionOptions
    chunk_size: Optional[int] = None

    def _call(self, inputs: Sequence[torch.Tensor], **kwargs) -> FusedOutput:
        raise NotImplementedError

    def fused(
        self, *inputs: torch.Tensor, reduction: str = "mean", scale: Optional[torch.Tensor] = None
    ) -> FusedOutput:
        """The fused call on ``INPUTS``: ``loss`` reduced as asked (``scale`` with ``"sum"``), the
        detached parts, the valid-token count."""
        if len(inputs) != len(self.INPUTS):
            names = ", ".join(self.INPUTS)
            raise TypeError(f"{type(self).__name__}: expected the tensors ({names}), got {len(inputs)} of them")
        kw = dict(reduction=reduction, scale=scale, chunk_size=self.chunk_size, execution=self.execution)
        return self._call(inputs, options=self.options, **kw)

    def sum_and_count(self, *inputs: torch.Tensor, scale: Optional[torch.Tensor] = None) -> LossSum:
        """Summed total, its parts (detached sums, ``{"class_loss", "kd_loss"}``) and the valid-token
        count; ``scale`` multiplies every sum. ``inputs``: as :meth:`forward`."""
        out = self.fused(*inputs, reduction="sum", scale=scale)
        return LossSum(out.loss, out.num_tokens, {"class_loss": out.ce, "kd_loss": out.kd})

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Mean total loss over valid tokens (0-dim fp32; 0 when none); ``inputs`` are ``INPUTS``."""
        return self.fused(*inputs).loss


class LinearCrossEntropyLoss(HiddenStatesLoss):
    """Fused linear cross-entropy as a module.

    Args:
        ignore_index, label_smoothing, z_loss, softcap, chunk_size, algorithm, validate: as
            :func:`tune_losses.linear_cross_entropy`.

    torchtune main's ``LinearCrossEntropyLoss(num_output_chunks, ignore_index, tp_enabled,
    mask_ignored_tokens)`` arguments are accepted by keyword, with their meaning:

    * ``num_output_chunks``: a chunking hint, an upper bound of ``ceil(N / num_output_chunks)``
      tokens per chunk (never below the rule's 128-token minimum); the memory rule (or
      ``chunk_size``) usually chunks finer.
    * ``tp_enabled``: the output weight is tensor-parallel over the vocabulary (a ``Shard(0)``
      DTensor on a ``tp`` mesh dimension): computed vocabulary-parallel, never gathered. False:
      detected from the weight.
    * ``mask_ignored_tokens`` (default True): ignored tokens' rows are dropped before the chunk loop
      (no logits or matmul work for them; one host sync per call).

    Usage::

        loss_fn = LinearCrossEntropyLoss()
        loss_fn.set_model_output(model)          # model now returns hidden states [B, S, H]
        loss = loss_fn(model(tokens), labels)     # mean over valid tokens
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        algorithm: str = "auto",
        validate: bool = True,
        *,
        num_output_chunks: Optional[int] = None,
        tp_enabled: bool = False,
        mask_ignored_tokens: bool = True,
    ):
        super().__init__()
        # The options objects are made (and checked) once here: a bad config fails when it is built,
        # and no call re-checks them.
        check_torchtune_main_options(num_output_chunks, tp_enabled, mask_ignored_tokens)
        check_int_option("chunk_size", chunk_size, 1, allow_none=True)
        self.options = CEOptions(ignore_index, label_smoothing, z_loss, softcap, validate)
        self.execution = ExecutionOptions(algorithm, mask_ignored_tokens)
        self.parallel = VocabParallelOptions(vocab_parallel=True if tp_enabled else None)
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.num_output_chunks = num_output_chunks
        self.projection: Optional[OutputProjection] = None

    def apply_compile_strategy(self, *args, **kwargs) -> LinearCrossEntropyLoss:
        """torchtune main's compile hook: nothing to do, the per-chunk math compiles itself."""
        return self

    def sum_and_count(
        self, hidden: torch.Tensor, labels: torch.Tensor, scale: Optional[torch.Tensor] = None
    ) -> LossSum:
        """``(summed CE over valid tokens, valid-token count)``. hidden ``[B, S, H]``, labels ``[B, S]``.

        ``scale`` (0-dim fp32, e.g. ``1 / global_count``) multiplies the sum (the training loop's
        normalization, see :mod:`tune_losses.training.protocol`); the count is unchanged.
        """
        proj = self.output_projection()
        # The scale goes into the loss, which applies it to the fp32 gradients before their cast to a
        # low-precision dtype (one rounding, as eager autograd); scaling the result would round twice.
        total = linear_cross_entropy(
            hidden,
            proj.weight,
            labels,
            bias=proj.bias,
            reduction="sum",
            scale=scale,
            chunk_size=chunk_size_hint(self.chunk_size, self.num_output_chunks, hidden, proj.weight),
            options=self.options,
            parallel=self.parallel,
            execution=self.execution,
        )
        return LossSum(total, (labels != self.ignore_index).sum())

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE over valid tokens (0-dim fp32; 0 when none)."""
        return self.sum_and_count(hidden, labels).mean()


class LinearDistillationLoss(DistillationLossBase):
    """``(1 - kd_ratio) * CE + kd_ratio * KD`` from student and teacher hidden states, fused.

    Args:
        kd_ratio: weight of the distillation term, in [0, 1].
        divergence, temperature, beta, sym_kd_ratio, scale_by_temperature_squared: see
            :class:`tune_losses.options.KDOptions` (true divergences).
        ignore_index, label_smoothing, chunk_size, algorithm, validate: as the CE loss.
        teacher_vocab: a teacher with more vocabulary rows (padding) than the student: ``"drop"`` or
            ``"pad_student"`` (see :func:`tune_losses.linear_kd_loss`).
        mask_ignored_tokens: drop ignored tokens' rows before the chunk loop (one host sync per call).

    ``forward(student_hidden, teacher_hidden, labels)``: student ``[B, S, Hs]``, teacher ``[B, S, Ht]``,
    labels ``[B, S]``; ``sum_and_count`` (same tensors, ``scale=``) reports the parts (detached sums) as
    ``parts={"class_loss", "kd_loss"}`` for logging.
    """

    INPUTS = ("student_hidden", "teacher_hidden", "labels")

    def __init__(
        self,
        kd_ratio: float = 0.5,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        sym_kd_ratio: float = 0.5,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0,
        chunk_size: Optional[int] = None,
        algorithm: str = "auto",
        validate: bool = True,
        *,
        teacher_vocab: Optional[str] = None,
        mask_ignored_tokens: bool = True,
    ):
        super().__init__()
        # The options objects are made (and checked) once here: a bad config fails when it is built,
        # and no call re-checks them.
        check_torchtune_main_options(None, False, mask_ignored_tokens)
        check_int_option("chunk_size", chunk_size, 1, allow_none=True)
        kd = KDOptions(
            divergence,
            temperature,
            scale_by_temperature_squared,
            beta,
            sym_kd_ratio,
            True,
            ignore_index,
            validate,
            teacher_vocab,
        )
        self.options = DistillationOptions(kd_ratio, kd, CEOptions(ignore_index, label_smoothing, validate=validate))
        self.execution = ExecutionOptions(algorithm, mask_ignored_tokens)
        self.ignore_index = ignore_index
        self.kd_ratio = kd_ratio
        self.chunk_size = chunk_size
        self.projection: Optional[OutputProjection] = None
        self.teacher_projection: Optional[OutputProjection] = None

    def set_teacher_output(self, teacher: nn.Module) -> None:
        """Take the teacher's output projection and make it return hidden states."""
        self.teacher_projection = set_output_mode(teacher, "hidden")

    def _call(self, inputs: Sequence[torch.Tensor], **kwargs) -> FusedOutput:
        student_hidden, teacher_hidden, labels = inputs
        s = self.output_projection()
        t = _require(self.teacher_projection, type(self).__name__ + " (teacher)")
        return linear_distillation_loss(
            student_hidden,
            s.weight,
            teacher_hidden,
            t.weight,
            labels,
            student_bias=s.bias,
            teacher_bias=t.bias,
            **kwargs,
        )
