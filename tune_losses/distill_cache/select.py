"""What a cache keeps of the teacher's distribution per token: its top k, or k draws from it.

Both take the teacher's logits ``[n, V]`` (any float dtype; the math runs in fp32) and return
``(ids [n, k] int64, logprobs [n, k] fp32)`` at temperature ``T``, i.e. of ``softmax(logits / T)``.
Unused slots hold id ``-1`` and log-probability ``-inf``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch


def topk_entries(logits: torch.Tensor, k: int, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable ids per row and their exact log-probabilities (the tail's mass is what is
    left: ``1 - sum exp(logprobs)``). Ids in decreasing probability."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    values, ids = torch.topk(z, k, dim=-1)
    return ids, values - lse


def sample_entries(
    logits: torch.Tensor, k: int, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``k`` draws per row (with replacement) from ``softmax(logits / T)``, kept as the distinct ids drawn
    with ``log(count / k)``: an unbiased estimate of the distribution (``E[count / k] = p`` per id),
    where top-k is biased towards the head. Ids ascending, then ``-1`` padding."""
    z = logits.float() / temperature
    probs = torch.softmax(z, dim=-1)
    n = probs.shape[0]
    if n == 0:
        empty = torch.empty(0, k, dtype=torch.int64, device=logits.device)
        return empty, empty.float()
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)  # [n, k]
    drawn, _ = torch.sort(draws, dim=-1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = torch.cumsum(first.long(), dim=-1) - 1  # the distinct id's slot, 0-based, per row
    counts = torch.zeros(n, k, dtype=torch.float32, device=logits.device).scatter_add_(
        1, slot, torch.ones_like(drawn, dtype=torch.float32)
    )
    ids = torch.full_like(drawn, -1).scatter_(1, slot, drawn)  # equal values collide on equal slots
    used = counts > 0
    logprobs = torch.where(used, torch.log(counts) - math.log(k), torch.full_like(counts, -math.inf))
    return torch.where(used, ids, torch.full_like(ids, -1)), logprobs


def sequence_generator(seed: int, sequence: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one sequence's draws: the same seed and sequence index give the same draws,
    whatever the batch, rank or rerun the sequence is written in."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sequence * 7_919 + 1) % (2**63 - 1))
    return g
