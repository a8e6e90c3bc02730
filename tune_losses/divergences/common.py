"""What every per-chunk loss function shares: the vocabulary reducer and a few row-wise helpers.

A chunk of logits ``[n, V_r]`` (the compute dtype: fp32, or fp64 for fp64 inputs) holds the columns
``[start, start + V_r)`` of a ``V``-column vocabulary. Whatever crosses columns goes through a
:class:`VocabReducer`: the row maximum, a few per-token sums, the label's logit (a sum that only
its owner adds to). On one process the reducer is the identity (``V_r = V``); the
vocabulary-parallel losses pass one that all-reduces over the tensor-parallel group
(:class:`tune_losses.fused.vocab_parallel.GroupReducer`).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

NEG_INF = float("-inf")


class VocabReducer:
    """Reductions over the vocabulary when this process holds all of it: the identity.

    Attributes:
        vocab: V, the whole vocabulary's size.
        start: first vocabulary column held here (0).
    """

    distributed = False

    def __init__(self, vocab: int, start: int = 0):
        self.vocab = vocab
        self.start = start

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token maxima ``[k, n]`` (or ``[n]``) over the whole vocabulary."""
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token sums ``[k, n]`` over the whole vocabulary."""
        return t

    def finish_dx(self, dx: torch.Tensor) -> None:
        """Complete a hidden-state gradient made from this process's columns (nothing to add here)."""


class ChunkRun(NamedTuple):
    """How a per-chunk function runs over its logits ``[n, V_r]``, besides its inputs and options.

    Attributes:
        red: reductions over the vocabulary.
        weight: ``[n]`` gradient weight per token (0 at ignored tokens), or None for the value only
            (then no gradient is built).
        consume: whether the function may overwrite the logits buffer.
        rows: the student's per-token statistics shared between the terms of one chunk
            (:class:`tune_losses.terms.Chunk`'s ``student_rows``), or None: a function that computes
            ``(max [n], sum exp(z - max) [n])`` of the raw logits over the whole vocabulary leaves
            them under ``"raw"``, one that can use them reads them there.
    """

    red: VocabReducer
    weight: Optional[torch.Tensor] = None
    consume: bool = False
    rows: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None


def row_max(z: torch.Tensor, red: VocabReducer) -> torch.Tensor:
    """Global row maxima ``[k, n]`` of stacked ``[n, V_r]`` tensors; a row of only -inf logits (every
    entry masked) gets 0 so that the shifted logits stay -inf, not NaN. NaN and +inf are kept."""
    m = red.max(z)
    return m.masked_fill(m == NEG_INF, 0.0)


def label_index(labels: torch.Tensor, valid: torch.Tensor, width: int, red: VocabReducer):
    """``(index [n, 1], owned [n])``: the label's local column where this process holds it."""
    local = labels - red.start
    owned = valid & (local >= 0) & (local < width)
    return torch.where(owned, local, torch.zeros_like(local)).unsqueeze(-1), owned


def add_at_label(g: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """``g[i, idx[i]] += amount[i]`` where ``owned[i]`` (the one-hot part of a gradient).

    Eager: a scatter into ``g`` in place (``n`` entries). Under ``torch.compile``: a comparison against
    the column index, which Inductor fuses into the pass that writes ``g`` (a scatter would make it
    store ``g`` first and read it again).
    """
    if torch.compiler.is_compiling():
        cols = torch.arange(g.shape[-1], device=g.device)
        hit = (cols == idx) & owned.unsqueeze(-1)
        return torch.where(hit, g + amount.unsqueeze(-1), g)
    return g.scatter_add_(-1, idx, torch.where(owned, amount, 0.0).unsqueeze(-1))


def scaled(z: torch.Tensor, t: float, consume: bool) -> torch.Tensor:
    """``z / t`` as a buffer the caller may overwrite (``z`` itself when it may be consumed)."""
    if consume:
        return z.div_(t) if t != 1.0 else z
    return z / t if t != 1.0 else z.clone()
