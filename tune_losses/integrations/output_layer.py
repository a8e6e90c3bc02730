"""The weight and bias a model's output layer applies, as differentiable tensors, PEFT included.

``logits = hidden @ weight.T + bias`` must hold for what :func:`output_weight` returns, so the fused loss
sees exactly the layer's linear map and gradients reach the parameters the layer would train:

* ``nn.Linear`` (tied or not): its own parameters (an FSDP2 DTensor is gathered by the fused loss);
* PEFT ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the copy of the active adapter, or the
  original layer when adapters are disabled;
* PEFT LoRA on the output layer: ``W + sum_a scaling_a * B_a @ A_a`` over the active adapters (a
  ``[V, H]`` tensor, the size of the weight; no ``[tokens, V]`` tensor), plus the LoRA bias if any.
  LoRA dropout is applied to the layer's *input*, which no weight can express: dropout > 0 in training
  raises. DoRA and other LoRA variants raise.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from tune_losses.fused.placement import materialize_weight


def output_weight(layer: nn.Module, name: str = "lm_head") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of the output layer ``layer`` as it would compute now."""
    peft = _peft_types()
    if peft is not None:
        ModulesToSaveWrapper, BaseTunerLayer, LoraLayer = peft
        if isinstance(layer, ModulesToSaveWrapper):
            return output_weight(_active_copy(layer), name)
        if isinstance(layer, LoraLayer):
            return _lora_weight(layer, name)
        if isinstance(layer, BaseTunerLayer):
            raise ValueError(
                f"{name}: PEFT layer {type(layer).__name__} on the output layer is not supported "
                f"(supported: LoRA, modules_to_save)"
            )
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(layer, nn.Linear):
        raise ValueError(
            f"{name}: expected an nn.Linear output layer (or PEFT LoRA / modules_to_save on one), got "
            f"{type(layer).__name__}"
        )
    return weight, layer.bias


def _peft_types():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    return ModulesToSaveWrapper, BaseTunerLayer, LoraLayer


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``ModulesToSaveWrapper`` runs (PEFT's own rule in ``forward``)."""
    active = list(wrapper.active_adapters)
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _lora_weight(layer: nn.Module, name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    base = layer.get_base_layer()
    weight, bias = output_weight(base, name)
    if layer.disable_adapters:
        if layer.merged:
            raise ValueError(f"{name}: LoRA adapters are merged into the weight but disabled; unmerge them first")
        return weight, bias
    if layer.merged:
        return weight, bias
    deltas, bias_deltas = [], []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            raise ValueError(
                f"{name}: the LoRA variant of adapter {adapter!r} "
                f"({type(layer.lora_variant[adapter]).__name__}, e.g. DoRA) is not supported on the "
                f"output layer; use plain LoRA or modules_to_save"
            )
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            raise ValueError(
                f"{name}: LoRA dropout {dropout.p} on the output layer (adapter {adapter!r}) in training "
                f"acts on the input, which the fused loss cannot express through the weight; use "
                f"lora_dropout=0.0 for this layer (e.g. a separate adapter config), or exclude lm_head"
            )
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        scaling = layer.scaling[adapter]
        delta = materialize_weight(b.weight) @ materialize_weight(a.weight) * scaling
        deltas.append(delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
        if getattr(b, "bias", None) is not None:
            bias_deltas.append(materialize_weight(b.bias) * scaling)
    if not deltas:
        return weight, bias
    weight = materialize_weight(weight)
    for delta in deltas:
        weight = weight + delta.to(weight.dtype)
    if bias_deltas:
        bias = materialize_weight(bias) if bias is not None else torch.zeros_like(bias_deltas[0])
        for delta in bias_deltas:
            bias = bias + delta.to(weight.dtype)
    return weight, bias
