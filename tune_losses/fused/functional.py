"""Fused linear losses: final hidden states and the output weight in, a loss out; no ``[N, V]`` logits.

``linear_cross_entropy`` takes torch's ``F.linear_cross_entropy`` positional order
``(hidden, weight, labels)``; ``linear_kd_loss`` and ``linear_distillation_loss`` take student then
teacher. Each returns an ordinary tensor in the autograd graph: ``(loss * k).backward()`` and a
per-token ``grad_output`` give exact gradients.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tune_losses.accounting import normalize
from tune_losses.fused.engine import FusedSpec, GradInForward, Recompute
from tune_losses.options import CEOptions, KDOptions, check_reduction
from tune_losses.validation import check_float, check_label_range, check_labels_dtype

ALGORITHMS = ("auto", "grad_in_forward", "recompute")


class FusedOutput(NamedTuple):
    """A fused call's result: ``loss`` (reduced as asked, differentiable), its parts (detached) and the
    valid-token count (0-dim int64)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_tokens: torch.Tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def materialize_weight(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A plain tensor for the loss: an FSDP2 / DTensor weight is gathered once per call (differentiably:
    its gradient is reduce-scattered back to the shards).

    Every mesh dimension is taken as data-parallel (FSDP2's shard dimension, HSDP's replicate
    dimension): each rank's gradient of the gathered weight comes from its own tokens, so the shards
    receive the mean over the mesh's ranks, FSDP2's default reduction (sum, then / world size).
    """
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # pragma: no cover - torch without distributed
        return weight
    if not isinstance(weight, DTensor):
        return weight
    # Fix: a bare ``full_tensor()`` declares the gradient Replicate (identical on every rank), so its
    # backward only sliced each rank's *local* gradient into the shard: no cross-rank reduction, and
    # a separately sharded output layer (torchtune's ``custom_sharded_layers: [output]``) trained on
    # one rank's data (tests/test_heads.py, FSDP2 test). Partial: the backward reduce-scatters.
    mesh = weight.device_mesh
    full = weight.full_tensor(grad_placements=[Partial("sum")] * mesh.ndim)
    full = _ScaleGrad.apply(full, 1.0 / mesh.size())
    # FSDP2 with a MixedPrecisionPolicy keeps fp32 shards but computes in param_dtype: outside the
    # model's forward we see the fp32 shard, so cast the gathered weight to the compute dtype.
    return full if dtype is None or full.dtype == dtype else full.to(dtype)


def _flat(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor):
    check_float(name, hidden)
    check_float(f"{name.replace('hidden', 'weight')}", weight)
    if weight.dim() != 2:
        raise ValueError(f"{name.replace('hidden', 'weight')}: expected shape [V, H], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: expected last dimension H={weight.shape[1]} (weight {tuple(weight.shape)}), got {tuple(hidden.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), got {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name.replace('hidden', 'weight')}: expected dtype {hidden.dtype} (as {name}), got {weight.dtype}")
    if bias is not None:
        check_float(name.replace("hidden", "bias"), bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{name.replace('hidden', 'bias')}: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        # Fix: a bias of another dtype failed later inside F.linear with a RuntimeError naming no argument.
        if bias.dtype != weight.dtype:
            raise ValueError(f"{name.replace('hidden', 'bias')}: expected dtype {weight.dtype} (as the weight), got {bias.dtype}")
    return hidden.reshape(-1, hidden.shape[-1])


def _run(hidden, weight, bias, labels, t_hidden, t_weight, t_bias, spec: FusedSpec, reduction: str, algorithm: str,
         validate: bool) -> FusedOutput:
    check_reduction(reduction)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if spec.chunk_size is not None and (not isinstance(spec.chunk_size, int) or spec.chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {spec.chunk_size!r}")
    check_labels_dtype(labels)
    weight = materialize_weight(weight, hidden.dtype)
    # Fix: the KD / distillation entry points call these arguments student_hidden / student_weight /
    # student_bias; errors named them hidden / weight / bias.
    x = _flat("hidden" if t_hidden is None else "student_hidden", hidden, weight, bias, labels)
    tx = None
    if t_hidden is not None:
        t_weight = materialize_weight(t_weight, t_hidden.dtype)
        tx = _flat("teacher_hidden", t_hidden, t_weight, t_bias, labels)
        if t_weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"teacher_weight: expected vocab size {weight.shape[0]} (student_weight {tuple(weight.shape)}), "
                f"got {tuple(t_weight.shape)}"
            )
        # The teacher never gets gradients; detaching also keeps autograd from saving its graph.
        tx, t_weight = tx.detach(), t_weight.detach()
        t_bias = None if t_bias is None else t_bias.detach()
    if validate:
        check_label_range(labels, weight.shape[0], spec.ignore_index)
    flat_labels = labels.reshape(-1)
    num_tokens = (flat_labels != spec.ignore_index).sum()

    # Fix: without grad mode (eval, torch.no_grad) GradInForward still computed dX and dW in forward
    # (its needs_input_grad follows requires_grad, not grad mode): ~3x the work and [N, H] + [V, H]
    # of memory for nothing. Recompute's forward computes values only.
    use_recompute = reduction == "none" or algorithm == "recompute" or not torch.is_grad_enabled()
    if use_recompute:
        total, ce, kd = Recompute.apply(x, weight, bias, flat_labels, tx, t_weight, t_bias, spec)
        if reduction != "none":
            total, ce, kd = total.sum(), ce.sum(), kd.sum()
    else:
        # Fix (precision): the mean's 1 / num_tokens goes into the Function, which applies it to the
        # gradients in fp32 before they are cast to a low-precision input dtype (see GradInForward).
        scale = 1.0 / num_tokens.clamp(min=1).to(torch.float32) if reduction == "mean" else None
        total, ce, kd = GradInForward.apply(x, weight, bias, flat_labels, tx, t_weight, t_bias, spec, scale)
        return FusedOutput(total, ce, kd, num_tokens)
    if reduction == "none":
        shape = labels.shape
        return FusedOutput(total.reshape(shape), ce.reshape(shape), kd.reshape(shape), num_tokens)
    if reduction == "mean":
        total, ce, kd = normalize(total, num_tokens), normalize(ce, num_tokens), normalize(kd, num_tokens)
    return FusedOutput(total, ce, kd, num_tokens)


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
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, one chunk of logits at a time.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32 / bf16 / fp16).
        weight: ``[V, H]`` output projection, same dtype (a DTensor is gathered once).
        labels: ``[...]`` class ids, hidden's leading shape; ``ignore_index`` marks skipped tokens.
        bias: ``[V]`` or None.
        reduction: ``"mean"`` over valid tokens (0 if none), ``"sum"``, or ``"none"`` (labels' shape).
        label_smoothing, z_loss, softcap: see :class:`tune_losses.options.CEOptions`.
        chunk_size: tokens per chunk; None picks one from V and the device.
        algorithm: ``"grad_in_forward"`` (default for mean / sum), ``"recompute"`` (always for none),
            or ``"auto"``.
        validate: check the label range (one host sync per call).

    Returns:
        fp32 loss: 0-dim, or per token for ``reduction="none"``.
    """
    spec = FusedSpec(CEOptions(ignore_index, label_smoothing, z_loss, softcap, validate), None,
                     chunk_size=chunk_size, ignore_index=ignore_index)
    return _run(hidden, weight, bias, labels, None, None, None, spec, reduction, algorithm, validate).loss


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

    Returns:
        fp32 loss, 0-dim or per token.
    """
    kd = KDOptions(divergence, temperature, scale_by_temperature_squared, beta, sym_kd_ratio, True, ignore_index)
    spec = FusedSpec(None, kd, chunk_size=chunk_size, ignore_index=ignore_index)
    return _run(student_hidden, student_weight, student_bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                spec, reduction, algorithm, validate=False).loss


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
) -> FusedOutput:
    """``(1 - kd_ratio) * CE(student, labels) + kd_ratio * KD(student, teacher)`` in one pass per chunk.

    Both terms are normalized over the same valid tokens. Arguments as :func:`linear_kd_loss`.

    Returns:
        :class:`FusedOutput`: ``loss`` (differentiable), ``ce`` and ``kd`` (detached, same reduction,
        for logging), ``num_tokens``.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio: expected a float in [0, 1], got {kd_ratio!r}")
    kd = KDOptions(divergence, temperature, scale_by_temperature_squared, beta, sym_kd_ratio, True, ignore_index)
    ce = CEOptions(ignore_index, label_smoothing, validate=validate)
    spec = FusedSpec(ce, kd, ce_weight=1.0 - kd_ratio, kd_weight=kd_ratio, chunk_size=chunk_size,
                     ignore_index=ignore_index)
    return _run(student_hidden, student_weight, student_bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                spec, reduction, algorithm, validate)
