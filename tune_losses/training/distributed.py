"""Process group, data-parallel x tensor-parallel layout, and collectives that say what hung.

A single device is a world of one. A rank that stops (crashed without exiting, stuck in I/O) leaves
the others waiting in a collective; torch's default wait is 30 minutes. The process group here waits
``process_group_timeout_s`` (config, default 10 minutes), and :func:`collective` turns the backend's
timeout error into one that names the operation and the rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout on this rank."""


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the world torchrun started (nccl on CUDA, gloo elsewhere) with a ``timeout_s`` wait."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


@contextlib.contextmanager
def collective(what: str, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Run the collectives in the block; a backend timeout becomes a :class:`CollectiveTimeout`
    naming ``what`` (e.g. "all-reduce of the step's token count"), this rank, and the timeout."""
    try:
        yield
    except CollectiveTimeout:
        raise
    except RuntimeError as err:
        if not (dist.is_initialized() and _is_timeout(err)):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        waited = f" after {timeout_s:g} s" if timeout_s is not None else ""
        raise CollectiveTimeout(
            f"rank {rank} of {world}: {what} timed out{waited} (process_group_timeout_s) waiting for the other "
            f"ranks; one of them has stopped or is far behind. Backend error: {str(err).splitlines()[0]}"
        ) from err


@dataclass
class Parallelism:
    """Where this rank sits: world, data-parallel size / rank / group, and the ``(dp, tp)`` mesh.

    Tensor parallelism (``tensor_parallel_dim: T``): a 2-D mesh ``(dp, tp) = (world / T, T)``; the
    ``T`` ranks of one dp group read the same batch, so tokens are counted over dp only.
    """

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Optional[dist.ProcessGroup] = None
    mesh: Optional[DeviceMesh] = None

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def build(cls, device: torch.device, distributed: bool, tp: int) -> Parallelism:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if tp > 1 and not distributed:
            raise ValueError(
                f"tensor_parallel_dim: {tp} needs a distributed recipe "
                f"(tune run --nproc_per_node N recipes/<x>_distributed.py); the single-device ones take 1"
            )
        if world % tp:
            raise ValueError(f"tensor_parallel_dim: expected a divisor of the world size {world}, got {tp}")
        p = cls(world_size=world, rank=rank, tp=tp, dp_size=world, dp_rank=rank)
        if tp > 1:
            p.mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
            p.dp_size = world // tp
            p.dp_rank = p.mesh.get_local_rank("dp")
            p.dp_group = p.mesh["dp"].get_group()
        return p


def barrier(what: str, timeout_s: Optional[float] = None) -> None:
    if dist.is_initialized():
        with collective(what, timeout_s):
            dist.barrier()
