"""Fused distillation from a cached sparse teacher: no teacher model, no ``[N, V]`` logits.

``linear_sparse_kd_loss`` is the forward KL of the student's ``softmax(hidden @ weight.T / T)``
against k cached teacher log-probabilities per token (:mod:`tune_losses.sparse_teacher`);
``linear_sparse_distillation_loss`` adds the cross-entropy on the labels in the same chunk pass.
Both run the engine's chunk loop with the teacher's ids and log-probabilities as per-token side
inputs, through the same weight placement (plain, FSDP2, tensor-parallel, local shard) as
:func:`tune_losses.linear_kd_loss`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch

from tune_losses.deprecation import options_object, take
from tune_losses.fused.functional import (
    FusedOutput,
    Side,
    _fused_output,
    _placement_and_execution,
    _run,
    _run_options,
    mix_terms,
)
from tune_losses.options import (
    ArgumentTypeError,
    ExecutionOptions,
    SparseDistillationOptions,
    SparseKDOptions,
    VocabParallelOptions,
)
from tune_losses.sparse_teacher import TEACHER_IDS, TEACHER_LOGPROBS, SparseKDTerm
from tune_losses.terms import Term
from tune_losses.validation import LABEL_DTYPES, check_fused_inputs, check_tensor

POSITIVE_LOGPROB_TOLERANCE = 1e-3
"""A cached log-probability above this is refused: log-probabilities are <= 0, and rounding (a
log_softmax in low precision, an fp16 / bf16 cache) stays far below it."""


def _check_teacher(
    teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, labels: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Types and shapes of the cached teacher against the labels; the flat side inputs ``[N, k]``."""
    check_tensor(TEACHER_IDS, teacher_ids, "[..., k] of vocabulary ids")
    check_tensor(TEACHER_LOGPROBS, teacher_logprobs, "[..., k] of log-probabilities")
    if teacher_ids.dtype not in LABEL_DTYPES:
        raise ArgumentTypeError(
            f"{TEACHER_IDS}: expected dtype torch.int64 or torch.int32 (vocabulary ids), got dtype {teacher_ids.dtype}"
        )
    if not teacher_logprobs.is_floating_point():
        raise ArgumentTypeError(
            f"{TEACHER_LOGPROBS}: expected a floating-point tensor (log-probabilities), got dtype {teacher_logprobs.dtype}"
        )
    if teacher_ids.dim() != labels.dim() + 1 or teacher_ids.shape[:-1] != labels.shape or teacher_ids.shape[-1] < 1:
        raise ValueError(
            f"{TEACHER_IDS}: expected shape {(*labels.shape, 'k')} (labels {tuple(labels.shape)} plus k >= 1 "
            f"entries per token), got {tuple(teacher_ids.shape)}"
        )
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"{TEACHER_LOGPROBS}: expected shape {tuple(teacher_ids.shape)} (as {TEACHER_IDS}), "
            f"got {tuple(teacher_logprobs.shape)}"
        )
    if teacher_ids.device != labels.device or teacher_logprobs.device != labels.device:
        raise ValueError(
            f"{TEACHER_IDS}, {TEACHER_LOGPROBS}: expected device {labels.device} (as labels), "
            f"got {teacher_ids.device} and {teacher_logprobs.device}"
        )
    k = teacher_ids.shape[-1]
    return {TEACHER_IDS: teacher_ids.reshape(-1, k), TEACHER_LOGPROBS: teacher_logprobs.detach().reshape(-1, k)}


def check_teacher_values(inputs: Dict[str, torch.Tensor], vocab_size: int) -> None:
    """Value checks of a cached teacher (one host sync; raised errors name the argument):
    ids in ``[0, vocab_size)`` or -1, no id twice in a token's row, no positive log-probability
    (beyond :data:`POSITIVE_LOGPROB_TOLERANCE`) at a used slot."""
    ids, lp = inputs[TEACHER_IDS], inputs[TEACHER_LOGPROBS]
    if ids.numel() == 0:
        return
    used = ids >= 0
    out_of_range = (ids < -1) | (ids >= vocab_size)
    positive = used & (lp > POSITIVE_LOGPROB_TOLERANCE)
    ordered = ids.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    flags = torch.stack([out_of_range.any(), repeated.any(), positive.any()])
    if not bool(flags.any()):
        return
    if bool(flags[0]):
        raise ValueError(
            f"{TEACHER_IDS}: expected vocabulary ids in [0, {vocab_size}) or -1 (an unused slot), "
            f"got {int(out_of_range.sum())} out of range (e.g. {ids[out_of_range][0].item()})"
        )
    if bool(flags[1]):
        row = int(repeated.any(-1).nonzero()[0, 0])
        dup = ordered[row, 1:][repeated[row]][0].item()
        raise ValueError(
            f"{TEACHER_IDS}: expected distinct ids within a token's entries, got id {dup} twice in token {row} "
            "(a sampled cache collapses repeated draws into one id with log(count / k))"
        )
    raise ValueError(
        f"{TEACHER_LOGPROBS}: expected log-probabilities <= 0, got {int(positive.sum())} above "
        f"{POSITIVE_LOGPROB_TOLERANCE:g} (e.g. {lp[positive][0].item():g}); pass log-probabilities, not "
        "logits or probabilities"
    )


_SPARSE_KD_FIELDS = ("temperature", "tail", "ignore_index", "validate")
"""The SparseKDOptions fields the functions took as flat keywords before ``options=``."""
_SPARSE_DISTILLATION_FIELDS = ("kd_ratio", "label_smoothing") + _SPARSE_KD_FIELDS


def _sparse_run(fn: str, terms: List[Term], kd: SparseKDOptions, call: Dict[str, Any]):
    """The run both entry points share: the placement and execution objects (old flat keywords
    folded in, with a DeprecationWarning), the tensors' checks, one chunk pass with the cached teacher
    as per-token side inputs. ``call``: the public function's arguments by name; ``kd`` the sparse
    term's options (its ``ignore_index`` and ``validate`` hold for the call)."""
    parallel, execution = _placement_and_execution(fn, call["parallel"], call["execution"], call["deprecated"])
    side, labels = Side(call["hidden"], call["weight"], call["bias"]), call["labels"]
    check_fused_inputs(labels, local_shard=parallel.process_group is not None, **dict(zip(side.names, side[:3])))
    inputs = _check_teacher(call[TEACHER_IDS], call[TEACHER_LOGPROBS], labels)
    opts = _run_options(call["reduction"], call["chunk_size"], kd.ignore_index, kd.validate, parallel, execution)
    check: Callable[[int], None] = lambda vocab: check_teacher_values(inputs, vocab)  # noqa: E731
    return _run(terms, side, None, labels, opts, call["num_tokens"], call["scale"], inputs, check)


def linear_sparse_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    options: Optional[SparseKDOptions] = None,
    parallel: Optional[VocabParallelOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> torch.Tensor:
    """Forward KL of the student against a cached sparse teacher, one chunk of logits at a time.

    Args:
        hidden: ``[N, H]`` or ``[B, S, H]`` student hidden states (fp32 / bf16 / fp16; fp64 in fp64).
        weight: ``[V, H]`` output projection; bias ``[V]`` or None. Gradients reach these three only.
        labels: hidden's leading shape; tokens with ``options.ignore_index`` count nothing (only the
            mask is read; labels must still be in ``[0, V)`` there, checked with ``options.validate``).
        teacher_ids: ``[..., k]`` (labels' shape plus k) int64 / int32 ids in ``[0, V)``, or -1 for
            an unused slot (a token may have fewer than k entries); distinct within a token.
        teacher_logprobs: ``[..., k]`` float: the teacher's log-probabilities of those ids at
            ``options.temperature`` (as a serving engine returns them); ``-inf`` is probability 0.
        reduction: ``"mean"`` over tokens whose label is not ``ignore_index`` (0 if none),
            ``"sum"``, or ``"none"`` (labels' shape, 0 at ignored tokens).
        chunk_size, num_tokens, scale: as :func:`tune_losses.linear_cross_entropy`.
        options: :class:`~tune_losses.options.SparseKDOptions`: ``temperature`` (T: the student's
            logits are divided by T, the loss multiplied by T^2), ``tail`` (``"renormalize"``: the
            teacher's entries renormalized to sum 1, or ``"bucket"``: the teacher's left-out mass
            against the student's mass outside the ids; see :mod:`tune_losses.sparse_teacher`),
            ``ignore_index`` and ``validate`` (check once per call, one host sync, the labels' range,
            the ids' range and distinctness, and that no used log-probability is positive).
        parallel: :class:`~tune_losses.options.VocabParallelOptions`, as
            :func:`tune_losses.linear_cross_entropy`. Vocabulary-parallel, ``teacher_ids`` hold global
            ids and are the same on every rank.
        execution: :class:`~tune_losses.options.ExecutionOptions` (``algorithm``,
            ``drop_ignored_tokens``, ``dw_accumulation``): same results, different work.
        deprecated: the old flat ``temperature``, ``tail``, ``ignore_index``, ``validate``,
            ``algorithm``, ``drop_ignored_tokens``, ``process_group``, ``vocab_parallel``,
            ``vocab_start``, ``vocab_size`` still work, with a DeprecationWarning naming ``options=`` /
            ``execution=`` / ``parallel=``.

    Returns:
        fp32 loss (fp64 for fp64 inputs), 0-dim or per token.
    """
    fn = "linear_sparse_kd_loss"
    options = options_object(fn, "options", SparseKDOptions, options, take(deprecated, _SPARSE_KD_FIELDS))
    loss, _, _ = _sparse_run(fn, [SparseKDTerm(options)], options, locals())
    return loss


def linear_sparse_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    options: Optional[SparseDistillationOptions] = None,
    parallel: Optional[VocabParallelOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> FusedOutput:
    """``(1 - kd_ratio) * CE(student, labels) + kd_ratio * sparse KD(student, cached teacher)`` in one
    chunk pass (each chunk of student logits made once, serving both terms), both normalized over
    the same valid tokens.

    ``options`` is a :class:`~tune_losses.options.SparseDistillationOptions` (``kd_ratio``, ``kd``:
    SparseKDOptions, ``ce``: CEOptions, e.g. for label smoothing); the other arguments as
    :func:`linear_sparse_kd_loss`. The old flat keywords (``kd_ratio``, ``label_smoothing``, the
    SparseKDOptions fields, ...) still work, with a DeprecationWarning.

    Returns:
        :class:`~tune_losses.fused.functional.FusedOutput`: ``loss`` (differentiable), ``ce`` and
        ``kd`` (detached, same reduction), ``num_tokens`` (this call's valid tokens).
    """
    fn = "linear_sparse_distillation_loss"
    flat = take(deprecated, _SPARSE_DISTILLATION_FIELDS)
    options = options_object(fn, "options", SparseDistillationOptions, options, flat)
    terms = mix_terms(options, SparseKDTerm)
    return _fused_output(*_sparse_run(fn, terms, options.kd, locals()))
