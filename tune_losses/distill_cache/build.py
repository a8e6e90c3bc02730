"""Run a teacher over a dataset's sequences and write this rank's shards of the cache.

The teacher is any callable ``tokens [B, S] int64 -> logits [B, S, V]`` (a causal model: right padding
does not change the rows of the real tokens). One batch of logits exists at a time; each sequence's
rows are reduced to ``k`` entries (:mod:`tune_losses.distill_cache.select`) before the next batch runs.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Sequence

import torch

from tune_losses.distill_cache.format import token_hash
from tune_losses.distill_cache.select import sample_entries, sequence_generator, topk_entries
from tune_losses.distill_cache.writer import CacheWriter, Rows

Teacher = Callable[[torch.Tensor], torch.Tensor]


def _batches(seqs: Sequence[int], size: int) -> Iterator[List[int]]:
    for a in range(0, len(seqs), size):
        yield list(seqs[a : a + size])


@torch.no_grad()
def sequence_rows(
    writer: CacheWriter, teacher: Teacher, tokens: List[List[int]], first: List[int], pad_id: int, device
) -> List[Rows]:
    """The cache rows of a batch of sequences (``first[i]``: the dataset index of ``tokens[i]``)."""
    spec = writer.spec
    longest = max(len(t) for t in tokens)
    batch = torch.full((len(tokens), longest), pad_id, dtype=torch.int64)
    for i, t in enumerate(tokens):
        batch[i, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
    logits = teacher(batch.to(device))  # [B, S, V]: the one batch of logits alive
    if logits.shape[-1] != spec.vocab_size:
        raise ValueError(f"teacher: expected logits over vocab_size {spec.vocab_size}, got {logits.shape[-1]}")
    rows = []
    for i, t in enumerate(tokens):
        z = logits[i, : max(len(t) - 1, 0)]
        if spec.mode == "topk":
            ids, lps = topk_entries(z, spec.k, spec.temperature)
        else:
            g = sequence_generator(spec.seed, first[i], device=z.device)
            ids, lps = sample_entries(z, spec.k, spec.temperature, generator=g)
        rows.append((ids.cpu(), lps.cpu()))
    return rows


def write_shards(
    writer: CacheWriter,
    teacher: Teacher,
    tokens_of: Callable[[int], List[int]],
    *,
    batch_size: int,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
    on_shard: Callable[[int, int], None] | None = None,
) -> int:
    """Write every shard of this rank not yet complete; returns how many were written.

    ``tokens_of(i)``: the token ids of sequence ``i``; ``on_shard(done, total)`` reports progress.
    """
    todo = writer.pending(lambda i: token_hash(tokens_of(i)))
    for n, s in enumerate(todo):
        seqs = writer.ranges[s]
        rows, lengths, hashes = [], [], []
        for chunk in _batches(seqs, batch_size):
            tokens = [list(tokens_of(i)) for i in chunk]
            rows.extend(sequence_rows(writer, teacher, tokens, chunk, pad_id, device))
            lengths.extend(len(t) for t in tokens)
            hashes.extend(token_hash(t) for t in tokens)
        writer.write_shard(s, rows, lengths, hashes)
        if on_shard is not None:
            on_shard(n + 1, len(todo))
    return len(todo)
