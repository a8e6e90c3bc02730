"""Global gradient norm (fp64, each shard counted once), clipping, and naming non-finite gradients."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def _replicas(grad: torch.Tensor, world: int) -> int:
    """How many ranks hold this very gradient (shard): its squares are summed over the world once.

    A DTensor is split over the mesh dimensions where it is sharded (FSDP2's ``Shard`` /
    ``_StridedShard``, tensor parallel's ``Shard(0)``) and repeated everywhere else: over its mesh's
    ``Replicate`` dimensions and over the ranks outside its mesh (a layer FSDP-sharded over ``dp`` is
    repeated on every ``tp`` rank). A plain tensor is repeated on every rank.
    """
    if not isinstance(grad, DTensor):
        return world
    mesh, shards = grad.device_mesh, 1
    for i, p in enumerate(grad.placements):
        if p.is_shard() or type(p).__name__ == "_StridedShard":  # not a Shard subclass in torch 2.13
            shards *= mesh.size(i)
    return max(world // shards, 1)


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if hasattr(g, "to_local") else g


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params``, summed in fp64 (0-dim fp64 tensor).

    torch's ``clip_grad_norm_`` sums squares in fp32 and was measured 8e-5 (single process) and 3e-5
    (FSDP2 shards) off the fp64 norm of the very same gradients on the tiny model: too coarse to
    compare runs at 1e-4. FSDP2 gradients are DTensors: each rank adds its local shard's squares
    divided by the number of ranks holding that same shard (1 under plain FSDP2; the tensor-parallel
    degree for layers replicated over tp), and one all-reduce sums them, so every parameter counts
    once. Every rank must call it when any gradient is a DTensor (it is then a collective).
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = _local(grads[0]).device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    reduce = any(hasattr(g, "to_local") for g in grads) and dist.is_initialized()
    world = dist.get_world_size() if reduce else 1
    for g in grads:
        sq_g = torch.linalg.vector_norm(_local(g), dtype=torch.float64).square()
        n = _replicas(g, world) if reduce else 1
        sq += sq_g / n if n != 1 else sq_g
    if reduce:
        dist.all_reduce(sq)
    return sq.sqrt()


def clip_grads_(params: Sequence[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients in place so that their global norm ``norm`` is at most ``max_norm``.

    torch's ``clip_grads_with_norm_`` does the scaling (``max_norm / (norm + 1e-6)`` clamped at 1, one
    foreach multiply per device and dtype, on device: no host sync). It is called once per kind of
    gradient: plain tensors, and DTensors per mesh (a foreach call cannot mix them, and under tensor
    parallelism the output projection's mesh is not the layers'). The norm goes in as fp32, which
    every device supports.
    """
    groups: Dict[Optional[DeviceMesh], List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm.float())


def nonfinite_grads(model: nn.Module) -> List[Tuple[str, str]]:
    """``(parameter name, "nan" | "inf")`` of this rank's gradients holding a non-finite value.

    Runs only after a step was found non-finite (it syncs once per parameter).
    """
    bad = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = _local(p.grad)
        if not bool(torch.isfinite(g).all()):
            bad.append((name, "nan" if bool(torch.isnan(g).any()) else "inf"))
    return bad


def nonfinite_params(model: nn.Module) -> List[str]:
    """Names of this rank's parameters (local shards) holding a non-finite value."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local(p.detach())).all())]
