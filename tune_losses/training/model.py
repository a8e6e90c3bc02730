"""Build a model for the loop: instantiate, load its checkpoint, shard (FSDP2 / tensor parallel), freeze."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torchtune import config, training
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from tune_losses.heads import output_projection
from tune_losses.training.distributed import Parallelism


def shard_output_over_vocab(model: nn.Module, tp_mesh) -> None:
    """Tensor-parallel output projection: weight (and bias) ``Shard(0)`` over the vocabulary on ``tp``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    head = output_projection(model).head
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"tensor_parallel_dim: expected the model's output projection to be an nn.Linear to shard over the "
            f"vocabulary, got {type(head).__name__} (tied embeddings and LoRA output layers are not supported)"
        )
    # ColwiseParallel's hooks only run when the head itself is called (never in hidden-states mode).
    parallelize_module(head, tp_mesh, ColwiseParallel())


def build_model(
    cfg_model: DictConfig,
    state_dict: Dict[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    trainable: bool,
    distributed: bool,
    par: Parallelism,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """The model of ``cfg_model`` with ``state_dict`` loaded (a full state dict), sharded when
    ``distributed`` (FSDP2 per layer and overall, over ``dp`` when tensor parallel), frozen unless
    ``trainable``; a LoRA model trains its adapters only."""
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg_model)
    adapter = get_adapter_params(model) if trainable else {}
    if activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if distributed:
        from torch.distributed.fsdp import fully_shard

        dp_mesh: Optional[DeviceMesh] = None
        if par.tp > 1:
            assert par.mesh is not None  # a (dp, tp) mesh whenever tp > 1
            shard_output_over_vocab(model, par.mesh["tp"])
            dp_mesh = par.mesh["dp"]
        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    # LoRA models lack their adapter weights in the base checkpoint: load non-strictly, then check
    # that only adapter keys were missing.
    result = set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=not adapter))
    if adapter:
        unexpected_missing = [k for k in result.missing_keys if "lora" not in k]
        if unexpected_missing or result.unexpected_keys:
            raise ValueError(f"checkpoint: keys missing {unexpected_missing} / unexpected {result.unexpected_keys}")
        set_trainable_params(model, adapter)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
