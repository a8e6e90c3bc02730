"""Unpaired preference losses (KTO, TRL 1.16's ``KTOTrainer``), fused: no ``[B, S, V]`` logits.

KTO batches are not pairs: each row is one completion with a label saying whether it is desirable.
Layout: hidden ``[B, S, H]``, labels ``[B, S]`` (``ignore_index`` at prompt and padding) and
``kto_labels`` ``[B]`` bool (True: desirable). The policy's per-token log-probabilities come from the
engine's chunk loop (:func:`tune_losses.linear_log_probs`); the formula is
:func:`tune_losses.alignment.formulas.unpaired_preference_losses`.

The KL reference point ``kl`` (no gradient, as TRL detaches it) is, in this order of precedence:

* given: ``kl`` (a number or a 0-dim / ``[1]`` tensor; Liger's ``kl`` argument, or a value the caller
  estimated, e.g. gathered over data-parallel ranks as TRL does);
* estimated as TRL's ``KTOTrainer`` does, from mismatched (prompt, completion) pairs of the same batch:
  ``kl_hidden`` ``[B', S', H]`` + ``kl_labels`` ``[B', S']`` run through the policy (no grad) and
  ``kl_ref_hidden`` (through the reference's weight) or ``kl_ref_logps`` ``[B']``:
  ``kl = max(mean(policy - reference), 0)`` over the B' sequence log-probs;
* 0 (``apo_zero_unpaired``, or KTO without a KL estimate).

A sequence counts when it has a valid token; the loss is the mean over counted sequences (TRL's mean
over the batch when every row has a completion), 0 with zero gradients when none counts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tune_losses.alignment.formulas import KTO_LOSS_TYPES, sequence_log_probs, unpaired_preference_losses
from tune_losses.alignment.log_probs import token_log_probs
from tune_losses.alignment.preference import check_count
from tune_losses.options import check_choice, check_float_option


class KTOOutput(NamedTuple):
    """Result of :func:`linear_kto_loss`: ``loss`` (0-dim, differentiable); detached, in the loss's dtype:
    ``rewards`` ``[B]`` (``beta (policy - reference)``), the policy's sequence log-probs ``logps`` ``[B]``
    (select desirable / undesirable rows with ``kto_labels``) and the ``kl`` reference point used."""

    loss: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    kl: torch.Tensor


def _seq_shape_check(name: str, t, shape) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, got {got}")


def _check_kto_labels(kto_labels, batch: int) -> None:
    _seq_shape_check("kto_labels", kto_labels, (batch,))
    if kto_labels.dtype != torch.bool:
        raise ValueError(f"kto_labels: expected a bool tensor (True: desirable), got {kto_labels.dtype}")


def _sequences(hidden, weight, bias, labels, average, ignore_index, chunk_size, name):
    tok = token_log_probs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, name=name
    )
    return sequence_log_probs(tok, labels != ignore_index, average)


def linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    kto_labels: torch.Tensor,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    kl=None,
    kl_hidden: Optional[torch.Tensor] = None,
    kl_labels: Optional[torch.Tensor] = None,
    kl_ref_hidden: Optional[torch.Tensor] = None,
    kl_ref_logps: Optional[torch.Tensor] = None,
    average_log_prob: bool = False,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    num_sequences=None,
) -> KTOOutput:
    """Fused KTO loss (TRL 1.16's ``KTOTrainer``: ``loss_type`` ``kto`` or ``apo_zero_unpaired``).

    Args:
        hidden: ``[B, S, H]`` the policy's final hidden states, one completion per row.
        weight: ``[V, H]`` output projection; bias ``[V]`` or None.
        labels: ``[B, S]`` next-token labels; ``ignore_index`` at prompt and padding.
        kto_labels: ``[B]`` bool, True where the completion is desirable.
        beta: inverse temperature (> 0); desirable_weight, undesirable_weight: TRL's (>= 0).
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states ``[B, S, H']`` and output
            layer (log-probs under no-grad), or
        ref_logps: ``[B]`` its sequence log-probs, or neither (zero reference).
        kl, kl_hidden, kl_labels, kl_ref_hidden, kl_ref_logps: the KL reference point (module docstring).
        average_log_prob: mean over valid tokens instead of TRL's sum.
        num_sequences: normalizer for exact gradient accumulation (a whole step's counted sequences);
            default: this batch's.
    """
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_float_option("beta", beta, 0.0, low_open=True)
    check_float_option("desirable_weight", desirable_weight, 0.0)
    check_float_option("undesirable_weight", undesirable_weight, 0.0)
    check_count("num_sequences", num_sequences)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a [B, S] tensor, got {got}")
    batch = labels.shape[0]
    _check_kto_labels(kto_labels, batch)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_weight: expected ref_hidden and ref_weight together")
    if ref_hidden is not None and ref_logps is not None:
        raise ValueError("ref_logps: give the reference either as ref_hidden + ref_weight or as ref_logps, not both")
    if kl is not None and kl_hidden is not None:
        raise ValueError("kl: give the KL reference point either as kl or as kl_hidden + kl_labels, not both")

    seq = _sequences(hidden, weight, bias, labels, average_log_prob, ignore_index, chunk_size, "hidden")
    dtype, device = seq.dtype, seq.device
    if ref_hidden is not None:
        with torch.no_grad():
            ref = _sequences(
                ref_hidden, ref_weight, ref_bias, labels, average_log_prob, ignore_index, chunk_size, "ref_hidden"
            )
    elif ref_logps is not None:
        _seq_shape_check("ref_logps", ref_logps, (batch,))
        ref = ref_logps.detach().to(device=device, dtype=dtype)
    else:
        ref = torch.zeros_like(seq)
    ref = ref.to(dtype)

    kl_value = _kl_point(
        kl, kl_hidden, kl_labels, kl_ref_hidden, kl_ref_logps, weight, bias, ref_weight, ref_bias,
        average_log_prob, ignore_index, chunk_size, dtype, device,
    )  # fmt: skip
    if loss_type == "apo_zero_unpaired":
        kl_value = torch.zeros_like(kl_value)
    counted = (labels != ignore_index).any(dim=-1)
    logratios = seq - ref
    desirable = kto_labels.to(device)
    per = unpaired_preference_losses(
        logratios,
        desirable,
        kl_value,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    total = torch.where(counted, per, torch.zeros_like(per)).sum()
    n = counted.sum() if num_sequences is None else torch.as_tensor(num_sequences, device=device)
    loss = total / n.clamp(min=1).to(dtype)
    return KTOOutput(loss, (beta * logratios).detach(), seq.detach(), kl_value)


def _kl_point(
    kl, kl_hidden, kl_labels, kl_ref_hidden, kl_ref_logps, weight, bias, ref_weight, ref_bias,
    average, ignore_index, chunk_size, dtype, device,
) -> torch.Tensor:  # fmt: skip
    """The KL reference point, 0-dim, detached (module docstring)."""
    if kl is not None:
        if isinstance(kl, torch.Tensor):
            if kl.numel() != 1 or not kl.is_floating_point():
                raise ValueError(f"kl: expected a number or a one-element float tensor, got shape {tuple(kl.shape)}")
            return kl.detach().reshape(()).to(device=device, dtype=dtype)
        check_float_option("kl", kl)
        return torch.tensor(float(kl), dtype=dtype, device=device)
    if kl_hidden is None:
        if kl_labels is not None or kl_ref_hidden is not None or kl_ref_logps is not None:
            raise ValueError("kl_hidden: the KL estimate needs kl_hidden and kl_labels (the mismatched completions)")
        return torch.zeros((), dtype=dtype, device=device)
    if not isinstance(kl_labels, torch.Tensor) or kl_labels.dim() != 2:
        raise ValueError("kl_labels: expected a [B', S'] tensor with kl_hidden")
    with torch.no_grad():
        policy = _sequences(kl_hidden, weight, bias, kl_labels, average, ignore_index, chunk_size, "kl_hidden")
        if kl_ref_hidden is not None:
            if ref_weight is None:
                raise ValueError("kl_ref_hidden: needs ref_weight (the reference's output layer)")
            ref = _sequences(
                kl_ref_hidden, ref_weight, ref_bias, kl_labels, average, ignore_index, chunk_size, "kl_ref_hidden"
            )
        elif kl_ref_logps is not None:
            _seq_shape_check("kl_ref_logps", kl_ref_logps, (kl_labels.shape[0],))
            ref = kl_ref_logps.detach().to(device)
        else:
            ref = torch.zeros_like(policy)
        return (policy.to(dtype) - ref.to(dtype)).mean().clamp(min=0)
