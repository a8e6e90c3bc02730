"""Dropping ignored tokens' rows before the chunk loop.

Where many labels are ignored (the prompt of instruction tuning is often more than half of the
tokens), their logits and their share of every matmul are wasted: an ignored token contributes 0 to
the loss and gets a zero hidden-state gradient. :func:`select_valid_rows` keeps only the counted
rows of the hidden states (and the teacher's), so the chunk loop makes ``[n_valid, V]`` logits and
``n_valid``-row matmuls; autograd scatters the hidden-state gradient back (zero rows for the
dropped tokens). Per-token results are scattered back to every token by :func:`scatter_rows`.

Finding the rows takes one host sync per call (``nonzero``); nothing per chunk. Every rank of a
tensor-parallel group holds the same labels, so every rank keeps the same rows and runs the same
number of chunks (and collectives).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def select_valid_rows(
    x: torch.Tensor, tx: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """``(x, tx, labels, keep)`` restricted to the rows whose label is not ``ignore_index``.

    Args:
        x: ``[N, H]`` hidden states; tx: ``[N, Ht]`` teacher hidden states or None; labels: ``[N]``.

    Returns:
        The selected rows (``[n, H]``, ``[n, Ht]``, ``[n]``) and ``keep`` ``[n]`` (their indices), or the
        inputs unchanged and ``keep=None`` when every row counts.
    """
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if keep.numel() == labels.numel():
        return x, tx, labels, None
    return (
        x.index_select(0, keep),
        None if tx is None else tx.index_select(0, keep),
        labels.index_select(0, keep),
        keep,
    )


def scatter_rows(values: torch.Tensor, keep: Optional[torch.Tensor], num_rows: int) -> torch.Tensor:
    """Per-token ``values`` ``[n]`` of the kept rows back on all ``num_rows`` tokens (0 elsewhere);
    differentiable."""
    if keep is None:
        return values
    return values.new_zeros(num_rows).index_copy(0, keep, values)
