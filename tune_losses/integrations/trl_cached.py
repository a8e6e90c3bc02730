"""A cached teacher for :class:`tune_losses.integrations.trl.FusedDistillationTrainer`: no teacher model.

A dataset whose rows carry the teacher's distribution over fixed completions, cached ahead of training:

* ``prompt_ids`` ``[P]`` and ``completion_ids`` ``[C]`` (token ids, lists or tensors);
* ``teacher_ids`` ``[C, k]``: row ``t`` the ids of the teacher's entries for completion token ``t``
  (predicted from the prompt and ``completion_ids[:t]``), -1 for an unused slot;
* ``teacher_logprobs`` ``[C, k]``: their log-probabilities at the trainer's temperature.

Such rows are batched as they are (no generation: the cache belongs to these completions), and the
loss is :func:`tune_losses.linear_sparse_kd_loss` of the student against the cache over the
completion tokens, normalized like the dense path (TRL's token count; no ``T^2`` unless
``scale_by_temperature_squared``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from tune_losses.fused.sparse import linear_sparse_kd_loss
from tune_losses.integrations.token_stats import token_stats
from tune_losses.options import IGNORE_INDEX, SparseKDOptions

CACHED_COLUMNS = ("prompt_ids", "completion_ids", "teacher_ids", "teacher_logprobs")


def is_cached_batch(rows: Sequence[Dict[str, Any]]) -> bool:
    """Whether dataset rows carry a cached teacher (``teacher_ids``)."""
    return len(rows) > 0 and "teacher_ids" in rows[0]


def _rows_tensor(value, dtype) -> torch.Tensor:
    return value.to(dtype) if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)


def cached_batch(rows: Sequence[Dict[str, Any]], pad_id: int, device, gather) -> Dict[str, torch.Tensor]:
    """The trainer's batch from cached rows: prompts left-padded, completions right-padded, the teacher's
    ``[B, C, k]`` padded with id -1 (and log-probability 0); ``gather`` sums the token count over ranks."""
    missing = [c for c in CACHED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"train_dataset: rows with teacher_ids also need the columns {missing} (a cached teacher)")
    prompts = [_rows_tensor(r["prompt_ids"], torch.long) for r in rows]
    completions = [_rows_tensor(r["completion_ids"], torch.long) for r in rows]
    ids = [_rows_tensor(r["teacher_ids"], torch.long) for r in rows]
    lps = [_rows_tensor(r["teacher_logprobs"], torch.float32) for r in rows]
    k = ids[0].shape[-1] if ids[0].dim() == 2 else 0
    for i, (c, t, lp) in enumerate(zip(completions, ids, lps)):
        if t.dim() != 2 or t.shape != (len(c), k) or lp.shape != t.shape:
            raise ValueError(
                f"teacher_ids, teacher_logprobs: expected [{len(c)}, {k}] in row {i} (one entry list per "
                f"completion token), got {tuple(t.shape)} and {tuple(lp.shape)}"
            )
    b, p_len, c_len = len(rows), max(len(p) for p in prompts), max(len(c) for c in completions)
    out = {
        "prompt_ids": torch.full((b, p_len), pad_id, dtype=torch.long),
        "prompt_mask": torch.zeros(b, p_len, dtype=torch.long),
        "completion_ids": torch.full((b, c_len), pad_id, dtype=torch.long),
        "completion_mask": torch.zeros(b, c_len, dtype=torch.long),
        "teacher_ids": torch.full((b, c_len, k), -1, dtype=torch.long),
        "teacher_logprobs": torch.zeros(b, c_len, k),
    }
    for i, (p, c, t, lp) in enumerate(zip(prompts, completions, ids, lps)):
        if len(p):
            out["prompt_ids"][i, -len(p) :], out["prompt_mask"][i, -len(p) :] = p, 1
        out["completion_ids"][i, : len(c)], out["completion_mask"][i, : len(c)] = c, 1
        out["teacher_ids"][i, : len(c)], out["teacher_logprobs"][i, : len(c)] = t, lp
    out = {name: v.to(device) for name, v in out.items()}
    out["num_items_in_batch"] = gather(out["completion_mask"].sum()).sum()
    return out


def completion_labels(loss_mask: torch.Tensor, device) -> torch.Tensor:
    """Labels ``[B, C]`` for a divergence over the completion tokens: 0 where ``loss_mask`` is set,
    :data:`~tune_losses.options.IGNORE_INDEX` elsewhere (only the mask matters to a divergence)."""
    return torch.where(loss_mask.to(device) != 0, 0, IGNORE_INDEX)


def cached_teacher_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    labels: torch.Tensor,
    inputs: Dict[str, torch.Tensor],
    *,
    temperature: float,
    tail: str,
    scale_by_temperature_squared: bool,
    chunk_size,
) -> torch.Tensor:
    """The summed :func:`tune_losses.linear_sparse_kd_loss` of the student's completion hidden states
    ``[B, C, H]`` (and its head) against the batch's cached teacher ``[B, C, k]``, at the tokens of
    :func:`completion_labels`; no ``T^2`` unless ``scale_by_temperature_squared`` (TRL's convention)."""
    for name in ("teacher_ids", "teacher_logprobs"):
        if name not in inputs:
            raise ValueError(
                f"inputs: no {name!r} in the batch and no teacher_model: pass a teacher_model or a dataset "
                f"with the cached columns {list(CACHED_COLUMNS)}"
            )
    device = weight.device
    loss = linear_sparse_kd_loss(
        hidden,
        weight,
        labels,
        inputs["teacher_ids"].to(device),
        inputs["teacher_logprobs"].to(device),
        bias=bias,
        reduction="sum",
        chunk_size=chunk_size,
        options=SparseKDOptions(temperature, tail, IGNORE_INDEX),
    )
    return loss if scale_by_temperature_squared else loss / temperature**2


def normalized_with_stats(
    loss_sum: torch.Tensor, hidden, weight, bias, labels: torch.Tensor, num_items_in_batch, temperature, chunk_size
):
    """``(loss, entropy sum, token count)`` as TRL's distillation trainer returns them: ``loss_sum``
    over ``num_items_in_batch`` (else this batch's tokens), and the student's entropy at temperature T
    over the tokens of :func:`completion_labels` (dense and cached teacher alike)."""
    t = temperature
    stats = token_stats(
        hidden / t,
        weight,
        labels,
        bias=None if bias is None else bias / t,
        ignore_index=IGNORE_INDEX,
        chunk_size=chunk_size,
    )
    denom = stats.count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denom):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom, stats.entropy, stats.count


def signature_columns(columns: List[str]) -> List[str]:
    """The trainer's kept dataset columns plus the cached teacher's."""
    return list(columns) + [c for c in CACHED_COLUMNS if c not in columns]
