"""Integrations with other training stacks; each submodule imports its library lazily (optional extra ``hf``).

* :mod:`tune_losses.integrations.transformers`: ``patch(model)`` for any Transformers causal LM (PEFT
  included), ``distillation_loss`` for two of them.
* :mod:`tune_losses.integrations.trl`: ``FusedSFTTrainer`` and ``FusedDistillationTrainer`` on TRL.
* :mod:`tune_losses.integrations.trl_dpo`: ``FusedDPOTrainer`` (TRL's ``DPOTrainer`` on the fused
  preference loss).
"""
