"""TRL trainers whose losses are tune-losses' fused linear losses (``pip install tune-losses[hf]``).

* :class:`FusedSFTTrainer`: TRL's ``SFTTrainer`` with the loss computed by
  :func:`tune_losses.linear_cross_entropy` from the final hidden states and the output weight.
  ``SFTTrainer`` (TRL 1.16) replaces the model's ``forward`` with its own fused LM head in ``__init__``;
  this trainer removes that replacement again (the model keeps the forward it came with) and computes
  the loss itself, so a patch of the model alone is not silently bypassed. It logs TRL's metrics
  (``entropy``, ``mean_token_accuracy``, ``num_tokens``, ``aux_loss``) from one detached pass over the
  same chunks of logits (:func:`tune_losses.integrations.token_stats.token_stats`).
* :class:`FusedDistillationTrainer`: TRL's ``DistillationTrainer`` (on-policy / GKD-style distillation)
  with its divergence computed by :func:`tune_losses.linear_kd_loss`: generalized JSD with TRL's
  ``beta`` (0 forward KL, 1 reverse KL), or any divergence tune-losses has.

Temperature convention: TRL divides both sides' logits by ``temperature`` and applies **no** ``T^2``
factor; :class:`FusedDistillationTrainer` does the same by default (``scale_by_temperature_squared=False``).
tune-losses' own functions default to the Hinton ``T^2`` scaling; pass True to get it here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from tune_losses.extras import missing_extra

try:
    from trl import DistillationTrainer, SFTTrainer
except ModuleNotFoundError as err:
    raise missing_extra("hf", "tune_losses.integrations.trl", err) from err

from tune_losses.chunking import shift_labels as shift_labels_of
from tune_losses.fused.functional import linear_kd_loss
from tune_losses.integrations import trl_cached
from tune_losses.integrations.head_source import UNSHIFTED, read_head
from tune_losses.integrations.token_stats import token_stats
from tune_losses.integrations.transformers import (
    IGNORE_INDEX,
    CECall,
    HeadInputs,
    fused_lm_loss,
    lm_head_inputs,
    mean_squared_lse,
    unwrap_model,
)
from tune_losses.options import KDOptions, SparseKDOptions, check_int_option

__all__ = ["FusedSFTTrainer", "FusedDistillationTrainer"]

SFT_CE_OPTIONS = ("z_loss", "chunk_size", "algorithm", "validate")
"""Options of :func:`tune_losses.linear_cross_entropy` that :class:`FusedSFTTrainer` passes on (label
smoothing comes from ``args.label_smoothing_factor``, the softcap from the model)."""


def _shift(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return shift_labels_of(labels, ignore_index)


def call_through_wrapper(wrapper: torch.nn.Module, inner: torch.nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as the forward of ``inner`` called through ``wrapper`` (DDP, FSDP, ...),
    so the wrapper's hooks (gradient synchronisation, parameter gathering) run around a computation that
    is not ``inner``'s own forward: ``inner.forward`` is ``fn`` for that one call."""
    prior = inner.__dict__.get("forward")

    def restore():
        if prior is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = prior

    def once(*a, **k):
        restore()
        return fn(*a, **k)

    inner.forward = once
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


def _is_trl_fused_head(forward) -> bool:
    # functools.wraps gave TRL's head the model's own __qualname__ and __module__; its code object keeps its origin.
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    if code is None:
        return False
    name = getattr(code, "co_qualname", code.co_name)
    return "add_fused_lm_head" in name or (name == "_fused_forward" and "trl" in code.co_filename)


class FusedSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is the fused linear cross-entropy; arguments as ``SFTTrainer`` plus:

    Args:
        ce_options: ``z_loss``, ``chunk_size``, ``algorithm``, ``validate`` for
            :func:`tune_losses.linear_cross_entropy`.

    ``loss_type="nll"`` (with ``label_smoothing_factor`` fused too) and ``"dft"`` (which needs
    ``tune_losses.linear_log_probs``) are supported; ``compute_loss_func`` is not (it needs logits).
    """

    def __init__(self, *args, ce_options: Optional[dict] = None, **kwargs):
        ce_options = dict(ce_options or {})
        CECall.from_flat(ce_options, SFT_CE_OPTIONS)  # checked before the model is prepared
        given = kwargs.get("model", args[0] if args else None)
        prior = unwrap_model(given).__dict__.get("forward") if isinstance(given, torch.nn.Module) else None
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func: not supported by FusedSFTTrainer (it needs the full logits); "
                "subclass and override compute_loss instead"
            )
        if self.args.loss_type == "dft":
            import tune_losses

            if not hasattr(tune_losses, "linear_log_probs"):
                raise ValueError("loss_type: 'dft' needs tune_losses.linear_log_probs, which this version lacks")
        hf = unwrap_model(self.model)
        installed = hf.__dict__.get("forward")
        if installed is not None and installed is not prior and _is_trl_fused_head(installed):
            if prior is None:
                del hf.__dict__["forward"]
            else:
                hf.forward = prior
        self._ce = CECall.from_flat(ce_options, SFT_CE_OPTIONS, label_smoothing=self.args.label_smoothing_factor)
        self._head_spec = read_head(hf)  # fails early for models whose head steps are not understood

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            loss, stats, outputs = self._fused_loss(unwrapped, inputs, num_items_in_batch)
        else:  # through the DDP / FSDP wrapper's forward, so its hooks run around the backbone and the head
            loss, stats, outputs = call_through_wrapper(
                model, unwrapped, self._fused_loss, unwrapped, inputs, num_items_in_batch
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        num_valid = self.accelerator.gather_for_metrics(stats.count).sum()
        entropy_sum = self.accelerator.gather_for_metrics(stats.entropy).sum()
        num_correct = self.accelerator.gather_for_metrics(stats.correct).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                tokens = self.accelerator.gather_for_metrics(local).sum().item()
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        if return_outputs:  # logits for compute_metrics: one extra forward, as SFTTrainer does
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _fused_loss(self, unwrapped, inputs, num_items_in_batch):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)
        spec = self._head_spec
        head = lm_head_inputs(unwrapped, _spec=spec, **inputs)
        if spec.loss == UNSHIFTED:  # the model's own loss takes its labels as given (encoder-decoder families)
            targets = labels
        else:
            targets = _shift(labels) if shift_labels is None else shift_labels
        targets = targets.to(head.hidden.device)
        count = (targets != IGNORE_INDEX).sum()
        denom = torch.as_tensor(
            count if num_items_in_batch is None else num_items_in_batch, device=head.hidden.device
        ).clamp(min=1)
        ce = self._ce
        with torch.autocast(head.hidden.device.type, enabled=False):
            if self.args.loss_type == "dft":
                loss = _dft_loss(unwrapped, spec, head, targets, ce, denom)
            else:
                loss = fused_lm_loss(unwrapped, spec, head, targets, ce, denom, IGNORE_INDEX)
            # token_stats' default ignore_index is IGNORE_INDEX, the targets' (one constant, not a literal).
            stats = token_stats(
                head.hidden, head.weight, targets, bias=head.bias, softcap=head.softcap, chunk_size=ce.chunk_size
            )
        return loss, stats, head.outputs


class FusedDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` with the divergence computed by :func:`tune_losses.linear_kd_loss`.

    Arguments as ``DistillationTrainer`` (``args.beta``, ``args.temperature``, ``args.lmbda`` ... as TRL)
    plus:

    Args:
        divergence: ``"jsd"`` (default: generalized JSD with ``args.beta``, 0 = forward KL(teacher || student),
            1 = reverse KL, as TRL), or ``"forward_kl"``, ``"reverse_kl"``, ``"symmetric_kl"``, ``"tvd"``.
        scale_by_temperature_squared: False (default) is TRL's convention (no ``T^2``); True multiplies
            the loss by ``T^2`` (Hinton).
        chunk_size: tokens per chunk (None: tune-losses' rule).

    Teacher and student must share the vocabulary; models with a logit softcap are not supported.

    A cached teacher instead of ``teacher_model`` (None): dataset rows with ``prompt_ids``,
    ``completion_ids``, ``teacher_ids`` and ``teacher_logprobs`` are trained on as they are (no
    generation) with :func:`tune_losses.linear_sparse_kd_loss` (``tail``: ``"renormalize"`` or
    ``"bucket"``); see :mod:`tune_losses.integrations.trl_cached`.
    """

    def __init__(
        self,
        *args,
        divergence: str = "jsd",
        scale_by_temperature_squared: bool = False,
        chunk_size: Optional[int] = None,
        tail: str = "renormalize",
        **kwargs,
    ):
        check_int_option("chunk_size", chunk_size, 1, allow_none=True)
        # Checked now; TRL's beta and temperature join them at each step (TRL may change them during training).
        self._kd = KDOptions(divergence=divergence, scale_by_temperature_squared=scale_by_temperature_squared)
        self._tail = SparseKDOptions(tail=tail).tail
        self._chunk_size = chunk_size
        super().__init__(*args, **kwargs)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {
            k: inputs[k]
            for k in (
                "pixel_values",
                "image_grid_thw",
                "pixel_attention_mask",
                "spatial_shapes",
                "image_sizes",
                "token_type_ids",
                "mm_token_type_ids",
                "image_position_ids",
            )
            if k in inputs
        }
        s_hidden, s_weight, s_bias = _completion_head(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, multimodal
        )
        device = s_weight.device
        s_hidden = s_hidden.to(device)
        labels = trl_cached.completion_labels(loss_mask, device)
        if "teacher_ids" in inputs or self.teacher_model is None:  # a cached teacher: no teacher model
            with torch.autocast(device.type, enabled=False):
                loss_sum = trl_cached.cached_teacher_sum(
                    s_hidden, s_weight, s_bias, labels, inputs, temperature=self.temperature, tail=self._tail,
                    scale_by_temperature_squared=self._kd.scale_by_temperature_squared, chunk_size=self._chunk_size,
                )  # fmt: skip
        else:
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                # Through the teacher's wrapper (DDP / FSDP / DeepSpeed), so its hooks run around the head.
                t_hidden, t_weight, t_bias = call_through_wrapper(
                    self.teacher_model,
                    unwrapped_teacher,
                    _completion_head,
                    unwrapped_teacher,
                    input_ids,
                    attention_mask,
                    logits_to_keep,
                    multimodal,
                )
            with torch.autocast(device.type, enabled=False):
                loss_sum = linear_kd_loss(
                    s_hidden, s_weight, t_hidden.to(device), t_weight, labels, student_bias=s_bias,
                    teacher_bias=t_bias, reduction="sum", chunk_size=self._chunk_size,
                    options=dataclasses.replace(self._kd, beta=self.beta, temperature=self.temperature),
                )  # fmt: skip
        with torch.autocast(device.type, enabled=False):
            return trl_cached.normalized_with_stats(
                loss_sum, s_hidden, s_weight, s_bias, labels, num_items_in_batch, self.temperature, self._chunk_size
            )

    def _generate_and_score_completions(self, inputs):
        if not trl_cached.is_cached_batch(inputs):
            return super()._generate_and_score_completions(inputs)
        acc = self.accelerator
        return trl_cached.cached_batch(inputs, self._tokenizer.pad_token_id, acc.device, acc.gather)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = trl_cached.signature_columns(self._signature_columns)


def _dft_loss(model, spec, head: HeadInputs, targets: torch.Tensor, ce: CECall, denom: torch.Tensor) -> torch.Tensor:
    """DFT (arXiv 2508.05629): each token's NLL weighted by its (detached) probability, summed over
    ``denom``, plus the model's own z-loss as :func:`fused_lm_loss` adds it."""
    from tune_losses import linear_log_probs

    if head.softcap is not None:
        raise ValueError("loss_type: 'dft' is not supported for models with a logit softcap")
    log_probs = linear_log_probs(
        head.hidden, head.weight, targets, bias=head.bias, ignore_index=IGNORE_INDEX, chunk_size=ce.chunk_size
    )
    loss = (-log_probs * log_probs.detach().exp()).sum() / denom
    z_coef = spec.z_loss_coefficient(model)
    if z_coef > 0:
        loss = loss + z_coef * mean_squared_lse(head, None, ce.chunk_size)
    return loss


def _completion_head(model, input_ids, attention_mask, logits_to_keep: int, multimodal: dict):
    """``(hidden [B, logits_to_keep, H], weight, bias)`` predicting the completion tokens: the model run
    without logits through the head spec shared with :func:`~tune_losses.integrations.transformers.patch`
    (backbone found from the forward, head transforms, scaled output layers, logit scale), the hidden
    state at position ``t`` predicting token ``t + 1``."""
    head: HeadInputs = lm_head_inputs(
        model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **multimodal
    )
    if head.softcap is not None:
        raise ValueError(
            f"model: {type(unwrap_model(model)).__name__} softcaps its logits; FusedDistillationTrainer does "
            f"not support softcapped models"
        )
    hidden = head.hidden[:, :-1][:, -logits_to_keep:]
    return hidden, head.weight, head.bias
