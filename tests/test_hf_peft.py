"""patch() on PEFT models: LoRA in the body, modules_to_save=[lm_head], LoRA on lm_head (base weight plus
the adapter's delta, with a LoRA bias), disabled adapters; LoRA dropout on lm_head refused in training."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from hf_tiny import assert_fused_matches_stock, batch, build  # noqa: E402

from tune_losses.integrations.transformers import patch  # noqa: E402

VARIANTS = {
    "lora_body_tied": ("llama_tied", dict(target_modules=["q_proj", "v_proj"])),
    "modules_to_save": ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "lora_lm_head": ("llama", dict(target_modules=["q_proj", "v_proj", "lm_head"])),
    "lora_lm_head_bias": ("qwen2", dict(target_modules=["k_proj", "lm_head"], lora_bias=True)),
    "lora_lm_head_softcap": ("gemma2", dict(target_modules=["lm_head"])),
}


def _peft_pair(kind, cfg):
    base = build(kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **cfg)
    stock = peft.get_peft_model(base, config)
    with torch.no_grad():  # LoRA B (and any LoRA bias) start at 0: make the adapters matter
        for n, p in stock.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
            if "modules_to_save" in n:
                p.add_(0.05)
    return stock, copy.deepcopy(stock)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_loss_and_gradients_match_stock(variant):
    kind, cfg = VARIANTS[variant]
    stock, fused = _peft_pair(kind, cfg)
    patch(fused)
    ids, labels = batch()
    assert_fused_matches_stock(stock, fused, input_ids=ids, labels=labels)
    trained = [n for n, p in fused.named_parameters() if p.grad is not None]
    assert trained and all(("lora_" in n or "modules_to_save" in n) for n in trained)


def test_disabled_adapters_match_stock():
    stock, fused = _peft_pair("llama", VARIANTS["lora_lm_head"][1])
    patch(fused)
    ids, labels = batch()
    with stock.disable_adapter(), fused.disable_adapter():
        ref, out = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_lora_dropout_on_lm_head_refused_in_training_only():
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["lm_head"]))
    patch(model)
    ids, labels = batch()
    with pytest.raises(ValueError, match="LoRA dropout 0.1 on the output layer"):
        model(input_ids=ids, labels=labels)
    model.eval()  # eval: the stock forward (dropout is off anyway)
    assert model(input_ids=ids, labels=labels).logits is not None
