"""Fused linear losses: final hidden states and the output weight in, a loss out; no ``[N, V]`` logits.

``linear_cross_entropy`` takes torch's ``F.linear_cross_entropy`` positional order
``(hidden, weight, labels)``; ``linear_kd_loss`` and ``linear_distillation_loss`` take student then
teacher. Each returns an ordinary tensor in the autograd graph: ``(loss * k).backward()`` and a
per-token ``grad_output`` give exact gradients.

Weights (dispatch in :func:`_run`):

* a plain tensor: the single-rank chunk loop (:mod:`tune_losses.fused.engine`);
* a DTensor placed ``Shard(0)`` on a mesh dimension named ``tp`` / ``tensor`` (tensor parallelism,
  e.g. ``parallelize_module(model.output, mesh["tp"], ColwiseParallel())``), or a local shard with
  ``process_group=``: vocabulary-parallel (:mod:`tune_losses.fused.vocab_parallel`); each rank makes
  only its rows' logits, hidden states and labels are the same on every rank of the group;
* any other DTensor (FSDP2): gathered once per call by :func:`materialize_weight`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from tune_losses.accounting import normalize
from tune_losses.fused.engine import FusedSpec, GradInForward, Recompute
from tune_losses.fused.vocab_parallel import VocabParallelPass, even_shard_sizes, shard_layout
from tune_losses.options import CEOptions, KDOptions, check_float_option, check_reduction, check_run_options
from tune_losses.validation import check_float, check_fused_inputs, check_label_range, check_labels_dtype

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


TP_MESH_DIM_NAMES = ("tp", "tensor")
"""Mesh dimension names taken as tensor-parallel: a weight ``Shard(0)`` on one of them is vocabulary-parallel."""


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor, Partial, Replicate, Shard


def _is_dtensor(t) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def _vocab_mesh_dim(weight, vocab_parallel: Optional[bool], name: str) -> Optional[int]:
    """The mesh dimension over which a DTensor ``weight`` is vocabulary-parallel, or None.

    Auto (``vocab_parallel=None``): a dimension named ``tp`` / ``tensor`` on which the weight is
    ``Shard(0)``. ``True`` also accepts a 1-D mesh of any name; ``False`` never.
    """
    if vocab_parallel is False:
        return None
    _, _, _, Shard = _dtensor_types()

    def shard0(p) -> bool:
        return type(p) is Shard and p.dim == 0  # not FSDP2's _StridedShard

    mesh, placements = weight.device_mesh, weight.placements
    names = mesh.mesh_dim_names or ()
    for i, dim_name in enumerate(names):
        if dim_name in TP_MESH_DIM_NAMES and shard0(placements[i]):
            return i
    if vocab_parallel and mesh.ndim == 1 and shard0(placements[0]):
        return 0
    if vocab_parallel:
        raise ValueError(
            f"{name}: vocab_parallel=True needs a DTensor placed Shard(0) on a mesh dimension named "
            f"{' or '.join(TP_MESH_DIM_NAMES)} (or on a 1-D mesh), got placements {tuple(placements)} on mesh "
            f"dimensions {names or mesh.ndim}"
        )
    return None


def local_vocab_shard(weight: torch.Tensor, mesh_dim: int) -> Tuple[torch.Tensor, object, int, int]:
    """This rank's vocabulary shard of a DTensor ``weight`` that is ``Shard(0)`` on ``mesh_dim``.

    Returns ``(local rows [V_r, ...], process group of mesh_dim, first row, global rows)``. The local
    tensor is differentiable: its gradient returns to ``weight`` as a DTensor of the same placements.
    Other mesh dimensions (FSDP2's data-parallel dimension of a 2-D ``(dp, tp)`` mesh) are gathered
    once per call, FSDP-style: each rank's gradient comes from its own tokens, so the shards receive
    the mean over those dimensions (as :func:`materialize_weight`).
    """
    DTensor, Partial, Replicate, Shard = _dtensor_types()
    mesh = weight.device_mesh
    ranks, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    sizes = even_shard_sizes(weight.shape[0], ranks)
    if min(sizes) < 1:
        raise ValueError(f"weight: every rank needs at least one vocabulary row, got rows per rank {sizes} "
                         f"(vocabulary {weight.shape[0]} over {ranks} ranks)")
    others = [i for i in range(mesh.ndim) if i != mesh_dim]
    dp = 1
    for i in others:
        dp *= mesh.size(i)
    if not others:
        local = weight.to_local()
    elif _fsdp_over_tp(weight, mesh_dim, sizes[rank], Shard):
        # FSDP2's layout of a tensor-parallel parameter, (_StridedShard(0), Shard(0)) on (dp, tp): this
        # rank's tp rows are split over dp like Shard(0). Gather just them over dp (the gradient is
        # reduce-scattered back), never the whole weight (DTensor's redistribute to (Replicate,
        # Shard(0)) passes through a fully replicated weight for this layout).
        shape = (sizes[rank], *weight.shape[1:])
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        rows = DTensor.from_local(weight.to_local(), mesh[mesh.mesh_dim_names[others[0]]], [Shard(0)],
                                  run_check=False, shape=shape, stride=stride)
        local = rows.full_tensor(grad_placements=[Partial("sum")])
    else:
        target = [Replicate()] * mesh.ndim
        target[mesh_dim] = Shard(0)
        grads = [Partial("sum")] * mesh.ndim
        grads[mesh_dim] = Shard(0)
        local = weight.redistribute(mesh, target).to_local(grad_placements=grads)
    if dp != 1:
        local = _ScaleGrad.apply(local, 1.0 / dp)
    if local.shape[0] != sizes[rank]:  # pragma: no cover - a sharding torch does not make
        raise ValueError(f"weight: expected {sizes[rank]} rows on this rank (Shard(0) of {weight.shape[0]} over "
                         f"{ranks}), got {local.shape[0]}")
    return local, mesh.get_group(mesh_dim), sum(sizes[:rank]), weight.shape[0]


def _fsdp_over_tp(weight, mesh_dim: int, tp_rows: int, Shard) -> bool:
    """Whether ``weight`` is FSDP2-sharded over the one other mesh dimension of a tensor-parallel
    ``Shard(0)`` on ``mesh_dim``: ``_StridedShard(0, split_factor=tp size)`` there, the local rows a
    ``torch.chunk`` piece of this rank's tp rows."""
    mesh = weight.device_mesh
    if mesh.ndim != 2 or mesh_dim != 1 or not mesh.mesh_dim_names:
        return False
    p = weight.placements[0]  # _StridedShard (a Shard subclass in some torch versions, not in others)
    if not (type(p).__name__ == "_StridedShard" and getattr(p, "dim", None) == 0
            and getattr(p, "split_factor", None) == mesh.size(mesh_dim)):
        return False
    return weight.to_local().shape[0] == even_shard_sizes(tp_rows, mesh.size(0))[mesh.get_local_rank(0)]


def _vocab_parallel_inputs(weight, bias, t_weight, t_bias, process_group, vocab_parallel, vocab_start, vocab_size,
                           prefix: str):
    """Decide the dispatch: ``(weight, bias, t_weight, t_bias, VocabParallelPass)`` with local shards,
    or None for the single-rank path (DTensor weights then gathered by :func:`materialize_weight`)."""
    w_name, b_name = f"{prefix}weight", f"{prefix}bias"
    if vocab_parallel not in (None, True, False):
        raise ValueError(f"vocab_parallel: expected None, True or False, got {vocab_parallel!r}")
    if process_group is not None:
        if vocab_parallel is False:
            raise ValueError("vocab_parallel: False contradicts process_group (a local shard and its group "
                             "are vocabulary-parallel); pass one or the other")
        for n, t in ((w_name, weight), (b_name, bias), ("teacher_weight", t_weight), ("teacher_bias", t_bias)):
            if _is_dtensor(t):
                raise ValueError(f"{n}: with process_group, expected this rank's local shard (a torch.Tensor), "
                                 f"got a DTensor (it carries its own mesh: drop process_group)")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{w_name}: expected a local shard [V_r, H], got {getattr(weight, 'shape', weight)}")
        sizes = [weight.shape[0]] + ([t_weight.shape[0]] if t_weight is not None else [])
        start, vocab = shard_layout(process_group, sizes, weight.device, vocab_start, vocab_size)
        return weight, bias, t_weight, t_bias, VocabParallelPass(process_group, start, vocab)
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start / vocab_size: only meaningful with process_group (a local shard)")
    if not _is_dtensor(weight):
        if vocab_parallel:
            raise ValueError(f"{w_name}: vocab_parallel=True needs a DTensor weight (Shard(0) on a 'tp' mesh "
                             f"dimension) or a local shard with process_group, got a torch.Tensor")
        return None
    dim = _vocab_mesh_dim(weight, vocab_parallel, w_name)
    if dim is None:
        return None
    local_w, group, start, vocab = local_vocab_shard(weight, dim)
    local_b = _local_like(bias, b_name, start, vocab, local_w.shape[0])
    local_tw = local_tb = None
    if t_weight is not None:
        if _is_dtensor(t_weight) and _vocab_mesh_dim(t_weight, None, "teacher_weight") is not None:
            local_tw, _, t_start, t_vocab = local_vocab_shard(t_weight, _vocab_mesh_dim(t_weight, None, "teacher_weight"))
            if (t_start, t_vocab, local_tw.shape[0]) != (start, vocab, local_w.shape[0]):
                raise ValueError(f"teacher_weight: expected the vocabulary sharded like {w_name} (rows "
                                 f"[{start}, {start + local_w.shape[0]}) of {vocab}), got rows "
                                 f"[{t_start}, {t_start + local_tw.shape[0]}) of {t_vocab}")
        else:  # a replicated (or FSDP-sharded) teacher: gather, then take this rank's rows
            full = materialize_weight(t_weight)
            if full.dim() != 2 or full.shape[0] != vocab:
                raise ValueError(f"teacher_weight: expected {vocab} vocabulary rows (as {w_name}), got "
                                 f"{tuple(full.shape)}")
            local_tw = full[start:start + local_w.shape[0]]
        local_tb = _local_like(t_bias, "teacher_bias", start, vocab, local_w.shape[0])
    return local_w, local_b, local_tw, local_tb, VocabParallelPass(group, start, vocab)


def _local_like(bias, name: str, start: int, vocab: int, rows: int):
    """A bias's local rows: a DTensor sharded like ``weight``, or a full ``[V]`` tensor sliced."""
    if bias is None:
        return None
    if _is_dtensor(bias):
        dim = _vocab_mesh_dim(bias, None, name)
        if dim is None:
            full = materialize_weight(bias)
        else:
            local, _, b_start, b_vocab = local_vocab_shard(bias, dim)
            if (b_start, b_vocab) != (start, vocab):
                raise ValueError(f"{name}: expected it sharded like the weight, got rows from {b_start} of {b_vocab}")
            return local
    else:
        full = bias
    if full.dim() != 1 or full.shape[0] != vocab:
        raise ValueError(f"{name}: expected shape [{vocab}] or a DTensor sharded like the weight, got {tuple(full.shape)}")
    return full[start:start + rows]


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


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A DTensor's local rows in the compute dtype (FSDP2 mixed precision keeps fp32 shards outside
    forward), as :func:`materialize_weight` casts a gathered weight."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _run(hidden, weight, bias, labels, t_hidden, t_weight, t_bias, spec: FusedSpec, reduction: str, algorithm: str,
         validate: bool, process_group=None, vocab_parallel: Optional[bool] = None, vocab_start: Optional[int] = None,
         vocab_size: Optional[int] = None) -> FusedOutput:
    check_reduction(reduction)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if spec.chunk_size is not None and (not isinstance(spec.chunk_size, int) or spec.chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {spec.chunk_size!r}")
    check_labels_dtype(labels)
    prefix = "" if t_hidden is None else "student_"
    parallel = _vocab_parallel_inputs(weight, bias, t_weight, t_bias, process_group, vocab_parallel, vocab_start,
                                      vocab_size, prefix)
    pass_fn = None
    if parallel is not None:  # vocabulary-parallel: local shards, complete values and dX on every rank
        from_dtensor = process_group is None
        weight, bias, t_weight, t_bias, pass_fn = parallel
        if from_dtensor:
            weight, bias = _cast(weight, hidden.dtype), _cast(bias, hidden.dtype)
            if t_hidden is not None:
                t_weight, t_bias = _cast(t_weight, t_hidden.dtype), _cast(t_bias, t_hidden.dtype)
    else:
        weight = materialize_weight(weight, hidden.dtype)
        bias = materialize_weight(bias, hidden.dtype) if bias is not None else None
    vocab = weight.shape[0] if pass_fn is None else pass_fn.vocab
    # Fix: the KD / distillation entry points call these arguments student_hidden / student_weight /
    # student_bias; errors named them hidden / weight / bias.
    x = _flat("hidden" if t_hidden is None else "student_hidden", hidden, weight, bias, labels)
    tx = None
    if t_hidden is not None:
        if pass_fn is None:
            t_weight = materialize_weight(t_weight, t_hidden.dtype)
            t_bias = materialize_weight(t_bias, t_hidden.dtype) if t_bias is not None else None
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
        check_label_range(labels, vocab, spec.ignore_index)
    flat_labels = labels.reshape(-1)
    num_tokens = (flat_labels != spec.ignore_index).sum()

    # Fix: without grad mode (eval, torch.no_grad) GradInForward still computed dX and dW in forward
    # (its needs_input_grad follows requires_grad, not grad mode): ~3x the work and [N, H] + [V, H]
    # of memory for nothing. Recompute's forward computes values only.
    use_recompute = reduction == "none" or algorithm == "recompute" or not torch.is_grad_enabled()
    if use_recompute:
        total, ce, kd = Recompute.apply(x, weight, bias, flat_labels, tx, t_weight, t_bias, spec, pass_fn)
        if reduction != "none":
            total, ce, kd = total.sum(), ce.sum(), kd.sum()
    else:
        # Fix (precision): the mean's 1 / num_tokens goes into the Function, which applies it to the
        # gradients in fp32 before they are cast to a low-precision input dtype (see GradInForward).
        scale = 1.0 / num_tokens.clamp(min=1).to(torch.float32) if reduction == "mean" else None
        total, ce, kd = GradInForward.apply(x, weight, bias, flat_labels, tx, t_weight, t_bias, spec, scale, pass_fn)
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
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
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

    Returns:
        fp32 loss: 0-dim, or per token for ``reduction="none"``.
    """
    check_fused_inputs(labels, local_shard=process_group is not None, hidden=hidden, weight=weight, bias=bias)
    check_run_options(chunk_size, validate, vocab_parallel, vocab_start, vocab_size)
    spec = FusedSpec(CEOptions(ignore_index, label_smoothing, z_loss, softcap, validate), None,
                     chunk_size=chunk_size, ignore_index=ignore_index)
    return _run(hidden, weight, bias, labels, None, None, None, spec, reduction, algorithm, validate,
                process_group, vocab_parallel, vocab_start, vocab_size).loss


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
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
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
            Vocabulary-parallel, the teacher's weight is sharded like the student's (a DTensor
            on the same rows, or with ``process_group`` its local shard of the same rows); a
            teacher weight that is not vocabulary-parallel is gathered and its rows sliced.

    Returns:
        fp32 loss, 0-dim or per token.
    """
    check_fused_inputs(labels, local_shard=process_group is not None, student_hidden=student_hidden,
                       student_weight=student_weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                       student_bias=student_bias, teacher_bias=teacher_bias)
    check_run_options(chunk_size, validate, vocab_parallel, vocab_start, vocab_size)
    kd = KDOptions(divergence, temperature, scale_by_temperature_squared, beta, sym_kd_ratio, True, ignore_index)
    spec = FusedSpec(None, kd, chunk_size=chunk_size, ignore_index=ignore_index)
    return _run(student_hidden, student_weight, student_bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                spec, reduction, algorithm, validate, process_group, vocab_parallel, vocab_start, vocab_size).loss


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
    process_group=None,
    vocab_parallel: Optional[bool] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> FusedOutput:
    """``(1 - kd_ratio) * CE(student, labels) + kd_ratio * KD(student, teacher)`` in one pass per chunk.

    Both terms are normalized over the same valid tokens. Arguments as :func:`linear_kd_loss`
    (``process_group``, ``vocab_parallel``, ``vocab_start``, ``vocab_size`` included).

    Returns:
        :class:`FusedOutput`: ``loss`` (differentiable), ``ce`` and ``kd`` (detached, same reduction,
        for logging), ``num_tokens``.
    """
    check_fused_inputs(labels, local_shard=process_group is not None, student_hidden=student_hidden,
                       student_weight=student_weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                       student_bias=student_bias, teacher_bias=teacher_bias)
    check_run_options(chunk_size, validate, vocab_parallel, vocab_start, vocab_size)
    check_float_option("kd_ratio", kd_ratio, 0.0, 1.0)
    kd = KDOptions(divergence, temperature, scale_by_temperature_squared, beta, sym_kd_ratio, True, ignore_index)
    ce = CEOptions(ignore_index, label_smoothing, validate=validate)
    spec = FusedSpec(ce, kd, ce_weight=1.0 - kd_ratio, kd_weight=kd_ratio, chunk_size=chunk_size,
                     ignore_index=ignore_index)
    return _run(student_hidden, student_weight, student_bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                spec, reduction, algorithm, validate, process_group, vocab_parallel, vocab_start, vocab_size)
