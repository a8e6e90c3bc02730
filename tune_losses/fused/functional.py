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
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from tune_losses.deprecation import no_more, options_object, take
from tune_losses.fused.engine import LossPlan, run_terms
from tune_losses.fused.placement import place
from tune_losses.fused.valid_rows import scatter_rows, select_valid_rows
from tune_losses.options import (
    ALGORITHMS,
    IGNORE_INDEX,
    CEOptions,
    DistillationOptions,
    ExecutionOptions,
    KDOptions,
    VocabParallelOptions,
    check_bool_option,
    check_float_option,
    check_int_option,
    check_reduction,
)
from tune_losses.terms import CrossEntropyTerm, DivergenceTerm, LogProbTerm, Term
from tune_losses.validation import check_float, check_fused_inputs, check_label_range, check_labels_dtype

__all__ = [
    "ALGORITHMS",
    "FusedOutput",
    "linear_cross_entropy",
    "linear_log_probs",
    "linear_kd_loss",
    "linear_distillation_loss",
    "flat_distillation_options",
]


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
        validate: check the label range (one host sync per call).
        chunk_size: tokens per chunk, or None for the default rule.
        ignore_index: label value of tokens left out.
        parallel: where the weights live (:class:`VocabParallelOptions`).
        execution: ``algorithm`` (``auto``, ``grad_in_forward`` or ``recompute``, see
            :mod:`tune_losses.fused.engine`), ``drop_ignored_tokens`` (leave ignored tokens' rows out
            before the chunk loop, :mod:`tune_losses.fused.valid_rows`; one host sync per call) and
            ``dw_accumulation`` (:mod:`tune_losses.fused.dw_accumulation`), checked when made
            (:class:`ExecutionOptions`).
    """

    reduction: str = "mean"
    validate: bool = True
    chunk_size: Optional[int] = None
    ignore_index: int = IGNORE_INDEX
    parallel: VocabParallelOptions = field(default_factory=VocabParallelOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self):
        # reduction and chunk_size are the flat arguments no other options object checks; the rest
        # come from CEOptions / KDOptions / ExecutionOptions / VocabParallelOptions, checked when made.
        check_reduction(self.reduction)
        check_int_option("chunk_size", self.chunk_size, 1, allow_none=True)


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
    teacher_vocab = next((t.opts.teacher_vocab for t in terms if isinstance(t, DivergenceTerm)), None)
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
        assert tw is not None  # place() gives a teacher weight whenever it is given one
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
    execution = opts.execution
    plan = LossPlan(tuple(terms), opts.ignore_index, opts.chunk_size, placed.reducer, execution.dw_accumulation)
    if scale is not None:
        scale = _as_scale(scale, x.device)
    elif opts.reduction == "mean":
        scale = 1.0 / (_as_count(num_tokens, x.device) if num_tokens is not None else count.double()).clamp(min=1)
    # Without grad mode (eval, torch.no_grad) Recompute's forward computes values only; the
    # grad-in-forward path would compute dX and dW for nothing.
    per_token = opts.reduction == "none"
    recompute = per_token or execution.algorithm == "recompute"
    keep = None
    if execution.drop_ignored_tokens:
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


def mix_terms(options, kd_term: Callable[..., Term]) -> List[Term]:
    """The terms of ``(1 - kd_ratio) * CE + kd_ratio * KD`` from a DistillationOptions or a
    SparseDistillationOptions and the KD term's class. CE first: at T = 1 it leaves the student's
    (max, sum exp) for the KD term to reuse."""
    return [
        CrossEntropyTerm(options.ce, weight=1.0 - options.kd_ratio),
        kd_term(options.kd, weight=float(options.kd_ratio)),
    ]


def _fused_output(loss, parts, count) -> FusedOutput:
    zero = torch.zeros_like(loss.detach())
    return FusedOutput(loss, parts.get("ce", zero).detach(), parts.get("kd", zero).detach(), count)


# ------------------------------------------------------------------- old flat keyword arguments

_PARALLEL_FIELDS = ("process_group", "vocab_parallel", "vocab_start", "vocab_size")
_EXECUTION_FIELDS = ("algorithm", "drop_ignored_tokens", "dw_accumulation")
_CE_FIELDS = ("label_smoothing", "z_loss", "softcap", "validate")
_KD_FIELDS = (
    "divergence",
    "temperature",
    "beta",
    "sym_kd_ratio",
    "scale_by_temperature_squared",
    "ignore_index",
    "validate",
    "teacher_vocab",
)


_option = options_object
_take = take
_no_more = no_more


_DISTILLATION_FIELDS = ("kd_ratio", "label_smoothing") + _KD_FIELDS


def flat_distillation_options(flat: Dict[str, object], ignore_index: int) -> Dict[str, object]:
    """Keyword arguments of :func:`linear_distillation_loss` in the object form, from flat ones (no
    warning), for APIs that take them flat (e.g. Transformers' ``distillation_loss(**loss_options)``):
    the distillation fields become ``options``, the placement and execution ones ``parallel`` and
    ``execution``; other keywords (``chunk_size``, ...) pass through. ``ignore_index`` holds for the call."""
    kw = dict(flat)
    given = _take(kw, _DISTILLATION_FIELDS)
    if "ignore_index" in given:
        raise ValueError("ignore_index: give it as the function's own argument, not among the loss options")
    options = kw.get("options")
    if options is None:
        kw["options"] = DistillationOptions.from_flat(**given, ignore_index=ignore_index)
    elif given:
        raise TypeError(f"{', '.join(f'{k}=' for k in given)} and options= both given; put them in options=")
    elif isinstance(options, DistillationOptions) and options.kd.ignore_index != ignore_index:
        raise ValueError(
            f"ignore_index: got {ignore_index!r}, but options.kd.ignore_index is {options.kd.ignore_index!r}"
        )
    for param, cls, fields in (
        ("parallel", VocabParallelOptions, _PARALLEL_FIELDS),
        ("execution", ExecutionOptions, _EXECUTION_FIELDS),
    ):
        kw[param] = _option("distillation_loss", param, cls, kw.get(param), {}, _take(kw, fields))
    return kw


def _placement_and_execution(fn: str, parallel, execution, deprecated: Dict[str, object]):
    """The ``parallel`` and ``execution`` objects (old flat keywords folded in); no keyword left over."""
    parallel = _option(fn, "parallel", VocabParallelOptions, parallel, _take(deprecated, _PARALLEL_FIELDS))
    execution = _option(fn, "execution", ExecutionOptions, execution, _take(deprecated, _EXECUTION_FIELDS))
    _no_more(fn, deprecated)
    return parallel, execution


def _run_options(reduction, chunk_size, ignore_index, validate, parallel, execution) -> RunOptions:
    return RunOptions(reduction, validate, chunk_size, ignore_index, parallel, execution)


# ----------------------------------------------------------------------------- public functions


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: Optional[int] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    options: Optional[CEOptions] = None,
    parallel: Optional[VocabParallelOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, one chunk of logits at a time.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32 / bf16 / fp16; fp64 is computed in fp64).
        weight: ``[V, H]`` output projection, same dtype (a DTensor is gathered once).
        labels: ``[...]`` class ids, hidden's leading shape; ``ignore_index`` marks skipped tokens.
        bias: ``[V]`` or None.
        ignore_index: label value left out (default: ``options.ignore_index``, -100); given with
            ``options``, the two must agree.
        reduction: ``"mean"`` over valid tokens (0 if none), ``"sum"``, or ``"none"`` (labels' shape).
        chunk_size: tokens per chunk; None picks one from V and the device
            (:func:`tune_losses.chunking.chunk_policy`).
        num_tokens: with ``reduction="mean"``: divide by this count (e.g. the valid tokens of the
            whole optimizer step, a 0-dim tensor) instead of this call's. The ``1 / num_tokens``
            then reaches the gradients in fp32 before any low-precision cast, as in eager PyTorch.
        scale: with ``reduction="sum"``: multiply the sum by this factor (a 0-dim tensor such as
            ``1 / global_count``), applied to the gradients in fp32 as ``num_tokens`` is.
        options: :class:`~tune_losses.options.CEOptions`: label smoothing, z-loss, softcap,
            ``validate`` (check the label range, one host sync per call).
        parallel: :class:`~tune_losses.options.VocabParallelOptions`: where the weight's vocabulary
            rows live (a local shard with ``process_group``: values and the hidden-state gradient come
            back complete on every rank, the weight gradient for the local rows).
        execution: :class:`~tune_losses.options.ExecutionOptions`: ``algorithm``,
            ``drop_ignored_tokens`` (same results, different work).
        deprecated: the old flat keywords (``label_smoothing``, ``z_loss``, ``softcap``, ``validate``,
            ``algorithm``, ``drop_ignored_tokens``, ``process_group``, ``vocab_parallel``,
            ``vocab_start``, ``vocab_size``) still work, with a DeprecationWarning naming the new form.

    Returns:
        fp32 loss (fp64 for fp64 inputs): 0-dim, or per token for ``reduction="none"``.
    """
    fn = "linear_cross_entropy"
    options = _option(fn, "options", CEOptions, options, _take(deprecated, _CE_FIELDS), {"ignore_index": ignore_index})
    parallel, execution = _placement_and_execution(fn, parallel, execution, deprecated)
    check_fused_inputs(labels, local_shard=parallel.process_group is not None, hidden=hidden, weight=weight, bias=bias)
    opts = _run_options(reduction, chunk_size, options.ignore_index, options.validate, parallel, execution)
    loss, _, _ = _run([CrossEntropyTerm(options)], Side(hidden, weight, bias), None, labels, opts, num_tokens, scale)
    return loss


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    drop_ignored_tokens: bool = False,
    dw_accumulation: str = "auto",
    parallel: Optional[VocabParallelOptions] = None,
    **deprecated,
):
    """Per-token log-probability of the label, ``log softmax(hidden @ weight.T + bias) / T)[label]``,
    one chunk of logits at a time (the building block of DPO / GRPO-style losses).

    Args:
        hidden: ``[..., H]``; weight ``[V, H]``; bias ``[V]`` or None (placements as
            :func:`linear_cross_entropy`, ``parallel`` included).
        labels: ``[...]`` class ids; ``ignore_index`` marks tokens whose outputs are 0.
        temperature: T, the logits are divided by it.
        return_entropy: also return the entropy ``-sum_v q_v log q_v`` of each token's distribution.
        chunk_size, validate, drop_ignored_tokens, dw_accumulation: as :func:`linear_cross_entropy`
            (the last two are :class:`~tune_losses.options.ExecutionOptions` fields there).
        deprecated: the old flat ``process_group``, ``vocab_parallel``, ``vocab_start``,
            ``vocab_size`` still work (a DeprecationWarning names ``parallel=``).

    Returns:
        ``log_probs`` ``[...]`` (labels' shape, fp32; fp64 for fp64 inputs), or the pair
        ``(log_probs, entropy)``. Both are differentiable with respect to hidden, weight and bias,
        each with its own per-token ``grad_output`` (the backward recomputes the chunks).
    """
    fn = "linear_log_probs"
    parallel = _option(fn, "parallel", VocabParallelOptions, parallel, _take(deprecated, _PARALLEL_FIELDS))
    _no_more(fn, deprecated)
    check_int_option("ignore_index", ignore_index)
    check_bool_option("validate", validate)
    check_float_option("temperature", temperature, 0.0, low_open=True)
    check_bool_option("return_entropy", return_entropy)
    execution = ExecutionOptions("recompute", drop_ignored_tokens, dw_accumulation)
    opts = _run_options("none", chunk_size, ignore_index, validate, parallel, execution)
    return log_probs_run(Side(hidden, weight, bias), labels, opts, temperature, return_entropy)


def log_probs_run(side: Side, labels: torch.Tensor, opts: RunOptions, temperature: float, return_entropy: bool):
    """:func:`linear_log_probs` once its options are checked (``opts`` made once per call; its
    ``reduction`` is ``"none"``): checks ``side``'s tensors under their argument names and runs the
    log-probability term. The alignment losses call this for each model side of one call."""
    h, w, b = side.names
    local = opts.parallel.process_group is not None
    check_fused_inputs(labels, local_shard=local, **{h: side.hidden, w: side.weight, b: side.bias})
    term = LogProbTerm(temperature=float(temperature), entropy=bool(return_entropy))
    log_probs, parts, _ = _run([term], side, None, labels, opts)
    return (log_probs, parts["entropy"]) if return_entropy else log_probs


def _two_model_run(fn: str, terms: Sequence[Term], kd: KDOptions, call: Dict[str, Any]):
    """The run :func:`linear_kd_loss` and :func:`linear_distillation_loss` share: the placement and
    execution objects (old flat keywords folded in, with a DeprecationWarning), both models' tensors
    checked, one chunk pass. ``call``: the public function's arguments by name; ``kd`` the divergence's
    options (its ``ignore_index`` and ``validate`` hold for the call)."""
    parallel, execution = _placement_and_execution(fn, call["parallel"], call["execution"], call["deprecated"])
    student = Side(call["student_hidden"], call["student_weight"], call["student_bias"], STUDENT_NAMES)
    teacher = Side(call["teacher_hidden"], call["teacher_weight"], call["teacher_bias"], TEACHER_NAMES)
    labels = call["labels"]
    tensors = dict(zip(STUDENT_NAMES + TEACHER_NAMES, student[:3] + teacher[:3]))
    check_fused_inputs(labels, local_shard=parallel.process_group is not None, **tensors)
    opts = _run_options(call["reduction"], call["chunk_size"], kd.ignore_index, kd.validate, parallel, execution)
    return _run(terms, student, teacher, labels, opts, call["num_tokens"], call["scale"])


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    options: Optional[KDOptions] = None,
    parallel: Optional[VocabParallelOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> torch.Tensor:
    """Distillation divergence between teacher and student, never materializing either's logits.

    Args:
        student_hidden: ``[..., Hs]``; student_weight ``[V, Hs]``.
        teacher_hidden: ``[..., Ht]``; teacher_weight ``[V, Ht]`` (no gradient flows to the teacher).
        labels: ``[...]``; only tokens with ``labels != options.ignore_index`` count.
        reduction, chunk_size, num_tokens, scale, execution: as :func:`linear_cross_entropy`.
        options: :class:`~tune_losses.options.KDOptions`: ``divergence`` (``forward_kl`` (KL(p||q), p
            teacher, q student), ``reverse_kl``, ``symmetric_kl``, ``jsd``, ``tvd`` or any registered
            one; true divergences, 0 when the two agree), ``temperature`` (both sides' logits divided
            by T, the loss times T^2 unless ``scale_by_temperature_squared=False``), ``beta``,
            ``sym_kd_ratio``, ``true_kl``, ``ignore_index``, ``teacher_vocab`` and ``validate``: check
            that every label is in ``[0, V)`` or ``ignore_index`` (one host sync per call; the
            divergence reads only the ignore mask, but a label outside the vocabulary, e.g. -1 meant as
            "ignore" under ``ignore_index=-100``, would otherwise count silently).
        parallel: as :func:`linear_cross_entropy`. Vocabulary-parallel, the teacher's weight is
            sharded like the student's (a DTensor on the same rows, or with ``process_group`` its local
            shard of the same rows); a teacher weight that is not vocabulary-parallel is gathered and
            its rows sliced.
        deprecated: the old flat keywords (the KDOptions fields, ``algorithm``,
            ``drop_ignored_tokens`` and the vocabulary-parallel ones) still work, with a
            DeprecationWarning naming the new form.

    A teacher vocabulary of another size than the student's is an error naming both sizes unless
    ``options.teacher_vocab`` says what to do: ``"drop"`` compares the shared first ``V_s`` rows (the
    teacher's softmax over them only), ``"pad_student"`` keeps the teacher's whole softmax and pads
    the student's logits with zeros (Liger-Kernel's convention); a smaller teacher is an error.

    Returns:
        fp32 loss, 0-dim or per token.
    """
    fn = "linear_kd_loss"
    options = _option(fn, "options", KDOptions, options, _take(deprecated, _KD_FIELDS))
    loss, _, _ = _two_model_run(fn, [DivergenceTerm(options)], options, locals())
    return loss


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    num_tokens: Optional[Union[torch.Tensor, int]] = None,
    scale: Optional[Union[torch.Tensor, float]] = None,
    options: Optional[DistillationOptions] = None,
    parallel: Optional[VocabParallelOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> FusedOutput:
    """``(1 - kd_ratio) * CE(student, labels) + kd_ratio * KD(student, teacher)``; each chunk of student
    logits is made once and serves both terms.

    Both terms are normalized over the same valid tokens. ``options`` is a
    :class:`~tune_losses.options.DistillationOptions` (``kd_ratio``, ``kd``: KDOptions, ``ce``:
    CEOptions); the other arguments as :func:`linear_kd_loss`. The old flat keywords (``kd_ratio``,
    ``label_smoothing``, the KDOptions fields, ...) still work, with a DeprecationWarning.

    Returns:
        :class:`FusedOutput`: ``loss`` (differentiable), ``ce`` and ``kd`` (detached, same reduction,
        for logging), ``num_tokens`` (this call's valid tokens).
    """
    fn = "linear_distillation_loss"
    options = _option(fn, "options", DistillationOptions, options, _take(deprecated, _DISTILLATION_FIELDS))
    terms = mix_terms(options, DivergenceTerm)
    return _fused_output(*_two_model_run(fn, terms, options.kd, locals()))
