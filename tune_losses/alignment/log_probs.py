"""The one place the alignment losses reach the engine: per-token log-probabilities of the labels.

Every fused alignment loss is a small formula over the engine's log-probability term (the one
:func:`tune_losses.linear_log_probs` runs) in its one chunk loop; nothing here loops over chunks or
makes logits. A call checks its flat options once (:func:`run_options`) and hands the result to
each model side it scores (:func:`token_log_probs`).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from tune_losses.fused.functional import RunOptions, Side, _run_options, log_probs_run
from tune_losses.options import ExecutionOptions, VocabParallelOptions, check_int_option
from tune_losses.validation import check_float

POLICY_NAMES = ("hidden", "weight", "bias")
REFERENCE_NAMES = ("reference.hidden", "reference.weight", "reference.bias")


def _check_hidden(name: str, hidden: torch.Tensor, labels: torch.Tensor) -> None:
    check_float(name, hidden)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{name}: expected shape [B, S, H] with [B, S] = labels' {tuple(labels.shape)}, got {tuple(hidden.shape)}"
        )


def run_options(
    chunk_size: Optional[int], ignore_index: int, validate: bool, execution: Optional[ExecutionOptions]
) -> RunOptions:
    """The engine's options for one alignment call, checked here once: ``chunk_size`` (tokens per
    chunk, an int >= 1 or None), ``ignore_index`` (an int), ``validate`` (checked by its options
    object) and ``execution``'s ``drop_ignored_tokens`` / ``dw_accumulation`` (the per-token path
    always recomputes in backward)."""
    check_int_option("ignore_index", ignore_index)
    ex = ExecutionOptions() if execution is None else execution
    per_token = ExecutionOptions("recompute", ex.drop_ignored_tokens, ex.dw_accumulation)
    return _run_options("none", chunk_size, ignore_index, validate, VocabParallelOptions(), per_token)


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    run: RunOptions,
    *,
    names: Tuple[str, str, str] = POLICY_NAMES,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``[B, S]`` log-probabilities of ``labels`` under ``hidden @ weight.T + bias`` at ``temperature``
    (0 at ignored tokens), and with ``return_entropy`` the per-token entropy ``[B, S]``.

    hidden ``[B, S, H]``, weight ``[V, H]``, bias ``[V]`` or None, labels ``[B, S]``; ``names``: the
    three tensors' argument names, for errors. Differentiable to hidden, weight and bias.
    """
    _check_hidden(names[0], hidden, labels)
    return log_probs_run(Side(hidden, weight, bias, names), labels, run, temperature, return_entropy)
