"""TRL's ``DPOTrainer`` with its loss computed by :func:`tune_losses.linear_preference_loss`
(``pip install tune-losses[hf]``).

:class:`FusedDPOTrainer` runs the policy (and the reference model) without their output layers and hands
the final hidden states ``[2B, S, H]`` and the output weight to the fused preference loss: by default its
pair-chunked path, which makes each chunk's logits once, over completion tokens only, with the gradient
taken in forward (3 ``[n, H] x [H, V]`` matmuls per policy token; no ``[tokens, V]`` logits). TRL 1.16's
own DPO path scores the same tokens through its chunked log-prob head and autograd (4).

The reference is the reference model's hidden states and output weight (its logits made under no-grad
in the same chunks), the policy with its PEFT adapter disabled (TRL's rule when there is no reference
model), or TRL's precomputed reference log-probabilities (``precompute_ref_log_probs=True``).

Supported ``DPOConfig.loss_type`` (one of): ``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
``robust``, ``bco_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down``, ``discopop``, with TRL's formulas
(``beta``, ``label_smoothing`` for robust / exo_pair, ``discopop_tau``, ``loss_weights``). Refused with
a ValueError naming the option: several loss types, ``aot`` / ``aot_unpaired`` / ``sft`` /
``sigmoid_norm``, ``f_divergence_type`` other than ``reverse_kl``, ``ld_alpha``, ``use_weighting``, models
that softcap their logits. One difference: a pair whose chosen or rejected completion has no token
left after truncation does not count (TRL averages it in with its log-prob 0).

Logged: TRL's DPO metrics (``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``,
``mean_token_accuracy``, ``num_tokens``, ``aux_loss``), from the same hidden states in detached chunks.
"""

from __future__ import annotations

from typing import Optional

import torch

from tune_losses.extras import missing_extra

try:
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ModuleNotFoundError as err:
    raise missing_extra("hf", "tune_losses.integrations.trl_dpo", err) from err

from tune_losses.alignment.options import PreferenceOptions, Reference
from tune_losses.alignment.preference import linear_preference_loss
from tune_losses.integrations.head_source import read_head
from tune_losses.integrations.token_stats import token_stats
from tune_losses.integrations.transformers import IGNORE_INDEX, lm_head_inputs, unwrap_model
from tune_losses.integrations.trl import _shift, call_through_wrapper
from tune_losses.options import ExecutionOptions

__all__ = ["FusedDPOTrainer", "TRL_DPO_LOSS_TYPES"]

TRL_DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
"""TRL 1.16 ``DPOConfig.loss_type`` values :class:`FusedDPOTrainer` computes (with TRL's formulas)."""

_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


class FusedDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose loss is :func:`tune_losses.linear_preference_loss`; arguments as ``DPOTrainer``
    plus:

    Args:
        chunk_size: tokens per chunk (the pair-chunked path holds whole pairs, up to that many
            tokens, at least one pair, as :func:`tune_losses.linear_preference_loss`); None:
            tune-losses' rule.
        algorithm: ``auto`` (pair-chunked where it applies), ``grad_in_forward`` or ``recompute``, as
            :func:`tune_losses.linear_preference_loss`.
    """

    def __init__(self, *args, chunk_size: Optional[int] = None, algorithm: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _check_supported(self.args)
        self._chunk_size = chunk_size
        self._head_spec = read_head(unwrap_model(self.model))  # fails early for heads we do not understand
        hf = unwrap_model(self.model)
        if self._head_spec.softcap_value(hf) is not None:
            raise ValueError(
                f"model: {self._head_spec.model_type} softcaps its logits; FusedDPOTrainer does not support "
                "softcapped models (use TRL's DPOTrainer)"
            )
        loss_type = self.loss_types[0]
        # TRL 1.16 reads label_smoothing only in these two losses (its sigmoid has none).
        smoothing = self.args.label_smoothing if loss_type in ("robust", "exo_pair") else 0.0
        # Made (and checked) once here: every step passes the same objects.
        self._options = PreferenceOptions(
            loss_type=loss_type, beta=self.beta, label_smoothing=smoothing, discopop_tau=self.args.discopop_tau
        )
        self._execution = ExecutionOptions(algorithm=algorithm)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        targets = _shift(labels)  # [2B, S], aligned with the hidden states
        ref = self._reference(inputs, model_kwargs)

        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            out, stats, outputs = self._fused_loss(unwrapped, model_kwargs, targets, ref)
        else:  # through the DDP / FSDP wrapper's forward, so its hooks run around the backbone and the head
            out, stats, outputs = call_through_wrapper(
                model, unwrapped, self._fused_loss, unwrapped, model_kwargs, targets, ref
            )
        loss = out.loss * self.loss_weights[0]
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_metrics(mode, inputs, targets, out, stats)

        if return_outputs:  # logits for compute_metrics: one extra forward, as TRL does
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _reference(self, inputs, model_kwargs) -> dict:
        """The reference as :func:`tune_losses.linear_preference_loss` takes it: ``ref_logps`` (TRL's
        precomputed sums) or the reference's hidden states and output layer (no grad)."""
        if self.precompute_ref_logps:
            return {"ref_logps": (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])}
        kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                # TRL's rule: the base model (adapter disabled), or a "ref" adapter when one was loaded.
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=name):
                    head = self._head_inputs(self.model, kwargs)
            else:
                head = self._head_inputs(self.ref_model, kwargs)
        if head.softcap is not None:
            raise ValueError("ref_model: it softcaps its logits; FusedDPOTrainer does not support softcapped models")
        return {"reference": Reference(head.hidden, head.weight, head.bias)}

    def _head_inputs(self, model, kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            return lm_head_inputs(unwrapped, **kwargs)
        return call_through_wrapper(model, unwrapped, lm_head_inputs, unwrapped, **kwargs)

    def _fused_loss(self, unwrapped, model_kwargs, targets, ref):
        head = lm_head_inputs(unwrapped, _spec=self._head_spec, **model_kwargs)
        hidden = head.hidden
        targets = targets.to(hidden.device)
        if "ref_logps" in ref and self._options.loss_type == "ipo":
            # TRL's IPO divides both log-ratios by the completion lengths; the precomputed ones are sums.
            n_c, n_r = (targets != IGNORE_INDEX).sum(-1).clamp(min=1).chunk(2)
            ref = {"ref_logps": (ref["ref_logps"][0] / n_c, ref["ref_logps"][1] / n_r)}
        with torch.autocast(hidden.device.type, enabled=False):
            out = linear_preference_loss(
                hidden,
                head.weight,
                targets,
                bias=head.bias,
                chunk_size=self._chunk_size,
                options=self._options,
                execution=self._execution,
                **ref,
            )
            stats = _detached_stats(hidden, head.weight, head.bias, targets, self._chunk_size)
        return out, stats, head.outputs

    def _log_metrics(self, mode, inputs, targets, out, stats) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        count = gather(stats["count"]).sum()
        metrics["entropy"].append((gather(stats["entropy"]).sum() / count).item() if count > 0 else 0.0)
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for side in ("chosen", "rejected"):
            n = gather(stats[f"{side}_count"]).sum()
            total = gather(stats[f"{side}_logits"]).sum()
            metrics[f"logits/{side}"].append((total / n).item() if n > 0 else 0.0)
        n = gather(stats["chosen_count"]).sum()
        metrics["mean_token_accuracy"].append((gather(stats["chosen_correct"]).sum() / n).item() if n > 0 else 0.0)

        # TRL logs rewards and log-probs of summed log-probs, also for IPO (whose loss uses the means).
        scale_c = scale_r = 1.0
        if self.loss_types[0] == "ipo":
            scale_c, scale_r = (targets != IGNORE_INDEX).sum(-1).chunk(2)
        chosen = out.chosen_rewards * scale_c
        rejected = out.rejected_rewards * scale_r
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected).mean().item())
        metrics["rewards/accuracies"].append(self.accelerator.gather((chosen > rejected).float()).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen - rejected).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(out.chosen_logps * scale_c).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(out.rejected_logps * scale_r).mean().item())


def _detached_stats(hidden, weight, bias, targets, chunk_size) -> dict:
    """TRL's DPO metrics' sums: entropy over all completion tokens; per side the valid-token count and
    the sum of mean logits (a linear map: ``h . mean(W) + mean(b)``); chosen top-1 hits."""
    half = targets.shape[0] // 2
    with torch.no_grad():
        chosen = token_stats(hidden[:half], weight, targets[:half], bias=bias, chunk_size=chunk_size)
        rejected = token_stats(hidden[half:], weight, targets[half:], bias=bias, chunk_size=chunk_size)
        w = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        b = None if bias is None else (bias.full_tensor() if hasattr(bias, "full_tensor") else bias)
        mean_w = w.detach().float().mean(0)
        per_token = hidden.detach().float() @ mean_w + (0.0 if b is None else b.detach().float().mean())
        valid = targets != IGNORE_INDEX
        sums = torch.where(valid, per_token, torch.zeros_like(per_token)).sum(-1)
    return {
        "entropy": chosen.entropy + rejected.entropy,
        "count": chosen.count + rejected.count,
        "chosen_count": chosen.count,
        "rejected_count": rejected.count,
        "chosen_correct": chosen.correct,
        "chosen_logits": sums[:half].sum(),
        "rejected_logits": sums[half:].sum(),
    }


def _check_supported(args) -> None:
    types = list(args.loss_type)
    if len(types) != 1:
        raise ValueError(f"loss_type: FusedDPOTrainer takes one loss type, got {types}")
    if types[0] not in TRL_DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {TRL_DPO_LOSS_TYPES} for FusedDPOTrainer, got {types[0]!r}")
    if args.f_divergence_type != "reverse_kl":
        raise ValueError(f"f_divergence_type: FusedDPOTrainer supports 'reverse_kl', got {args.f_divergence_type!r}")
    if args.ld_alpha is not None:
        raise ValueError(f"ld_alpha: not supported by FusedDPOTrainer, got {args.ld_alpha}")
    if args.use_weighting:
        raise ValueError("use_weighting: WPO weighting is not supported by FusedDPOTrainer")
