"""torchtune-API losses over lists of per-chunk logits (drop-in for torchtune 0.6.1).

Class names and constructor / ``forward`` signatures are torchtune's, so YAML configs and recipes
that name ``CEWithChunkedOutputLoss`` keep working. What differs from torchtune 0.6.1:

* labels are split by the sizes of the chunks actually given, not re-chunked by a count;
* a batch with no valid token gives 0 with zero gradients, never NaN;
* each chunk's loss saves only the chunk itself for backward, which recomputes its fp32 upcast and
  the closed-form gradient (:mod:`tune_losses.terms`, the fused losses' math), so eager mode keeps
  one fp32 chunk alive, not all of them;
* every loss also reports ``(sum, num_tokens)`` via :meth:`sum_and_count`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, List, Optional, Sequence, Union

import torch

from tune_losses.accounting import LossSum
from tune_losses.chunking import split_like
from tune_losses.divergences import Divergence, VocabReducer, divergence_names, get_divergence
from tune_losses.options import (
    IGNORE_INDEX,
    ArgumentTypeError,
    CEOptions,
    KDOptions,
    check_bool_option,
    check_int_option,
)
from tune_losses.terms import Chunk, CrossEntropyTerm, DivergenceTerm, Term
from tune_losses.validation import (
    check_chunk_list,
    check_label_range,
    check_labels_dtype,
    check_paired_chunks,
)

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_chunks(name: str, logits: Logits, labels: torch.Tensor) -> List[torch.Tensor]:
    """A single ``[B, S, V]`` tensor becomes a one-chunk list; a ``[N, V]`` tensor a ``[1, N, V]`` chunk.

    ``labels`` have been through :func:`_as_2d_labels` (with ``logits`` as ``like``) already, so
    ``[N, V]`` logits meet ``[1, N]`` labels here.
    """
    if isinstance(logits, torch.Tensor):
        # torchtune's unchunked calling convention: [N, V] logits with [N] labels.
        if logits.dim() == 2:
            return [logits.unsqueeze(0)]
        return [logits]
    if not isinstance(logits, (list, tuple)):
        raise ArgumentTypeError(
            f"{name}: expected a list of [B, S_i, V] tensors or one tensor, got {type(logits).__name__}"
        )
    return list(logits)


def _as_2d_labels(labels: torch.Tensor, like: Optional[Logits] = None) -> torch.Tensor:
    check_labels_dtype(labels)
    if isinstance(like, torch.Tensor) and like.dim() == 2 and labels.numel() == like.shape[0]:
        # [N, V] logits pair with the N labels in any shape: [N], or the [B, S] (B * S = N) that
        # torchtune 0.6.1's unchunked KD losses document and flatten.
        return labels.reshape(1, -1)
    if labels.dim() == 1:
        return labels.unsqueeze(0)
    if labels.dim() != 2:
        raise ValueError(f"labels: expected shape [B, S] (or [N]), got {tuple(labels.shape)}")
    return labels


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TermOnLogits(torch.autograd.Function):
    """A term's first output summed over one flat chunk of logits ``[n, V]``.

    Forward computes values only and saves the chunk itself (no fp32 copy); backward recomputes the
    upcast and the term's closed-form gradient times ``grad_output``, in the chunk's dtype.
    """

    @staticmethod
    def forward(ctx, z, zt, labels, term: Term, ignore_index: int):
        ctx.save_for_backward(z, zt, labels)
        ctx.term, ctx.ignore_index = term, ignore_index
        (values, *_), _ = term.compute(
            _chunk(z, zt, labels, ignore_index),
            None,
            z.dtype != _compute_dtype(z.dtype),
            zt is not None and zt.dtype != _compute_dtype(zt.dtype),
        )
        return values.sum()

    @staticmethod
    def backward(ctx, grad):
        z, zt, labels = ctx.saved_tensors
        chunk = _chunk(z, zt, labels, ctx.ignore_index, zero_ignored_rows=True)
        weight = chunk.valid.to(chunk.student.dtype) * grad.to(chunk.student.dtype)
        weights = [weight] + [None] * (len(ctx.term.outputs) - 1)
        if zt is not None and ctx.needs_input_grad[1]:
            g, gt = ctx.term.teacher_gradients(chunk, weight, weight)
            return g.to(z.dtype), gt.to(zt.dtype), None, None, None
        # The chunk's buffers are fresh copies (ignored rows zeroed): the math may overwrite them.
        _, g = ctx.term.compute(chunk, weights, True, True)
        return g.to(z.dtype), None, None, None, None


def _chunk(z, zt, labels, ignore_index: int, zero_ignored_rows: bool = False) -> Chunk:
    """The chunk in the compute dtype. ``zero_ignored_rows`` (gradients): fresh copies whose ignored
    tokens' logits are 0, so a non-finite logit at a token the loss leaves out (e.g. a padding
    position) cannot turn its zero gradient into 0 * NaN."""
    cdtype = _compute_dtype(z.dtype)
    valid = labels != ignore_index

    def upcast(t):
        if t is None or not zero_ignored_rows:
            return None if t is None else t.to(cdtype)
        return t.to(cdtype, copy=True).masked_fill_(~valid.unsqueeze(-1), 0.0)

    return Chunk(upcast(z), upcast(zt), labels, valid, VocabReducer(z.shape[-1]))


def _chunk_sum(
    term: Term, ignore_index: int, z: torch.Tensor, labels: torch.Tensor, zt: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``term``'s summed loss over one ``[B, S_i, V]`` chunk (and the teacher's) with labels ``[B, S_i]``."""
    flat = z.reshape(-1, z.shape[-1])
    flat_t = None if zt is None else zt.reshape(-1, zt.shape[-1])
    return _TermOnLogits.apply(flat, flat_t, labels.reshape(-1), term, ignore_index)


class _ChunkedLossBase(torch.nn.Module):
    """Shared loop: split labels like the chunks, sum per-chunk losses, count valid tokens."""

    def __init__(self, num_output_chunks: int, ignore_index: int):
        super().__init__()
        check_int_option("num_output_chunks", num_output_chunks, 1)
        check_int_option("ignore_index", ignore_index)
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index


class CEWithChunkedOutputLoss(_ChunkedLossBase):
    """Cross-entropy over a list of logit chunks, one fp32 chunk at a time.

    Args:
        num_output_chunks: how many chunks the model is asked to emit (read by recipes; the loss
            itself accepts whatever chunks it is given).
        ignore_index: label value left out of the loss and of the token count.
        label_smoothing, z_loss, softcap: see :class:`tune_losses.options.CEOptions` (not in torchtune).
        validate: check the label range once per call (one host sync); off for speed.
    """

    def __init__(
        self,
        num_output_chunks: int = 8,
        ignore_index: int = IGNORE_INDEX,
        *,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        validate: bool = True,
    ):
        super().__init__(num_output_chunks, ignore_index)
        self.opts = CEOptions(ignore_index, label_smoothing, z_loss, softcap, validate)
        self.term = CrossEntropyTerm(self.opts)

    def compute_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one flattened chunk ``[n, V]`` / ``[n]`` (torchtune's hook name)."""
        return _chunk_sum(self.term, self.ignore_index, logits, labels)

    def sum_and_count(self, logits: Logits, labels: torch.Tensor) -> LossSum:
        """``(sum of per-token CE over valid tokens, valid-token count)``.

        Args:
            logits: list of ``[B, S_i, V]`` chunks (sum of S_i = S), or one ``[B, S, V]`` tensor.
            labels: ``[B, S]``, already shifted.
        """
        labels = _as_2d_labels(labels, like=logits)
        chunks = _as_chunks("logits", logits, labels)
        vocab = check_chunk_list("logits", chunks, labels)
        if self.opts.validate:
            check_label_range(labels, vocab, self.ignore_index)
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for chunk, lab in zip(chunks, split_like(labels, chunks)):
            total = total + self.compute_cross_entropy(chunk, lab)
        return LossSum(total, (labels != self.ignore_index).sum())

    def forward(self, logits: Logits, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE over valid tokens, a 0-dim fp32 tensor (0 when no token is valid).

        Args:
            logits: list of ``[B, S_i, V]`` chunks or one ``[B, S, V]`` tensor, any float dtype.
            labels: ``[B, S]``.
        """
        return self.sum_and_count(logits, labels).mean()


class _KDLoss(_ChunkedLossBase):
    """A distillation divergence over chunk lists (or single tensors); one fp32 chunk pair at a time."""

    def __init__(self, num_output_chunks: int, opts: KDOptions):
        super().__init__(num_output_chunks, opts.ignore_index)
        self.opts = opts
        self.term = DivergenceTerm(opts)

    def sum_and_count(self, student_logits: Logits, teacher_logits: Logits, labels: torch.Tensor) -> LossSum:
        """``(sum of per-token divergence over valid tokens, valid-token count)``.

        Args:
            student_logits, teacher_logits: lists of ``[B, S_i, V]`` chunks of equal shapes, or one
                ``[B, S, V]`` (or ``[N, V]``) tensor each. The teacher needs no grad. The teacher's
                ``V_t`` may exceed the student's ``V_s`` (padding rows, ``teacher_vocab``).
            labels: ``[B, S]`` (or ``[N]``); only their ignore mask is used, but with ``validate`` on
                every label must be in ``[0, V)`` or ``ignore_index`` (as for cross-entropy).
        """
        labels = _as_2d_labels(labels, like=student_logits)
        student = _as_chunks("student_logits", student_logits, labels)
        teacher = _as_chunks("teacher_logits", teacher_logits, labels)
        vocab = check_chunk_list("student_logits", student, labels)
        check_chunk_list("teacher_logits", teacher, labels)
        check_paired_chunks(student, teacher, wider_teacher=True)
        if self.opts.validate:
            check_label_range(labels, vocab, self.ignore_index)
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for s, t, lab in zip(student, teacher, split_like(labels, student, name="student_logits")):
            total = total + _chunk_sum(self.term, self.ignore_index, s, lab, t)
        return LossSum(total, (labels != self.ignore_index).sum())

    def forward(
        self, student_logits: Logits, teacher_logits: Logits, labels: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Mean divergence over valid tokens (0-dim fp32; 0 when none is valid), or the sum if not ``normalize``."""
        check_bool_option("normalize", normalize)
        result = self.sum_and_count(student_logits, teacher_logits, labels)
        return result.mean() if normalize else result.total


# --- one chunked KD class per registered divergence (torchtune's names, positional orders, defaults) ----
# ``ForwardKL`` gives ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100, *, ...)
# and ForwardKLLoss(ignore_index=-100, *, ...); a divergence's ``torchtune_args`` (JSD: beta,
# SymmetricKL: sym_kd_ratio) come between num_output_chunks and ignore_index, as in torchtune.
# Extras, keyword-only everywhere: the other KDOptions fields (temperature,
# scale_by_temperature_squared, validate, teacher_vocab, true_kl, ...).
#
# true_kl: the drop-in classes of torchtune's forward-KL family (ForwardKL*, SymmetricKL*) default
# to torchtune's logged value -sum p log q (true_kl=False: the same gradient, KL plus the teacher's
# entropy), so a torchtune config reproduces torchtune's numbers; everything else in the package
# (the fused losses, KDOptions, DivergenceWithChunkedOutputLoss) defaults to the true KL. The
# default lives in one place: Divergence.chunked_defaults.


class DivergenceWithChunkedOutputLoss(_KDLoss):
    """Any registered divergence (``divergence=``, :func:`tune_losses.divergences.divergence_names`)
    over chunk lists; the other keywords are :class:`~tune_losses.options.KDOptions` fields."""

    def __init__(
        self, num_output_chunks: int = 8, ignore_index: int = IGNORE_INDEX, *, divergence: str = "forward_kl", **options
    ):
        super().__init__(num_output_chunks, KDOptions(divergence, ignore_index=ignore_index, **options))


_KD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KDOptions)}
_COMMON_KD_OPTIONS = ("temperature", "scale_by_temperature_squared", "validate", "teacher_vocab")


def _registered_class(div: Divergence, chunked: bool) -> type:
    """The torchtune-style class of one registered divergence (chunked, or the unchunked one)."""
    positional = (("num_output_chunks",) if chunked else ()) + tuple(div.torchtune_args) + ("ignore_index",)
    fixed = {"divergence", "ignore_index", *div.torchtune_args}
    keyword = [n for n in _KD_DEFAULTS if n not in fixed and (n in _COMMON_KD_OPTIONS or n in div.options)]
    defaults = dict(_KD_DEFAULTS, num_output_chunks=8, **div.chunked_defaults)

    def __init__(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(
                f"{type(self).__name__}: at most {len(positional)} positional arguments {positional}, got {len(args)}"
            )
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}: got multiple values for argument {name!r}")
            kwargs[name] = value
        unknown = set(kwargs) - set(positional) - set(keyword)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected keyword arguments {sorted(unknown)}")
        values = {n: kwargs.get(n, defaults[n]) for n in positional + tuple(keyword)}
        chunks = values.pop("num_output_chunks", 1)
        _KDLoss.__init__(self, chunks, KDOptions(div.name, **values))
        for name in div.torchtune_args:  # torchtune keeps these as attributes
            setattr(self, name, values[name])

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in positional]
    params += [P(n, P.KEYWORD_ONLY, default=defaults[n]) for n in keyword]
    setattr(__init__, "__signature__", inspect.Signature(params))  # noqa: B010 - help() and config checks read it
    stem = div.chunked_name
    name = f"{stem}WithChunkedOutputLoss" if chunked else f"{stem}Loss"
    doc = (type(div).__doc__ or div.name).strip().splitlines()[0]
    what = "over chunk lists" if chunked else "unchunked: one [N, V] / [B, S, V] tensor per side"
    cls = type(
        name,
        (_KDLoss,),
        {"__init__": __init__, "__doc__": f"{doc} ({what}; divergence={div.name!r}).", "__module__": __name__},
    )
    setattr(cls, "__signature__", inspect.Signature(params[1:]))  # noqa: B010
    return cls


KD_LOSS_CLASSES: Dict[str, type] = {}
for _div in (get_divergence(n) for n in divergence_names()):
    if _div.chunked_name:
        for _chunked in (True, False):
            _cls = _registered_class(_div, _chunked)
            KD_LOSS_CLASSES[_cls.__name__] = _cls
globals().update(KD_LOSS_CLASSES)
# Named here too, so that readers and linters see the torchtune classes this module provides.
ForwardKLWithChunkedOutputLoss = KD_LOSS_CLASSES["ForwardKLWithChunkedOutputLoss"]
ReverseKLWithChunkedOutputLoss = KD_LOSS_CLASSES["ReverseKLWithChunkedOutputLoss"]
SymmetricKLWithChunkedOutputLoss = KD_LOSS_CLASSES["SymmetricKLWithChunkedOutputLoss"]
JSDWithChunkedOutputLoss = KD_LOSS_CLASSES["JSDWithChunkedOutputLoss"]
TVDWithChunkedOutputLoss = KD_LOSS_CLASSES["TVDWithChunkedOutputLoss"]
ForwardKLLoss = KD_LOSS_CLASSES["ForwardKLLoss"]
ReverseKLLoss = KD_LOSS_CLASSES["ReverseKLLoss"]
SymmetricKLLoss = KD_LOSS_CLASSES["SymmetricKLLoss"]
JSDLoss = KD_LOSS_CLASSES["JSDLoss"]
TVDLoss = KD_LOSS_CLASSES["TVDLoss"]
