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

from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training

from tune_losses.accounting import LossSum, all_reduce_token_count
from tune_losses.alignment.formulas import counted_pairs, split_pairs
from tune_losses.alignment.preference import PreferenceTerms
from tune_losses.heads import configure_model_for_loss
from tune_losses.options import IGNORE_INDEX
from tune_losses.training import data
from tune_losses.training.loop import LossRecipe
from tune_losses.training.memory import peak_memory_of

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "log_probs/chosen",
    "log_probs/rejected",
)
"""torchtune's DPO metric names (its recipes also log mean logits, which a fused loss never makes)."""


def is_fused_preference_loss(loss_fn: nn.Module) -> bool:
    """Fused losses take the models' output projections (``set_model_output`` / ``set_reference_output``)."""
    return callable(getattr(loss_fn, "set_model_output", None)) and callable(
        getattr(loss_fn, "set_reference_output", None)
    )


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
        here = torch.stack([counted_pairs(n_c, n_r).sum(), n_c.sum()])
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

    def __init__(self, loss_fn: Any, policy: nn.Module, reference: Optional[nn.Module], ignore_index: int):
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

    def terms(self, tokens: torch.Tensor, labels: torch.Tensor, **kwargs) -> PreferenceTerms:
        """Sums and counts of one micro-batch.

        Args:
            tokens: ``[2B, S]`` input ids, chosen rows first.
            labels: ``[2B, S]`` next-token labels aligned with the model's outputs (shifted).
            kwargs: extra model inputs (``mask``, ``input_pos``).
        """
        out = self.policy(tokens, **kwargs)
        ref_out = self._reference_out(tokens, kwargs)
        if self.fused:
            return self.loss_fn.terms(out, labels, ref_hidden=ref_out)
        return self._sequence_level_terms(out, ref_out, labels)

    def _sequence_level_terms(self, logits, ref_logits, labels) -> PreferenceTerms:
        from torchtune.rlhf import get_batch_log_probs

        # torchtune's get_batch_log_probs shifts (drops the first label and the last logit) itself:
        # hand it the labels unshifted (the first column it drops is never read).
        raw_labels = torch.cat([torch.full_like(labels[:, :1], self.ignore_index), labels[:, :-1]], dim=1)
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
        counted = counted_pairs(n_c, n_r)
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        return PreferenceTerms(
            pair_loss_sum=torch.where(counted, losses, torch.zeros_like(losses)).sum(),
            num_pairs=counted.sum(),
            nll_sum=zero,
            num_chosen_tokens=n_c.sum(),
            nll_weight=0.0,
            chosen_rewards=chosen_rewards.detach(),
            rejected_rewards=rejected_rewards.detach(),
            chosen_logps=chosen.detach(),
            rejected_logps=rejected.detach(),
            counted=counted,
        )


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
def evaluate(
    forward: PreferenceForward, batches: Iterable, device: torch.device, ignore_index: int, shift
) -> Dict[str, torch.Tensor]:
    """Sums over counted pairs of the loss and the DPO metrics on ``batches`` (no grad), plus ``pairs``.

    ``shift(labels)`` aligns the collate's labels with the model's outputs. The caller all-reduces and
    divides by ``pairs``.
    """
    sums: Dict[str, torch.Tensor] = {}
    for batch in batches:
        tokens, raw = batch["tokens"].to(device), batch["labels"].to(device)
        terms = forward.terms(tokens, shift(raw))
        part = {"loss": terms.pair_loss_sum.float(), "pairs": terms.num_pairs.float(), **metric_sums(terms)}
        for k, v in part.items():
            sums[k] = sums.get(k, 0) + v
    return sums


def mean_metrics(sums: Dict[str, torch.Tensor], pairs: torch.Tensor, prefix: str = "") -> Dict[str, float]:
    """``{prefix + name: sum / pairs}`` read to the host (one transfer), for logging."""
    keys = [k for k in sums if k != "pairs"]
    values = (torch.stack([sums[k].float() for k in keys]) / pairs.clamp(min=1).float()).tolist()
    return {prefix + k: v for k, v in zip(keys, values)}


def padded_collate_preference(samples, padding_idx: int = 0, ignore_idx: int = IGNORE_INDEX) -> Dict[str, torch.Tensor]:
    """torchtune's ``padded_collate_dpo`` as a dict ``{"tokens": [2B, S], "labels": [2B, S]}`` (chosen first)."""
    from torchtune.data import padded_collate_dpo

    tokens, labels = padded_collate_dpo(samples, padding_idx=padding_idx, ignore_idx=ignore_idx)
    return {"tokens": tokens, "labels": labels}


class DPORecipe(LossRecipe):
    """Preference optimization (DPO family), torchtune-shaped: setup / train / save_checkpoint / cleanup.

    Config keys: those of :class:`tune_losses.training.LossRecipe` with ``loss`` a preference loss
    (:class:`tune_losses.LinearPreferenceLoss`, fused; or torchtune's / our ``DPOLoss`` / ``RSOLoss`` on
    full logits) and ``dataset`` a preference dataset (torchtune's ``preference_dataset``), plus:

    * ``ref_model`` / ``ref_checkpointer`` (torchtune's DPO configs name the latter so): the frozen
      reference (default: ``model`` and ``checkpointer``, i.e. the initial policy); not built for
      SimPO / ORPO;
    * ``eval_dataset`` (optional): held-out pairs, evaluated before training, every
      ``eval_every_n_steps`` and after the last step (``eval/loss``, ``eval/rewards/accuracies``, ...);
      ``eval_batch_size`` (default ``batch_size``).

    Logged per step: ``loss`` (mean over the step's pairs, plus any NLL term), torchtune's DPO metrics
    (means over pairs) ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``log_probs/chosen``, ``log_probs/rejected``, and ``grad_norm``, ``lr``,
    ``tokens_per_second_per_rank``.
    """

    tasks = ("dpo",)  # its config keys are listed in tune_losses.training.settings.COMPONENT_KEYS

    def __init__(self, cfg: DictConfig, distributed: bool):
        super().__init__(cfg, task="dpo", distributed=distributed)
        self.eval_every_n_steps = cfg.get("eval_every_n_steps", None)
        if self.eval_every_n_steps is not None and (
            not isinstance(self.eval_every_n_steps, int) or self.eval_every_n_steps < 1
        ):
            raise ValueError(f"eval_every_n_steps: expected an int >= 1 or null, got {self.eval_every_n_steps!r}")

    def setup(self, cfg: DictConfig) -> None:
        super().setup(cfg)
        loss_module = self.loss.loss
        self.reference = None
        if needs_reference(loss_module):
            ref_ckpt = config.instantiate(cfg.get("ref_checkpointer", cfg.checkpointer)).load_checkpoint()
            self.reference = self._build(cfg.get("ref_model", cfg.model), ref_ckpt[training.MODEL_KEY], trainable=False)
            self.reference.eval()
            if not is_fused_preference_loss(loss_module):
                configure_model_for_loss(self.reference, loss_module)  # full logits, like the policy
        self.forward = PreferenceForward(loss_module, self.model, self.reference, self.ignore_index)
        self.eval_loader = None
        eval_cfg = cfg.get("eval_dataset", None)
        # `eval_dataset=null` on torchtune's command line nulls the component, not the key.
        if eval_cfg is not None and eval_cfg.get("_component_", None) is not None:
            s, p = self.settings, self.par
            ds = config.instantiate(cfg.eval_dataset, self.tokenizer)
            # No shuffling; padded to equal counts per rank (every rank runs every forward under FSDP2).
            sampler: DistributedSampler = DistributedSampler(
                ds, num_replicas=p.dp_size, rank=p.dp_rank, shuffle=False, drop_last=False
            )
            collate = partial(
                padded_collate_preference, padding_idx=self.tokenizer.pad_id, ignore_idx=self.ignore_index
            )
            self.eval_loader = DataLoader(
                ds, batch_size=int(cfg.get("eval_batch_size", s.batch_size)), sampler=sampler, collate_fn=collate
            )

    def _build_data(self, cfg: DictConfig):
        return self._load_batches_of(config.instantiate(cfg.dataset, self.tokenizer), padded_collate_preference)

    def _step_normalizer(self, labels: List[torch.Tensor]):
        """``([pairs, chosen tokens] of the step, valid tokens of the step)``, all-reduced over dp at once."""
        counts = torch.cat(
            [
                count_pairs_and_tokens(labels, self.ignore_index),
                torch.stack([(lab != self.ignore_index).sum() for lab in labels]).sum().reshape(1),
            ]
        )
        counts = all_reduce_token_count(counts, group=self.par.dp_group)
        return counts[:2], counts[2]

    def _micro_batch_loss(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor, scale: torch.Tensor) -> LossSum:
        """One micro-batch's share of the step's loss (``scale``: the step's pairs and chosen tokens) and
        its metric sums scaled so that the loop's sum over micro-batches and ranks gives step means."""
        kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
        terms = self.forward.terms(batch["tokens"], labels, **kwargs)
        dp = self.par.dp_size
        per_pair = dp / scale[0].clamp(min=1).float()
        parts = {k: v * per_pair for k, v in metric_sums(terms).items()}
        if terms.nll_weight:
            parts["nll"] = terms.nll_sum.detach().float() * dp / scale[1].clamp(min=1).float()
        return LossSum(scaled_loss(terms, scale, dp), terms.num_pairs, parts)

    def _log_loss_memory(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Peak memory of one micro-batch's forward + backward (policy, reference and loss), once per run."""
        if self.distributed:
            return
        peak = peak_memory_of(
            lambda: self._micro_batch_loss(batch, labels, self._step_normalizer([labels])[0]).total.backward(),
            self.device,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self._note(
            f"DPO micro-batch peak memory (forward + backward, batch {tuple(batch['tokens'].shape)}): "
            f"{peak / 2**20:.1f} MiB"
        )
        if self.metric_logger is not None:
            self.metric_logger.log_dict({"step_peak_memory_mib": peak / 2**20}, step=0)

    # ------------------------------------------------------------------------------------------ eval
    def _evaluate(self) -> Dict[str, float]:
        assert self.eval_loader is not None
        self.model.eval()
        sums = evaluate(
            self.forward,
            self.eval_loader,
            self.device,
            self.ignore_index,
            lambda lab: data.shift_labels(lab, self.ignore_index),
        )
        self.model.train()
        keys = sorted(sums)
        stacked = all_reduce_token_count(torch.stack([sums[k].float() for k in keys]), group=self.par.dp_group)
        totals = dict(zip(keys, stacked))
        return mean_metrics(totals, totals["pairs"], prefix="eval/")

    def _log_eval(self, step: int) -> Dict[str, float]:
        metrics = self._evaluate()
        if self.metric_logger is not None:
            self.metric_logger.log_dict(metrics, step=step)
        self._note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def train(self) -> None:
        if self.eval_loader is not None and self.global_step == 0:
            self._log_eval(0)
        super().train()
        if self.eval_loader is not None and (
            self.eval_every_n_steps is None or self.global_step % self.eval_every_n_steps
        ):
            self._log_eval(self.global_step)

    def _train_step(self, micro: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        metrics = super()._train_step(micro)
        step = self.global_step + 1  # the loop counts the step after this returns
        if self.eval_loader is not None and self.eval_every_n_steps and step % self.eval_every_n_steps == 0:
            metrics.update(self._evaluate())
        return metrics
