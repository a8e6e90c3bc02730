"""Tiny Transformers causal LMs built from configs (no downloads) for the integration tests."""

import copy

import torch

V = 131  # odd vocabulary: no accidental alignment with chunk sizes


def _common(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return base


def build(kind: str, seed: int = 0, **overrides):
    """A tiny fp32 model in training mode: llama, llama_tied, qwen2, gemma2, mixtral, cohere, granite."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(**_common(tie_word_embeddings=False, **overrides))
        cls = tf.LlamaForCausalLM
    elif kind == "llama_tied":
        cfg = tf.LlamaConfig(**_common(tie_word_embeddings=True, **overrides))
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**_common(tie_word_embeddings=False, **overrides))
        cls = tf.Qwen2ForCausalLM
    elif kind == "gemma2":
        # A small softcap so that it changes the loss noticeably on tiny random logits.
        cfg = tf.Gemma2Config(
            **_common(
                head_dim=8,
                final_logit_softcapping=0.5,
                attn_logit_softcapping=50.0,
                sliding_window=8,
                query_pre_attn_scalar=8,
                **overrides,
            )
        )
        cls = tf.Gemma2ForCausalLM
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(
            **_common(
                num_local_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
                router_aux_loss_coef=0.1,
                tie_word_embeddings=False,
                **overrides,
            )
        )
        cls = tf.MixtralForCausalLM
    elif kind == "granite":  # logits divided by logits_scaling
        cfg = tf.GraniteConfig(
            **_common(
                logits_scaling=2.0,
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                attention_multiplier=0.25,
                **overrides,
            )
        )
        cls = tf.GraniteForCausalLM
    elif kind == "cohere":
        cfg = tf.CohereConfig(**_common(logit_scale=0.5, **overrides))
        cls = tf.CohereForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    model = cls(cfg).float()
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
