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
  ``kl=KLEstimate(hidden [B', S', H], labels [B', S'], ref_hidden=..., ref_logps=...)``: its hidden
  states run through the policy (no grad) and ``ref_hidden`` through the reference's output layer,
  or ``ref_logps`` ``[B']``: ``kl = max(mean(policy - reference), 0)`` over the B' sequence log-probs;
* 0 (``apo_zero_unpaired``, or KTO without a KL estimate).

A sequence counts when it has a valid token; the loss is the mean over counted sequences (TRL's mean
over the batch when every row has a completion), 0 with zero gradients when none counts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from tune_losses.alignment.formulas import sequence_log_probs, unpaired_preference_losses
from tune_losses.alignment.log_probs import POLICY_NAMES, REFERENCE_NAMES, run_options, token_log_probs
from tune_losses.alignment.options import KLEstimate, KTOOptions, Reference
from tune_losses.alignment.preference import check_count, reference_argument
from tune_losses.deprecation import no_more, options_object, take, warn_deprecated
from tune_losses.options import IGNORE_INDEX, ExecutionOptions, check_float_option


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


_KTO_FIELDS = tuple(KTOOptions.__dataclass_fields__)
_KL_FIELDS = ("kl_hidden", "kl_labels", "kl_ref_hidden", "kl_ref_logps")
_EXECUTION_FIELDS = ("algorithm", "drop_ignored_tokens", "dw_accumulation")


def _sequences(hidden, weight, bias, labels, average, run, names=POLICY_NAMES):
    tok = token_log_probs(hidden, weight, bias, labels, run, names=names)
    return sequence_log_probs(tok, labels != run.ignore_index, average)


def _kl_argument(fn: str, kl, deprecated: dict):
    """``kl`` (a number, a one-element tensor, a :class:`KLEstimate` or None), or a KLEstimate made
    from the old flat ``kl_hidden`` / ``kl_labels`` / ``kl_ref_hidden`` / ``kl_ref_logps`` (taken out
    of ``deprecated``) with a DeprecationWarning."""
    flat = {k: v for k, v in take(deprecated, _KL_FIELDS).items() if v is not None}
    if not flat:
        return kl
    if kl is not None:
        raise ValueError("kl: give the KL reference point either as kl or as kl_hidden + kl_labels, not both")
    if "kl_hidden" not in flat or "kl_labels" not in flat:
        raise ValueError("kl_hidden: the KL estimate needs kl_hidden and kl_labels (the mismatched completions)")
    warn_deprecated(
        f"{fn}({', '.join(f'{k}=' for k in flat)}...)", "kl=KLEstimate(hidden, labels, ref_hidden, ref_logps)"
    )
    return KLEstimate(flat["kl_hidden"], flat["kl_labels"], flat.get("kl_ref_hidden"), flat.get("kl_ref_logps"))


def linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    kto_labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reference: Optional[Reference] = None,
    ref_logps: Optional[torch.Tensor] = None,
    kl: Union[float, torch.Tensor, KLEstimate, None] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    num_sequences=None,
    options: Optional[KTOOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> KTOOutput:
    """Fused KTO loss (TRL 1.16's ``KTOTrainer``: ``loss_type`` ``kto`` or ``apo_zero_unpaired``).

    Args:
        hidden: ``[B, S, H]`` the policy's final hidden states, one completion per row.
        weight: ``[V, H]`` output projection; bias ``[V]`` or None.
        labels: ``[B, S]`` next-token labels; ``ignore_index`` at prompt and padding.
        kto_labels: ``[B]`` bool, True where the completion is desirable.
        reference: the reference model as a :class:`~tune_losses.alignment.options.Reference`
            ``(hidden [B, S, H'], weight, bias)`` (log-probs under no-grad), or
        ref_logps: ``[B]`` its sequence log-probs, or neither (zero reference).
        kl: the KL reference point: a number or a one-element tensor, a
            :class:`~tune_losses.alignment.options.KLEstimate` (TRL's estimate from mismatched
            completions; its ``ref_hidden`` goes through ``reference``'s output layer), or None (0).
        chunk_size: tokens per chunk (None: the engine's rule).
        num_sequences: normalizer for exact gradient accumulation (a whole step's counted sequences);
            default: this batch's.
        options: :class:`~tune_losses.alignment.options.KTOOptions`: ``loss_type``, ``beta``,
            ``desirable_weight``, ``undesirable_weight``, ``average_log_prob``, ``validate``.
        execution: :class:`~tune_losses.options.ExecutionOptions`: ``dw_accumulation``,
            ``drop_ignored_tokens``; ``algorithm`` ``auto`` or ``recompute`` (this loss has the
            per-token path only).
        deprecated: the old flat keywords (the KTOOptions fields, ``ref_hidden`` / ``ref_weight`` /
            ``ref_bias``, ``kl_hidden`` / ``kl_labels`` / ``kl_ref_hidden`` / ``kl_ref_logps``) still
            work, with a DeprecationWarning naming the new form.
    """
    fn = "linear_kto_loss"
    opts = options_object(fn, "options", KTOOptions, options, take(deprecated, _KTO_FIELDS))
    reference = reference_argument(fn, reference, deprecated)
    kl = _kl_argument(fn, kl, deprecated)
    execution = options_object(fn, "execution", ExecutionOptions, execution, take(deprecated, _EXECUTION_FIELDS))
    no_more(fn, deprecated)
    if execution.algorithm == "grad_in_forward":
        raise ValueError("algorithm: linear_kto_loss has the per-token path only; use 'auto' or 'recompute'")
    run = run_options(chunk_size, ignore_index, opts.validate, execution)
    check_count("num_sequences", num_sequences)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a [B, S] tensor, got {got}")
    batch = labels.shape[0]
    _check_kto_labels(kto_labels, batch)
    if reference is not None and ref_logps is not None:
        raise ValueError("ref_logps: give the reference either as reference= or as ref_logps, not both")

    seq = _sequences(hidden, weight, bias, labels, opts.average_log_prob, run)
    dtype, device = seq.dtype, seq.device
    if reference is not None:
        with torch.no_grad():
            ref = _sequences(*reference[:3], labels, opts.average_log_prob, run, REFERENCE_NAMES)
    elif ref_logps is not None:
        _seq_shape_check("ref_logps", ref_logps, (batch,))
        ref = ref_logps.detach().to(device=device, dtype=dtype)
    else:
        ref = torch.zeros_like(seq)
    ref = ref.to(dtype)

    kl_value = _kl_point(kl, weight, bias, reference, opts.average_log_prob, run, dtype, device)
    if opts.loss_type == "apo_zero_unpaired":
        kl_value = torch.zeros_like(kl_value)
    counted = (labels != ignore_index).any(dim=-1)
    logratios = seq - ref
    per = unpaired_preference_losses(logratios, kto_labels.to(device), kl_value, opts)
    total = torch.where(counted, per, torch.zeros_like(per)).sum()
    n = counted.sum() if num_sequences is None else torch.as_tensor(num_sequences, device=device)
    loss = total / n.clamp(min=1).to(dtype)
    return KTOOutput(loss, (opts.beta * logratios).detach(), seq.detach(), kl_value)


def _kl_point(kl, weight, bias, reference, average, run, dtype, device) -> torch.Tensor:
    """The KL reference point, 0-dim, detached (module docstring)."""
    if kl is None:
        return torch.zeros((), dtype=dtype, device=device)
    if isinstance(kl, torch.Tensor):
        if kl.numel() != 1 or not kl.is_floating_point():
            raise ValueError(f"kl: expected a number or a one-element float tensor, got shape {tuple(kl.shape)}")
        return kl.detach().reshape(()).to(device=device, dtype=dtype)
    if not isinstance(kl, KLEstimate):
        check_float_option("kl", kl)
        return torch.tensor(float(kl), dtype=dtype, device=device)
    if not isinstance(kl.labels, torch.Tensor) or kl.labels.dim() != 2:
        raise ValueError("kl.labels: expected a [B', S'] tensor")
    with torch.no_grad():
        policy = _sequences(kl.hidden, weight, bias, kl.labels, average, run, ("kl.hidden", "weight", "bias"))
        if kl.ref_hidden is not None:
            if reference is None:
                raise ValueError("kl.ref_hidden: needs reference= (the reference's output layer)")
            names = ("kl.ref_hidden", "reference.weight", "reference.bias")
            ref = _sequences(kl.ref_hidden, reference.weight, reference.bias, kl.labels, average, run, names)
        elif kl.ref_logps is not None:
            _seq_shape_check("kl.ref_logps", kl.ref_logps, (kl.labels.shape[0],))
            ref = kl.ref_logps.detach().to(device)
        else:
            ref = torch.zeros_like(policy)
        return (policy.to(dtype) - ref.to(dtype)).mean().clamp(min=0)
