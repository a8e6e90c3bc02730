"""What DPO adds to the training loop: a frozen reference model, preference batches, pair-exact
normalization and torchtune's DPO metrics.

Batches come from torchtune's preference dataset builders and ``padded_collate_dpo``: tokens and labels
``[2B, S]``, the B chosen sequences first. Two loss kinds, chosen by YAML alone:

* fused (:class:`tune_losses.LinearPreferenceLoss`): policy and reference return hidden states; the
  loss makes per-token log-probabilities in the engine's chunk loop, no ``[2B, S, V]`` logits;
* sequence-level (torchtune's ``DPOLoss`` / ``RSOLoss``, or :class:`tune_losses.DPOLoss`): full logits
  from both models, torchtune's ``get_batch_log_probs``, then the loss on ``[B]`` log-probabilities.

Either way a micro-batch yields :class:`tune_losses.alignment.PreferenceTerms` (sums and counts), so an
optimizer step divides by the pairs (and, for an NLL term, the chosen tokens) of all its micro-batches
on all data-parallel ranks, counted before the first backward: batch 4, batch 2 x 2 accumulation steps
and 2 ranks x batch 2 give the same loss and gradients.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from tune_losses.alignment.formulas import split_pairs
from tune_losses.alignment.preference import PreferenceTerms

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "log_probs/chosen", "log_probs/rejected")
"""torchtune's DPO metric names (its recipes also log mean logits, which a fused loss never makes)."""


def is_fused_preference_loss(loss_fn: nn.Module) -> bool:
    """Fused losses take the models' output projections (``set_model_output`` / ``set_reference_output``)."""
    return callable(getattr(loss_fn, "set_model_output", None)) and callable(getattr(loss_fn, "set_reference_output", None))


def needs_reference(loss_fn: nn.Module) -> bool:
    """Whether the loss needs the reference model (SimPO and ORPO do not; torchtune's losses always do)."""
    return bool(getattr(loss_fn, "needs_reference", True))


def count_pairs_and_tokens(labels: Sequence[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """``[2]`` int64 ``(pairs that count, chosen valid tokens)`` over micro-batches of ``[2B, S]`` labels.

    A pair counts when both its sequences have a valid token (as in the losses). The caller all-reduces
    the result over the data-parallel ranks before the first backward of the step.
    """
    total = None
    for lab in labels:
        n = (lab != ignore_index).sum(dim=-1)
        n_c, n_r = split_pairs(n)
        here = torch.stack([((n_c > 0) & (n_r > 0)).sum(), n_c.sum()])
        total = here if total is None else total + here
    if total is None:
        raise ValueError("labels: expected at least one micro-batch of preference labels, got none")
    return total


class PreferenceForward:
    """Policy and reference forward passes of one preference micro-batch, for either loss kind.

    Args:
        loss_fn: a fused preference loss, or a sequence-level one with torchtune's ``forward(policy_chosen,
            policy_rejected, reference_chosen, reference_rejected) -> (losses, chosen_rewards,
            rejected_rewards)``.
        policy: the trained model.
        reference: the frozen reference model (eval mode, no grad), or None when the loss needs none.
        ignore_index: the labels' ignore index.

    Fused losses get the models' output projections here (both models then return hidden states);
    sequence-level losses leave the models returning full logits.
    """

    def __init__(self, loss_fn: nn.Module, policy: nn.Module, reference: Optional[nn.Module], ignore_index: int):
        self.loss_fn = loss_fn
        self.policy = policy
        self.reference = reference
        self.ignore_index = ignore_index
        self.fused = is_fused_preference_loss(loss_fn)
        if needs_reference(loss_fn) and reference is None:
            raise ValueError(f"reference: {type(loss_fn).__name__} needs a reference model, got none")
        if self.fused:
            loss_fn.set_model_output(policy)
            if reference is not None:
                loss_fn.set_reference_output(reference)

    def _reference_out(self, tokens: torch.Tensor, kwargs) -> Optional[torch.Tensor]:
        if self.reference is None:
            return None
        with torch.no_grad():
            return self.reference(tokens, **kwargs)

    def terms(self, tokens: torch.Tensor, labels: torch.Tensor, raw_labels: torch.Tensor, **kwargs) -> PreferenceTerms:
        """Sums and counts of one micro-batch.

        Args:
            tokens: ``[2B, S]`` input ids.
            labels: ``[2B, S]`` next-token labels aligned with the model's outputs (shifted).
            raw_labels: ``[2B, S]`` the collate's unshifted labels (torchtune's ``get_batch_log_probs``
                shifts them itself).
            kwargs: extra model inputs (``mask``, ``input_pos``).
        """
        out = self.policy(tokens, **kwargs)
        ref_out = self._reference_out(tokens, kwargs)
        if self.fused:
            return self.loss_fn.terms(out, labels, ref_hidden=ref_out)
        return self._sequence_level_terms(out, ref_out, labels, raw_labels)

    def _sequence_level_terms(self, logits, ref_logits, labels, raw_labels) -> PreferenceTerms:
        from torchtune.rlhf import get_batch_log_probs

        if isinstance(logits, list):  # chunked output: full logits, as torchtune's DPO recipes make them
            logits = torch.cat(logits, dim=1)
            ref_logits = torch.cat(ref_logits, dim=1)
        logps = get_batch_log_probs(logits, raw_labels, label_pad_token_id=self.ignore_index)
        with torch.no_grad():
            ref_logps = get_batch_log_probs(ref_logits, raw_labels, label_pad_token_id=self.ignore_index)
        chosen, rejected = split_pairs(logps)
        ref_c, ref_r = split_pairs(ref_logps)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(chosen, rejected, ref_c, ref_r)
        n_c, n_r = split_pairs((labels != self.ignore_index).sum(dim=-1))
        counted = (n_c > 0) & (n_r > 0)
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        return PreferenceTerms(
            pair_loss_sum=torch.where(counted, losses, torch.zeros_like(losses)).sum(),
            num_pairs=counted.sum(), nll_sum=zero, num_chosen_tokens=n_c.sum(), nll_weight=0.0,
            chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach(),
            chosen_logps=chosen.detach(), rejected_logps=rejected.detach(), counted=counted)


def metric_sums(terms: PreferenceTerms) -> Dict[str, torch.Tensor]:
    """Sums over counted pairs of torchtune's DPO metrics (divide by the step's pairs to log means)."""
    m = terms.counted
    cr, rr = terms.chosen_rewards.float(), terms.rejected_rewards.float()

    def total(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x.float(), torch.zeros_like(x, dtype=torch.float32)).sum()

    return {
        "rewards/chosen": total(cr),
        "rewards/rejected": total(rr),
        "rewards/accuracies": total((cr > rr).float()),
        "rewards/margins": total(cr - rr),
        "log_probs/chosen": total(terms.chosen_logps),
        "log_probs/rejected": total(terms.rejected_logps),
    }


def scaled_loss(terms: PreferenceTerms, step_counts: torch.Tensor, dp_size: int) -> torch.Tensor:
    """The micro-batch's share of the step's loss: ``dp * (pair sum / step pairs + w nll / step tokens)``.

    FSDP2 averages gradients over the dp ranks, hence ``* dp``; ``step_counts`` is
    :func:`count_pairs_and_tokens` summed over the step's micro-batches and the dp ranks.
    """
    return dp_size * terms.loss(num_pairs=step_counts[0], num_chosen_tokens=step_counts[1])


@torch.no_grad()
def evaluate(forward: PreferenceForward, batches: Iterable, device: torch.device, ignore_index: int,
             shift) -> Dict[str, torch.Tensor]:
    """Sums over counted pairs of the loss and the DPO metrics on ``batches`` (no grad), plus ``pairs``.

    ``shift(labels)`` aligns the collate's labels with the model's outputs. The caller all-reduces and
    divides by ``pairs``.
    """
    sums: Dict[str, torch.Tensor] = {}
    for tokens, raw in batches:
        tokens, raw = tokens.to(device), raw.to(device)
        terms = forward.terms(tokens, shift(raw), raw)
        part = {"loss": terms.pair_loss_sum.float(), "pairs": terms.num_pairs.float(), **metric_sums(terms)}
        for k, v in part.items():
            sums[k] = sums.get(k, 0) + v
    return sums


def mean_metrics(sums: Dict[str, torch.Tensor], pairs: torch.Tensor, prefix: str = "") -> Dict[str, float]:
    """``{prefix + name: sum / pairs}`` read to the host (one transfer), for logging."""
    keys = [k for k in sums if k != "pairs"]
    values = (torch.stack([sums[k].float() for k in keys]) / pairs.clamp(min=1).float()).tolist()
    return {prefix + k: v for k, v in zip(keys, values)}

