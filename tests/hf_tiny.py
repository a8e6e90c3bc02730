"""Tiny Transformers causal LMs built from configs (no downloads) for the integration tests."""

import copy

import torch

V = 131  # odd vocabulary: no accidental alignment with chunk sizes


# Every family's config at these sizes: a 2-layer model with grouped-query attention (4 heads over 2 KV heads).
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)
HEADS = dict(num_attention_heads=4, num_key_value_heads=2)
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # tokenizer()'s t0, t1 and t2
# kind: (the transformers family, its settings). Softcaps and scales small enough to change the loss
# noticeably on tiny random logits; Mixtral's router loss is part of its loss.
FAMILIES = {
    "llama": ("Llama", dict(tie_word_embeddings=False)),
    "llama_tied": ("Llama", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=False)),
    "gemma2": (
        "Gemma2",
        dict(
            head_dim=8,
            final_logit_softcapping=0.5,
            attn_logit_softcapping=50.0,
            sliding_window=8,
            query_pre_attn_scalar=8,
        ),
    ),
    "mixtral": (
        "Mixtral",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.1,
            tie_word_embeddings=False,
        ),
    ),
    "granite": (  # logits divided by logits_scaling
        "Granite",
        dict(logits_scaling=2.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25),
    ),
    "cohere": ("Cohere", dict(logit_scale=0.5)),
}


def build(kind: str, seed: int = 0, **overrides):
    """A tiny fp32 model in training mode: one of ``FAMILIES`` (``overrides`` change its config)."""
    import transformers as tf

    if kind not in FAMILIES:
        raise ValueError(kind)
    family, settings = FAMILIES[kind]
    torch.manual_seed(seed)
    cfg = getattr(tf, family + "Config")(**{**SIZES, **HEADS, **SPECIAL_IDS, **settings, **overrides})
    cfg._attn_implementation = "eager"
    model = getattr(tf, family + "ForCausalLM")(cfg).float()
    with torch.no_grad():  # larger logits than the default init, so the loss has structure to get wrong
        model.get_output_embeddings().weight.mul_(8.0)
    return model.train()


def batch(seed: int = 1, b: int = 2, s: int = 11, ignore: str = "some"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, s), generator=g)
    labels = ids.clone()
    if ignore == "some":
        labels[0, :4] = -100
        labels[-1, -2:] = -100
    elif ignore == "all":
        labels[:] = -100
    return ids, labels


def pair(kind: str, **overrides):
    """(stock, copy to patch): identical parameters."""
    stock = build(kind, **overrides)
    return stock, copy.deepcopy(stock)


def assert_same_grads(a, b, atol=1e-5, rtol=1e-4):
    names_a = dict(a.named_parameters())
    checked = 0
    for name, p in b.named_parameters():
        q = names_a[name]
        if p.grad is None and q.grad is None:
            continue
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 0


def assert_fused_matches_stock(stock, fused, **inputs):
    """A training step's forward and backward of both models on ``inputs``: the patched model's loss,
    with no logits made, and every gradient equal stock's. Returns (stock's output, the patched one's)."""
    ref, out = stock(**inputs), fused(**inputs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    assert_same_grads(stock, fused)
    return ref, out


def tokenizer():
    """A word-level tokenizer over the tiny vocabulary (``t0`` ... ``t130``), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def token_dataset(n: int = 12, seed: int = 5, min_len: int = 6, max_len: int = 14):
    """Pre-tokenized rows of varying length (``input_ids``), as a ``datasets.Dataset``."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        rows.append(torch.randint(3, V, (length,), generator=g).tolist())
    return Dataset.from_dict({"input_ids": rows})


# Trainer arguments, in groups by purpose (transformers' TrainingArguments and TRL's configs take them all).
# A quiet CPU run: no saving, reporting or progress bar; a log line per step; data loaded in the process.
QUIET_CPU = dict(
    use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0
)
# Plain SGD at a constant rate in fp32, nothing clipped: the parameters after a step follow from the gradients alone.
PLAIN_SGD = dict(optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, bf16=False, fp16=False)
# 3 optimizer steps of 2 micro-batches of 2 rows (accumulation, so Trainer passes num_items_in_batch), one seed.
THREE_STEPS = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=0, data_seed=0)


def trainer_args(config_cls, out_dir, **kw):
    """``config_cls`` for a quiet CPU run into ``out_dir``; ``kw`` adds or overrides settings."""
    return config_cls(**{**QUIET_CPU, "output_dir": str(out_dir), **kw})


def same_steps_args(config_cls, out_dir, **kw):
    """``config_cls`` for the run on which a stock and a fused trainer must land on the same parameters:
    3 steps of plain SGD (learning rate 0.5) with gradient accumulation; ``kw`` adds or overrides."""
    return trainer_args(config_cls, out_dir, **{**PLAIN_SGD, **THREE_STEPS, "learning_rate": 0.5, **kw})


def distillation_args(out_dir, **kw):
    """TRL's ``DistillationConfig``: 2 quiet SGD steps (batches of 2) with completions of up to 6 tokens."""
    from trl import DistillationConfig

    settings = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=0.1, optim="sgd", max_completion_length=6)
    return trainer_args(DistillationConfig, out_dir, **{**settings, **kw})


def loss_logs(trainer):
    """The trainer's per-step log entries (those with a training loss)."""
    return [h for h in trainer.state.log_history if "loss" in h]


def train_with_lora(classes, args, dataset):
    """A fresh tiny llama with a LoRA adapter on its q / v projections, trained under each trainer class
    of ``classes`` with ``args(cls.__name__)`` on ``dataset()``: the trainers, in that order."""
    import peft

    trainers = []
    for cls in classes:
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        trainer = cls(
            model=build("llama"),
            args=args(cls.__name__),
            train_dataset=dataset(),
            processing_class=tokenizer(),
            peft_config=config,
        )
        trainer.train()
        trainers.append(trainer)
    return trainers


def assert_same_params(a, b, atol=1e-5, rtol=1e-5):
    """Every parameter of model ``b`` equals ``a``'s of the same name."""
    theirs = dict(a.named_parameters())
    for name, p in b.named_parameters():
        torch.testing.assert_close(p, theirs[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
