"""The (sum, num_tokens) contract and exact token normalization.

A loss reports the sum of its per-token values over valid tokens and the number of valid tokens.
Whoever owns the optimizer step counts the valid tokens of the whole step (all micro-batches, all
data-parallel ranks) *before* any backward pass, then backpropagates ``sum / global_count`` for each
micro-batch: gradients need no rescaling afterwards and equal those of one big batch (torchtitan's
way). Everything stays on device: no host sync.
"""

from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from tune_losses.options import IGNORE_INDEX, check_int_option
from tune_losses.validation import check_labels_dtype, check_tensor


class LossSum(NamedTuple):
    """A loss's sum over valid tokens (0-dim fp32, in the autograd graph) and their count (0-dim int64).

    ``parts`` optionally names detached partial sums for logging (distillation: class_loss, kd_loss).
    """

    total: torch.Tensor
    num_tokens: torch.Tensor
    parts: Optional[Dict[str, torch.Tensor]] = None

    def mean(self) -> torch.Tensor:
        """``total / num_tokens``; 0 (with zero gradients) when there is no valid token."""
        return normalize(self.total, self.num_tokens)


def normalize(total: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """``total / max(num_tokens, 1)``: a batch with no valid token has total 0, so this is 0, not NaN."""
    check_tensor("total", total)
    check_tensor("num_tokens", num_tokens, "(a token count, e.g. from count_valid_tokens)")
    return total / num_tokens.clamp(min=1).to(total.dtype)


def count_valid_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of labels that are not ``ignore_index``, as a 0-dim int64 tensor on labels' device."""
    check_labels_dtype(labels)
    check_int_option("ignore_index", ignore_index)
    return (labels != ignore_index).sum()


def count_step_tokens(
    label_batches: Iterable[torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Valid tokens of a whole optimizer step: over every micro-batch, summed over ``group``'s ranks.

    Call it before the first backward of the step. Every rank must call it (it is a collective
    whenever torch.distributed is initialized), also a rank whose labels are all ignored.
    """
    total = None
    for labels in label_batches:
        n = count_valid_tokens(labels, ignore_index)
        total = n if total is None else total + n
    if total is None:
        raise ValueError("label_batches: expected at least one micro-batch of labels, got none")
    return all_reduce_token_count(total, group)


def all_reduce_token_count(num_tokens: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum a token count over the ranks of ``group`` (identity when not distributed). Returns a new tensor."""
    check_tensor("num_tokens", num_tokens, "(a token count)")
    num_tokens = num_tokens.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_tokens, op=dist.ReduceOp.SUM, group=group)
    return num_tokens


def megatron_loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Megatron-style ``loss_func`` over per-token losses.

    Args:
        loss_mask: ``[B, S]`` (or any shape) 1 for tokens that count, 0 otherwise.
        output_tensor: per-token losses of the same shape (e.g. ``linear_cross_entropy(...,
            reduction="none")``).

    Returns:
        ``(loss_sum, num_tokens, {"lm loss": tensor([loss_sum, num_tokens])})``: the trainer sums
        both over micro-batches and ranks (see :func:`all_reduce_token_count`) and divides once.
        The metric is detached, fp32, for logging.
    """
    check_tensor("loss_mask", loss_mask)
    check_tensor("output_tensor", output_tensor, "of per-token losses")
    if loss_mask.shape != output_tensor.shape:
        raise ValueError(
            f"loss_mask: expected shape {tuple(output_tensor.shape)} (as output_tensor), got {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.reshape(-1).bool()
    # where, not multiply: a masked token's value (NaN from an ignored label, say) must not leak.
    # Summed in fp32 (Megatron's loss_func upcasts too): a bf16 sum over thousands of tokens loses
    # digits, and the (sum, num_tokens) contract promises an fp32 total.
    loss_sum = torch.where(mask, output_tensor.reshape(-1).float(), 0.0).sum()
    num_tokens = mask.sum()
    metric = torch.stack([loss_sum.detach().float(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": metric}
