"""Where the output weights live: resolved into local tensors plus a vocabulary reducer, once per call.

* a plain tensor: used as is, the whole vocabulary on this process;
* a DTensor placed ``Shard(0)`` on a mesh dimension named ``tp`` / ``tensor`` (tensor parallelism,
  e.g. ``parallelize_module(model.output, mesh["tp"], ColwiseParallel())``), or a local shard with
  ``process_group=``: vocabulary-parallel; each rank keeps only its rows and the loss math reduces
  over the group (:class:`tune_losses.fused.vocab_parallel.GroupReducer`); hidden states and labels
  are the same on every rank of the group;
* any other DTensor (FSDP2): gathered once per call by :func:`materialize_weight`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import torch

from tune_losses.fused.vocab_parallel import GroupReducer, even_shard_sizes, shard_layout
from tune_losses.options import VocabParallelOptions  # noqa: F401 - defined with the other options; imported from here too
from tune_losses.validation import is_dtensor
from tune_losses.vocab_alignment import check_teacher_vocab

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor as DTensorType


class Placed(NamedTuple):
    """Local tensors in the compute dtypes and the reducer (None: the whole vocabulary is here)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    teacher_bias: Optional[torch.Tensor]
    reducer: Optional[GroupReducer]


def place(
    weight,
    bias,
    teacher_weight,
    teacher_bias,
    dtype: torch.dtype,
    teacher_dtype: Optional[torch.dtype],
    opts: VocabParallelOptions,
    prefix: str = "",
    teacher_vocab: Optional[str] = None,
) -> Placed:
    """Resolve the student's (and teacher's) output weight and bias, once per call.

    Args:
        dtype, teacher_dtype: the hidden states' dtypes (a gathered or sharded DTensor is cast to them:
            FSDP2 mixed precision keeps fp32 shards outside the model's forward).
        prefix: ``"student_"`` for the distillation entry points (error messages name their arguments).
        teacher_vocab: a teacher with more vocabulary rows than the student (padding rows):
            None requires the same size, ``"drop"`` keeps only the student's rows of the teacher (their logits are never made),
            ``"pad_student"`` keeps them all (:mod:`tune_losses.vocab_alignment`).
    """
    parallel = _vocab_parallel_inputs(weight, bias, teacher_weight, teacher_bias, opts, prefix, teacher_vocab)
    if parallel is not None:
        weight, bias, teacher_weight, teacher_bias, reducer = parallel
        if opts.process_group is None:
            weight, bias = _cast(weight, dtype), _cast(bias, dtype)
            if teacher_dtype is not None:
                teacher_weight, teacher_bias = _cast(teacher_weight, teacher_dtype), _cast(teacher_bias, teacher_dtype)
        return Placed(weight, bias, teacher_weight, teacher_bias, reducer)
    weight = materialize_weight(weight, dtype)
    bias = materialize_weight(bias, dtype) if bias is not None else None
    if teacher_weight is not None:
        teacher_weight = materialize_weight(teacher_weight, teacher_dtype)
        teacher_bias = materialize_weight(teacher_bias, teacher_dtype) if teacher_bias is not None else None
        if teacher_weight.dim() == 2 and weight.dim() == 2:
            check_teacher_vocab(weight.shape[0], teacher_weight.shape[0], mode=teacher_vocab)
            if teacher_vocab == "drop" and teacher_weight.shape[0] > weight.shape[0]:
                teacher_weight = teacher_weight[: weight.shape[0]]
                teacher_bias = None if teacher_bias is None else teacher_bias[: weight.shape[0]]
    return Placed(weight, bias, teacher_weight, teacher_bias, None)


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
    # The gradient of the gathered weight is Partial (each rank's comes from its own tokens), so the
    # backward reduce-scatters it to the shards; a bare ``full_tensor()`` would declare it Replicate
    # and a separately sharded output layer (torchtune's ``custom_sharded_layers``) would train on
    # one rank's data.
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
    return is_dtensor(t)


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


def local_vocab_shard(weight: DTensorType, mesh_dim: int) -> Tuple[torch.Tensor, ProcessGroup, int, int]:
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
        raise ValueError(
            f"weight: every rank needs at least one vocabulary row, got rows per rank {sizes} "
            f"(vocabulary {weight.shape[0]} over {ranks} ranks)"
        )
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
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        names = mesh.mesh_dim_names
        assert names is not None  # _fsdp_over_tp found the mesh's dimensions named
        rows = DTensor.from_local(
            weight.to_local(),
            mesh[names[others[0]]],
            [Shard(0)],
            run_check=False,
            shape=shape,
            stride=stride,
        )
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
        raise ValueError(
            f"weight: expected {sizes[rank]} rows on this rank (Shard(0) of {weight.shape[0]} over "
            f"{ranks}), got {local.shape[0]}"
        )
    return local, mesh.get_group(mesh_dim), sum(sizes[:rank]), weight.shape[0]


def _fsdp_over_tp(weight, mesh_dim: int, tp_rows: int, Shard) -> bool:
    """Whether ``weight`` is FSDP2-sharded over the one other mesh dimension of a tensor-parallel
    ``Shard(0)`` on ``mesh_dim``: ``_StridedShard(0, split_factor=tp size)`` there, the local rows a
    ``torch.chunk`` piece of this rank's tp rows."""
    mesh = weight.device_mesh
    if mesh.ndim != 2 or mesh_dim != 1 or not mesh.mesh_dim_names:
        return False
    p = weight.placements[0]  # _StridedShard (a Shard subclass in some torch versions, not in others)
    if not (
        type(p).__name__ == "_StridedShard"
        and getattr(p, "dim", None) == 0
        and getattr(p, "split_factor", None) == mesh.size(mesh_dim)
    ):
        return False
    return weight.to_local().shape[0] == even_shard_sizes(tp_rows, mesh.size(0))[mesh.get_local_rank(0)]


def _vocab_parallel_inputs(
    weight, bias, t_weight, t_bias, opts: VocabParallelOptions, prefix: str, teacher_vocab: Optional[str] = None
):
    """Decide the dispatch: ``(weight, bias, t_weight, t_bias, GroupReducer)`` with local shards,
    or None for the single-rank path (DTensor weights then gathered by :func:`materialize_weight`)."""
    w_name, b_name = f"{prefix}weight", f"{prefix}bias"
    process_group, vocab_parallel = opts.process_group, opts.vocab_parallel
    vocab_start, vocab_size = opts.vocab_start, opts.vocab_size
    if vocab_parallel not in (None, True, False):
        raise ValueError(f"vocab_parallel: expected None, True or False, got {vocab_parallel!r}")
    if process_group is not None:
        if vocab_parallel is False:
            raise ValueError(
                "vocab_parallel: False contradicts process_group (a local shard and its group "
                "are vocabulary-parallel); pass one or the other"
            )
        for n, t in ((w_name, weight), (b_name, bias), ("teacher_weight", t_weight), ("teacher_bias", t_bias)):
            if _is_dtensor(t):
                raise ValueError(
                    f"{n}: with process_group, expected this rank's local shard (a torch.Tensor), "
                    f"got a DTensor (it carries its own mesh: drop process_group)"
                )
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{w_name}: expected a local shard [V_r, H], got {getattr(weight, 'shape', weight)}")
        if t_weight is not None and teacher_vocab == "pad_student":
            raise ValueError(
                f"teacher_vocab: with process_group, expected None or 'drop' (the teacher's local shard holds "
                f"the student's rows), got {teacher_vocab!r}"
            )
        sizes = [weight.shape[0]] + ([t_weight.shape[0]] if t_weight is not None else [])
        start, vocab = shard_layout(process_group, sizes, weight.device, vocab_start, vocab_size)
        return weight, bias, t_weight, t_bias, GroupReducer(process_group, start, vocab)
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start / vocab_size: only meaningful with process_group (a local shard)")
    if not _is_dtensor(weight):
        if vocab_parallel:
            raise ValueError(
                f"{w_name}: vocab_parallel=True needs a DTensor weight (Shard(0) on a 'tp' mesh "
                f"dimension) or a local shard with process_group, got a torch.Tensor"
            )
        return None
    dim = _vocab_mesh_dim(weight, vocab_parallel, w_name)
    if dim is None:
        return None
    local_w, group, start, vocab = local_vocab_shard(weight, dim)
    local_b = _local_like(bias, b_name, start, vocab, local_w.shape[0])
    local_tw = local_tb = None
    if t_weight is not None:
        rows = local_w.shape[0]
        t_dim = _vocab_mesh_dim(t_weight, None, "teacher_weight") if _is_dtensor(t_weight) else None
        if t_dim is not None:
            local_tw, _, t_start, t_vocab = local_vocab_shard(t_weight, t_dim)
            aligned = (t_start, t_vocab, local_tw.shape[0]) == (start, vocab, rows)
            if not aligned and t_vocab == vocab:
                raise ValueError(
                    f"teacher_weight: expected the vocabulary sharded like {w_name} (rows "
                    f"[{start}, {start + rows}) of {vocab}), got rows "
                    f"[{t_start}, {t_start + local_tw.shape[0]}) of {t_vocab}"
                )
        if t_dim is None or not aligned:
            # A replicated (or FSDP-sharded) teacher, or one sharded over a wider vocabulary (padding
            # rows): gather it, then take this rank's rows, and with "pad_student" the last rank also
            # takes the rows beyond the student's vocabulary.
            full = materialize_weight(t_weight)
            if full.dim() != 2:
                raise ValueError(f"teacher_weight: expected shape [V, H], got {tuple(full.shape)}")
            check_teacher_vocab(vocab, full.shape[0], mode=teacher_vocab)
            local_tw = _teacher_rows(full, start, rows, vocab, teacher_vocab)
        if t_dim is not None and aligned:
            local_tb = _local_like(t_bias, "teacher_bias", start, vocab, rows)
        elif t_bias is not None:
            full_b = materialize_weight(t_bias) if _is_dtensor(t_bias) else t_bias
            if full_b.shape != (full.shape[0],):
                raise ValueError(
                    f"teacher_bias: expected shape [{full.shape[0]}] (teacher_weight's rows), got {tuple(full_b.shape)}"
                )
            local_tb = _teacher_rows(full_b, start, rows, vocab, teacher_vocab)
    return local_w, local_b, local_tw, local_tb, GroupReducer(group, start, vocab)


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
        raise ValueError(
            f"{name}: expected shape [{vocab}] or a DTensor sharded like the weight, got {tuple(full.shape)}"
        )
    return full[start : start + rows]


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A DTensor's local rows in the compute dtype (FSDP2 mixed precision keeps fp32 shards outside
    forward), as :func:`materialize_weight` casts a gathered weight."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _teacher_rows(full: torch.Tensor, start: int, rows: int, vocab: int, teacher_vocab: Optional[str]) -> torch.Tensor:
    """This rank's rows ``[start, start + rows)`` of a gathered teacher weight (or bias); with
    ``"pad_student"`` the rank holding the student's last rows also takes the teacher's rows beyond
    ``vocab`` (its student logits are padded with zeros to match)."""
    local = full[start : start + rows]
    if teacher_vocab == "pad_student" and start + rows == vocab and full.shape[0] > vocab:
        local = torch.cat([local, full[vocab:]])
    return local
