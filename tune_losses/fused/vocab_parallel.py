"""Vocabulary parallelism: the reductions over a vocabulary sharded across a process group.

Each rank of a process group holds rows ``[start, start + V_r)`` of the output weight ``W`` (and
bias) and the *same* hidden states (tensor parallelism: the tokens are replicated over the group).
The chunk loop (:mod:`tune_losses.fused.engine`) and the loss math (:mod:`tune_losses.divergences`)
are those of one process; only the reducer differs: per token chunk a rank makes its local logits
``[n, V_r]`` and the math combines per-token statistics ``[k, n]`` (row maxima; sums of exponentials,
of the label's logit, of divergence terms) with one all-reduce each, so every rank gets the exact
per-token values and its columns' exact logit gradient. ``dW_r`` / ``db_r`` are local; the partial
``dX`` is summed over the group once, after the last chunk.

No rank ever holds more than one chunk of its shard's logits; every rank runs every collective,
whatever its labels (a rank whose tokens are all ignored still takes part; no branch on tensor
values, no host sync).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tune_losses.divergences import VocabReducer

_MAX = dist.ReduceOp.MAX if dist.is_available() else None
_SUM = dist.ReduceOp.SUM if dist.is_available() else None
# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_ALL_GATHER: Optional[Callable[..., object]] = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)


def even_shard_sizes(vocab: int, ranks: int) -> List[int]:
    """Rows per rank of torch's ``Shard(0)`` (``torch.chunk`` semantics: ``ceil(V / ranks)`` rows
    each, larger shards first, possibly empty ones at the end)."""
    per = -(-vocab // ranks)
    return [max(0, min(vocab, (i + 1) * per) - i * per) for i in range(ranks)]


def shard_layout(
    group: Optional[dist.ProcessGroup],
    local_sizes: Sequence[int],
    device: torch.device,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[int, int]:
    """``(start, V)`` of this rank's vocabulary shard from the local shard sizes of every rank.

    ``local_sizes``: this rank's row counts of the weights that must be sharded alike (student,
    teacher). Unless both ``vocab_start`` and ``vocab_size`` are given, one all-gather of the sizes
    over ``group`` (ranks in group order hold consecutive rows) and one host read; errors are then
    raised on every rank alike (no rank is left waiting in a collective).
    """
    if vocab_start is not None and vocab_size is not None:
        start, vocab = int(vocab_start), int(vocab_size)
        if not 0 <= start <= start + local_sizes[0] <= vocab:
            raise ValueError(
                f"vocab_start: rows [{start}, {start + local_sizes[0]}) of the weight shard must lie "
                f"in [0, vocab_size={vocab}), got vocab_start={vocab_start}"
            )
        if any(s != local_sizes[0] for s in local_sizes):
            raise ValueError(
                f"teacher_weight: expected {local_sizes[0]} vocabulary rows on this rank (as "
                f"student_weight), got {local_sizes[1]}"
            )
        if local_sizes[0] < 1:
            raise ValueError("weight: every rank needs at least one vocabulary row, got an empty shard")
        return start, vocab
    world = dist.get_world_size(group)
    mine = torch.tensor(list(local_sizes), dtype=torch.int64, device=device)
    gathered = torch.empty(world * len(local_sizes), dtype=torch.int64, device=device)
    assert _ALL_GATHER is not None  # a process group exists, so torch.distributed has its collectives
    _ALL_GATHER(gathered, mine, group=group)
    table = gathered.view(world, len(local_sizes)).tolist()
    sizes = [row[0] for row in table]
    if any(row[1:] != [row[0]] * (len(row) - 1) for row in table):
        raise ValueError(
            f"teacher_weight: expected the teacher's vocabulary sharded like the student's "
            f"(rows per rank {sizes}), got {[row[1] for row in table]}"
        )
    if min(sizes) < 1:
        raise ValueError(f"weight: every rank needs at least one vocabulary row, got rows per rank {sizes}")
    rank = dist.get_rank(group)
    start, vocab = sum(sizes[:rank]), sum(sizes)
    if vocab_start is not None and int(vocab_start) != start:
        raise ValueError(f"vocab_start: expected {start} (the rows of lower ranks), got {vocab_start}")
    if vocab_size is not None and int(vocab_size) != vocab:
        raise ValueError(f"vocab_size: expected {vocab} (the sum of the shards' rows), got {vocab_size}")
    return start, vocab


class GroupReducer(VocabReducer):
    """Reductions over a vocabulary sharded across ``group``: all-reduces of per-token statistics.

    Attributes:
        group: the tensor-parallel process group (ranks in group order hold consecutive rows).
        start: first vocabulary row of this rank; vocab: the global V.
    """

    distributed = True

    def __init__(self, group: Optional[dist.ProcessGroup], start: int, vocab: int):
        super().__init__(vocab, start)
        self.group = group

    def max(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=_MAX, group=self.group)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=_SUM, group=self.group)
        return t

    def finish_dx(self, dx: torch.Tensor) -> None:
        # Each rank's dX holds its vocabulary rows' share: one all-reduce for the whole call.
        dist.all_reduce(dx, op=_SUM, group=self.group)
