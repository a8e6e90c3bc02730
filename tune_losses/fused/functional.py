"""Fused linear losses: final hidden states and the output weight in, a loss out; no ``[N, V]`` logits.

``linear_cross_entropy`` takes torch's ``F.linear_cross_entropy`` positional order
``(hidden, weight, labels)``; ``linear_kd_loss`` and ``linear_distillation_loss`` take student then
teacher; ``linear_log_probs`` gives per-token log-probabilities (and entropy) for alignment losses.
Each returns ordinary tensors in the autograd graph: ``(loss * k).backward()`` and a per-token
``grad_output`` give exact gradients.

Each public function checks its arguments, builds its loss terms (:mod:`tune_losses.terms`) and
options by keyword, and calls :func:`_run`, which resolves the weights' placement
(:mod:`tune_losses.fused.placement`: plain, FSDP2, tensor-parallel, local shard + process group) and
runs the chunk loop (:mod:`tune_losses.fused.engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from tune_losses.fused.dw_accumulation import check_dw_accumulation
from tune_losses.fused.engine import LossPlan, run_terms
from tune_losses.fused.placement import VocabParallelOptions, place
from tune_losses.fused.valid_rows import scatter_rows, select_valid_rows
from tune_losses.options import (
    CEOptions,
    KDOptions,
    check_bool_option,
    check_float_option,
    check_reduction,
    check_run_options,
)
from tune_losses.terms import CrossEntropyTerm, DivergenceTerm, LogProbTerm, Term
from tune_losses.validation import check_float, check_fused_inputs, check_label_range, check_labels_dtype

ALGORITHMS = ("auto", "grad_in_forward", "recompute")


class FusedOutput(NamedTuple):
    """A fused call's result: ``loss`` (reduced as asked, differentiable), its parts (detached) and the
    valid-token count (0-dim int64)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def parts(self) -> Dict[str, torch.Tensor]:
        """The parts by name."""
        return {"ce": self.ce, "kd": self.kd}


@dataclass(frozen=True)
class RunOptions:
    """Non-tensor options of one fused call, checked here once.

    Attributes:
        reduction: ``mean`` (over valid tokens, or over ``num_tokens`` when given), ``sum`` or ``none``.
        algorithm: ``auto``, ``grad_in_forward`` or ``recompute`` (see :mod:`tune_losses.fused.engine`).
        validate: check the label range (one host sync per call).
        chunk_size: tokens per chunk, or None for the default rule.
        ignore_index: label value of tokens left out.
        parallel: where the weights live (:class:`VocabParallelOptions`).
        drop_ignored_tokens: leave ignored tokens' rows out before the chunk loop
            (:mod:`tune_losses.fused.valid_rows`; one host sync per call).
        dw_accumulation: how dW is accumulated over chunks (:mod:`tune_losses.fused.dw_accumulation`).
    """

    reduction: str = "mean"
    algorithm: str = "auto"
    validate: bool = True
    chunk_size: Optional[int] = None
    ignore_index: int = -100
    parallel: VocabParallelOptions = field(default_factory=VocabParallelOptions)
    drop_ignored_tokens: bool = False
    dw_accumulation: str = "auto"

    def __post_init__(self):
        check_reduction(self.reduction)
        check_dw_accumulation(self.dw_accumulation)
        check_bool_option("drop_ignored_tokens", self.drop_ignored_tokens)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {self.algorithm!r}")


class Side(NamedTuple):
    """One model's tensors and the names its arguments have in the public function."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    names: Tuple[str, str, str] = ("hidden", "weight", "bias")


STUDENT_NAMES = ("student_hidden", "student_weight", "student_bias")
TEACHER_NAMES = ("teacher_hidden", "teacher_weight", "teacher_bias")


def _flat(
    names: Sequence[str], hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Check one side's (local) tensors against the labels; return hidden as ``[N, H]``."""
    h_name, w_name, b_name = names
    check_float(h_name, hidden)
    check_float(w_name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{w_name}: expected shape [V, H], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h_name}: expected last dimension H={weight.shape[1]} ({w_name} {tuple(weight.shape)}), got {tuple(hidden.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} ({h_name}'s leading dimensions), got {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{w_name}: expected dtype {hidden.dtype} (as {h_name}), got {weight.dtype}")
    if bias is not None:
        check_float(b_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name}: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        # F.linear would fail later with a RuntimeError that names no argument.
        if bias.dtype != weight.dtype:
            raise ValueError(f"{b_name}: expected dtype {weight.dtype} (as {w_name}), got {bias.dtype}")
    return hidden.reshape(-1, hidden.shape[-1])


def _as_count(num_tokens, device: torch.device) -> torch.Tensor:
    """A token count (0-dim tensor, or a number >= 1) as a 0-dim fp64 tensor. A tensor's value is not
    read (no host sync): a count below 1 (a step with no valid token) is taken as 1 by the caller."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (torch.Tensor, int, float)):
        raise ValueError(f"num_tokens: expected a 0-dim tensor or a number > 0, got {type(num_tokens).__name__}")
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens: expected a 0-dim tensor, got shape {tuple(num_tokens.shape)}")
        return num_tokens.reshape(()).to(device=device, dtype=torch.float64)
    if not (math.isfinite(num_tokens) and num_tokens >= 1):
        raise ValueError(f"num_tokens: expected a finite number >= 1 (a token count), got {num_tokens!r}")
    return torch.tensor(float(num_tokens), dtype=torch.float64, device=device)


def _as_scale(scale, device: torch.device) -> torch.Tensor:
    """A factor of the summed loss (0-dim tensor or finite number) as a 0-dim fp64 tensor."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale: expected a 0-dim tensor, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a 0-dim tensor or a finite number, got {scale!r}")
    return torch.tensor(float(scale), dtype=torch.float64, device=device)


def _run(
    terms: Sequence[Term],
    student: Side,
    teacher: Optional[Side],
    labels: torch.Tensor,
    opts: RunOptions,
    num_tokens=None,
    scale=None,
    inputs: Optional[Dict[str, torch.Tensor]] = None,
    check_inputs: Optional[Callable[[int], None]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """Place the weights, check the tensors, run the terms.

    ``num_tokens`` (with ``reduction="mean"``) replaces this call's valid-token count; ``scale``
    (with ``reduction="sum"``) multiplies the sum. Either way the factor reaches the gradients in
    the compute dtype, before any cast to a low-precision input dtype. ``inputs``: per-token side
    inputs ``[N, ...]`` by name for the terms (``Chunk.inputs``); ``check_inputs(V)``: their
    value-reading checks against the global vocabulary size, run when ``opts.validate``.

    Returns:
        ``(loss, parts, count)``: ``loss`` reduced as ``opts.reduction`` says (fp32, fp64 for fp64
        inputs), ``parts`` each output by name reduced alike, ``count`` the valid tokens (0-dim int64).
    """
    check_labels_dtype(labels)
    if num_tokens is not None and opts.reduction != "mean":
        raise ValueError(f"num_tokens: only meaningful with reduction='mean', got reduction={opts.reduction!r}")
    if scale is not None and opts.reduction != "sum":
        raise ValueError(f"scale: only meaningful with reduction='sum', got reduction={opts.reduction!r}")
    prefix = "" if teacher is None else "student_"
    teacher_vocab = next((t.opts.teacher_vocab for t in terms if t.needs_teacher), None)
    placed = place(
        student.weight,
        student.bias,
        None if teacher is None else teacher.weight,
        None if teacher is None else teacher.bias,
        student.hidden.dtype,
        None if teacher is None else teacher.hidden.dtype,
        opts.parallel,
        prefix,
        teacher_vocab,
    )
    w, b = placed.weight, placed.bias
    x = _flat(student.names, student.hidden, w, b, labels)
    tx = tw = tb = None
    if teacher is not None:
        tw, tb = placed.teacher_weight, placed.teacher_bias
        tx = _flat(teacher.names, teacher.hidden, tw, tb, labels)
        # Placement left the teacher the student's rows ("drop"), or those and its padding rows.
        if tw.shape[0] < w.shape[0] or (teacher_vocab != "pad_student" and tw.shape[0] != w.shape[0]):
            raise ValueError(
                f"teacher_weight: expected vocab size {w.shape[0]} (student_weight {tuple(w.shape)}), "
                f"got {tuple(tw.shape)}"
            )
        # The teacher never gets gradients; detaching also keeps autograd from saving its graph.
        tx, tw = tx.detach(), tw.detach()
        tb = None if tb is None else tb.detach()
    vocab = w.shape[0] if placed.reducer is None else placed.reducer.vocab
    if opts.validate:
        check_label_range(labels, vocab, opts.ignore_index)
        if check_inputs is not None:
            check_inputs(vocab)
    flat_labels = labels.reshape(-1)
    count = (flat_labels != opts.ignore_index).sum()
    plan = LossPlan(tuple(terms), opts.ignore_index, opts.chunk_size, placed.reducer, opts.dw_accumulation)
    if scale is not None:
        scale = _as_scale(scale, x.device)
    elif opts.reduction == "mean":
        scale = 1.0 / (_as_count(num_tokens, x.device) if num_tokens is not None else count.double()).clamp(min=1)
    # Without grad mode (eval, torch.no_grad) Recompute's forward computes values only; the
    # grad-in-forward path would compute dX and dW for nothing.
    per_token = opts.reduction == "none"
    recompute = per_token or opts.algorithm == "recompute"
    keep = None
    if opts.drop_ignored_tokens:
        x, tx, flat_labels, keep = select_valid_rows(x, tx, flat_labels, opts.ignore_index)
        if keep is not None and inputs:
            inputs = {k: v.index_select(0, keep) for k, v in inputs.items()}
    loss, parts = run_terms(
        x, w, b, flat_labels, tx, tw, tb, plan, per_token=per_token, recompute=recompute, scale=scale, inputs=inputs
    )
    if per_token:
        loss = scatter_rows(loss, keep, labels.numel())
        parts = {k: scatter_rows(v, keep, labels.numel()) for k, v in parts.items()}
        loss = loss.reshape(labels.shape)
        parts = {k: v.reshape(labels.shape) for k, v in parts.items()}
    return loss, parts, count


def _fused_output(loss, parts, count) -> FusedOutput:
    zero = torch.zeros_like(loss.detach())
    return FusedOutput(loss, parts.get("ce", zero).detach(), parts.get("kd", zero).detach(), count)


def _parallel(process_group, vocab_parallel, vocab_start, vocab_size) -> VocabParallelOptions:
    return VocabParallelOptions(
        process_group=process_group, vocab_parallel=vocab_parallel, vocab_start=vocab_start, vocab_size=vocab_size
    )


def _distillation_setup(
    *,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    divergence,
    temperature,
    beta,
    sym_kd_ratio,
    scale_by_temperature_squared,
    ignore_index,
    reduction,
    chunk_size,
    algorithm,
    validate,
    process_group,
    vocab_parallel,
    vocab_start,
    vocab_size,
    drop_ignored_tokens,
    teacher_vocab,
    dw_accumulation="auto",
    **_,
) -> Tuple[RunOptions, KDOptions, Tuple[Side, Side]]:
    """The checks and options shared by the distillation entry points (their arguments by name)."""
    check_fused_inputs(
        labels,
        local_shard=process_group is not None,
        student_hidden=student_hidden,
        student_weight=student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
    )
    check_run_options(chunk_size, validate, vocab_parallel, vocab_start, vocab_size)
    opts = RunOptions(
        reduction=reduction,
        algorithm=algorithm,
        validate=validate,
        chunk_size=chunk_size,
        drop_ignored_tokens=drop_ignored_tokens,
        ignore_index=ignore_index,
        parallel=_parallel(process_group, vocab_parallel, vocab_start, vocab_size),
        dw_accumulation=dw_accumulation,
    )
    kd = KDOptions(
        divergence=divergence,
        temperature=temperature,
        scale_by_temperature_squared=scale_by_temperature_squared,
        beta=beta,
        sym_kd_ratio=sym_kd_ratio,
        true_kl=True,
        ignore_index=ignore_index,
        teacher_vocab=teacher_vocab,
    )
    sides = (
        Side(student_hidden, student_weight, student_bias, STUDENT_NAMES),
        Side(teacher_hidden, teacher_weight, teacher_bias, TEACHER_NAMES),
    )
    return opts, kd, sides


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    algorithm: str = "auto",
    validate: bool = True,
    drop_ignored_tokens: bool = False,
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    dw_accumulation: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, one chunk of logits at a time.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32 / bf16 / fp16; fp64 is computed in fp64).
        weight: ``[V, H]`` output projection, same dtype (a DTensor is gathered once).
        labels: ``[...]`` class ids, hidden's leading shape; ``ignore_index`` marks skipped tokens.
        bias: ``[V]`` or None.
        reduction: ``"mean"`` over valid tokens (0 if none), ``"sum"``, or ``"none"`` (labels' shape).
        label_smoothing, z_loss, softcap: see :class:`tune_losses.options.CEOptions`.
        chunk_size: tokens per chunk; None picks one from V and the device.
        algorithm: ``"grad_in_forward"`` (default for mean / sum), ``"recompute"`` (always for none),
            or ``"auto"``.
        validate: check the label range (one host sync per call).
        drop_ignored_tokens: leave the rows of ignored tokens out before the chunk loop: no logits
            and no matmul work for them (a saving where many tokens are prompt or padding), at
            one host sync per call to find the rows. Values and gradients are unchanged.
        process_group: vocabulary parallelism with a local shard: ``weight`` (and ``bias``) hold this
            rank's consecutive rows of the ``[V, H]`` projection, ranks in group order; hidden states
            and labels are the same on every rank of the group. Values and the hidden-state gradient
            come back complete on every rank, the weight gradient for the local rows.
        vocab_parallel: for a DTensor weight: None (auto) treats ``Shard(0)`` on a mesh dimension named
            ``tp`` / ``tensor`` as vocabulary-parallel over it (other mesh dimensions, e.g. FSDP2's
            ``dp``, are gathered once per call) and gathers any other DTensor once per call; True
            requires vocabulary parallelism, False never uses it.
        vocab_start, vocab_size: with ``process_group``, this shard's first row and the global V;
            when not both given, one all-gather of the shard sizes (and a host read) finds them.
        num_tokens: with ``reduction="mean"``: divide by this count (e.g. the valid tokens of the
            whole optimizer step, a 0-dim tensor) instead of this call's. The ``1 / num_tokens``
            then reaches the gradients in fp32 before any low-precision cast, as in eager PyTorch.
        scale: with ``reduction="sum"``: multiply the sum by this factor (a 0-dim tensor such as
            ``1 / global_count``), applied to the gradients in fp32 as ``num_tokens`` is.
        dw_accumulation: ``"auto"`` (default), ``"fp32"``, ``"blocked"`` or ``"chunk"``: how the
            weight gradient is summed over chunks (precision against memory; see
            :mod:`tune_losses.fused.dw_accumulation`).

    Returns:
        fp32 loss (fp64 for fp64 inputs): 0-dim, or per token for ``reduction="none"``.
    """
    check_fused_inputs(labels, local_shard=process_group is not None, hidden=hidden, weight=weight, bias=bias)
    check_run_options(chunk_size, validate, vocab_parallel, vocab_start, vocab_size)
    opts = RunOptions(
        reduction=reduction,
        algorithm=algorithm,
        validate=validate,
        chunk_size=chunk_size,
        drop_ignored_tokens=drop_ignored_tokens,
        ignore_index=ignore_index,
        parallel=_parallel(process_group, vocab_parallel, vocab_start, vocab_size),
        dw_accumulation=dw_accumulation,
    )
    term = CrossEntropyTerm(
        CEOptions(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            validate=validate,
        )
    )
    loss, _, _ = _run([term], Side(hidden, weight, bias), None, labels, opts, num_tokens, scale)
    return loss


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    drop_ignored_tokens: bool = False,
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    dw_accumulation: str = "auto",
):
    """Per-token log-probability of the label, ``log softmax(hidden @ weight.T + bias) / T)[label]``,
    one chunk of logits at a time (the building block of DPO / GRPO-style losses).

    Args:
        hidden: ``[..., H]``; weight ``[V, H]``; bias ``[V]`` or None (placements as
            :func:`linear_cross_entropy`, ``process_group`` / ``vocab_parallel`` included).
        labels: ``[...]`` class ids; ``ignore_index`` marks tokens whose outputs are 0.
        temperature: T, the logits are divided by it.
        return_entropy: also return the entropy ``-sum_v q_v log q_v`` of each token's distribution.
        dw_accumulation: as :func:`linear_cross_entropy`.

    Returns:
        ``log_probs`` ``[...]`` (labels' shape, fp32; fp64 for fp64 inputs), or the pair
        ``(log_probs, entropy)``. Both are differentiable with respect to hidden, weight and bias,
        each with its own per-token ``grad_output`` (the backward recomputes the chunks).
    """
    check_fused_inputs(labels, local_shard=process_group is not None, hidden=hidden, weight=weight, bias=bias)
    check_run_options(chunk_size, validate, vocab_parallel, vocab_start, vocab_size)
    check_float_option("temperature", temperature, 0.0, low_open=True)
    check_bool_option("return_entropy", return_entropy)
    opts = RunOptions(
        reduction="none",
        algorithm="recompute",
        validate=validate,
        chunk_size=chunk_size,
        drop_ignored_tokens=drop_ignored_tokens,
        ignore_index=ignore_index,
        parallel=_parallel(process_group, vocab_parallel, vocab_start, vocab_size),
        dw_accumulation=dw_accumulation,
    )
    term = LogProbTerm(temperature=float(temperature), entropy=bool(return_entropy))
    log_probs, parts, _ = _run([term], Side(hidden, weight, bias), None, labels, opts)
    return (log_probs, parts["entropy"]) if return_entropy else log_probs


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    sym_kd_ratio: float = 0.5,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    algorithm: str = "auto",
    validate: bool = True,
    drop_ignored_tokens: bool = False,
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    teacher_vocab: Optional[str] = None,
    dw_accumulation: str = "auto",
) -> torch.Tensor:
    """Distillation divergence between teacher and student, never materializing either's logits.

    Args:
        student_hidden: ``[..., Hs]``; student_weight ``[V, Hs]``.
        teacher_hidden: ``[..., Ht]``; teacher_weight ``[V, Ht]`` (no gradient flows to the teacher).
        labels: ``[...]``; only tokens with ``labels != ignore_index`` count.
        divergence: ``forward_kl`` (KL(p||q), p teacher, q student), ``reverse_kl``, ``symmetric_kl``,
            ``jsd`` (generalized, ``beta``), ``tvd``. True divergences: 0 when the two agree.
        temperature: both sides' logits divided by T; the loss times T^2 (``scale_by_temperature_squared``).
        reduction: ``mean`` over valid tokens, ``sum`` or ``none``.
        validate: check that every label is in ``[0, V)`` or ``ignore_index`` (one host sync per
            call). The divergence reads only the ignore mask, but a label outside the vocabulary
            (e.g. -1 meant as "ignore" under ``ignore_index=-100``) would otherwise count silently.
        process_group, vocab_parallel, vocab_start, vocab_size: as :func:`linear_cross_entropy`.
            Vocabulary-parallel, the teacher's weight is sharded like the student's (a DTensor
            on the same rows, or with ``process_group`` its local shard of the same rows); a
            teacher weight that is not vocabulary-parallel is gathered and its rows sliced.
        num_tokens, scale: as :func:`linear_cross_entropy`.
        teacher_vocab: a teacher_weight with more rows than student_weight (padding rows, e.g.
            Qwen2.5 7B's 152064 against 0.5B's 151936): None (default) makes any size mismatch an
            error naming both sizes (another tokenizer's rows mean other tokens); ``"drop"`` compares the shared first
            ``V_s`` rows, the teacher's softmax taken over them only (its extra rows' logits are never
            made); ``"pad_student"`` keeps the teacher's whole softmax and pads the student's logits
            with zeros (Liger-Kernel's convention). A smaller teacher vocabulary is an error.
        dw_accumulation: as :func:`linear_cross_entropy` (``"blocked"`` not with ``teacher_vocab="pad_student"``).

    Returns:
        fp32 loss, 0-dim or per token.
    """
    args = dict(locals())
    opts, kd, sides = _distillation_setup(**args)
    loss, _, _ = _run([DivergenceTerm(kd)], *sides, labels, opts, num_tokens, scale)
    return loss


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    kd_ratio: float = 0.5,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    sym_kd_ratio: float = 0.5,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    algorithm: str = "auto",
    validate: bool = True,
    drop_ignored_tokens: bool = False,
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    teacher_vocab: Optional[str] = None,
    dw_accumulation: str = "auto",
) -> FusedOutput:
    """``(1 - kd_ratio) * CE(student, labels) + kd_ratio * KD(student, teacher)``; each chunk of student
    logits is made once and serves both terms.

    Both terms are normalized over the same valid tokens. Arguments as :func:`linear_kd_loss`
    (``process_group``, ``vocab_parallel``, ``vocab_start``, ``vocab_size``, ``num_tokens``, ``scale``,
    ``teacher_vocab``, ``drop_ignored_tokens``, ``dw_accumulation`` included).

    Returns:
        :class:`FusedOutput`: ``loss`` (differentiable), ``ce`` and ``kd`` (detached, same reduction,
        for logging), ``num_tokens`` (this call's valid tokens).
    """
    args = dict(locals())
    check_float_option("kd_ratio", kd_ratio, 0.0, 1.0)
    opts, kd, sides = _distillation_setup(**args)
    ce = CEOptions(ignore_index=ignore_index, label_smoothing=label_smoothing, validate=validate)
    terms = [CrossEntropyTerm(ce, weight=1.0 - kd_ratio), DivergenceTerm(kd, weight=float(kd_ratio))]
    loss, parts, count = _run(terms, *sides, labels, opts, num_tokens, scale)
    return _fused_output(loss, parts, count)
