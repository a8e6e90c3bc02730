"""Per-family settings for the Hugging Face survey (tests/hf_survey.py): what the generic tiny sizes do not
cover. Each entry says why it is needed; a family absent here builds from the generic sizes alone.

* ``OVERRIDES``: config keyword arguments per model type. A dict under a sub-config's name (``decoder``,
  ``encoder_config``, ...) is merged into that sub-config's generic tiny sizes.
* ``DEFAULTS``: arguments without which the family's config class cannot be built at all (its own
  defaults fail its validation); the generic tiny sizes are read from the config built with them.
* ``SUB_CONFIGS``: further sub-config attributes, per model type, that get the generic tiny sizes.
* ``ATTENTION``: the attention implementation where eager cannot run the tiny model.
* ``INPUTS``: per model type, the forward's keyword arguments for a token batch when the stock forward
  needs more than ``input_ids`` / ``labels`` (codebooks, pixel values, ...).
* ``UNRUNNABLE``: model types whose stock forward cannot run tiny on CPU at all, with the reason.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

V = 96
"""The survey's vocabulary size (tests/hf_survey.py's ``V``)."""

_DRAFTER_TEXT = dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
"""Gemma 4 assistants (drafters) validate that their text model has no per-layer inputs."""

GEMMA3N_TEXT = dict(
    # The last num_kv_shared_layers reuse the keys / values of earlier layers of each type (default 15).
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention"] * 2,
    num_kv_shared_layers=2,
    laurel_rank=8,
)

QWEN4_EXP_TEXT = dict(
    # Its indexed-attention layers need the QSA indexer sizes (no defaults); hyper-connections' low rank.
    layer_types=["linear_attention", "indexed_attention"],
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=4,
    indexer_compress_ratio=2,
    hc_lowrank=8,
)

DOTS3_TEXT = dict(
    # Per-layer attributes (the generic sizes skip them: reading them from the default config raises).
    num_attention_heads=2,
    num_key_value_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    head_dim=16,
    swa_num_attention_heads=2,
    swa_num_key_value_heads=2,
    swa_q_lora_rank=16,
    swa_kv_lora_rank=16,
    swa_head_dim=16,
    swa_qk_nope_head_dim=8,
    swa_v_head_dim=16,
    index_head_dim=16,
    index_n_heads=2,
    index_topk=4,
    shared_experts_intermediate_size=32,
)

OVERRIDES: Dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    # The shared transformer block is tied across its hybrid layers: two of them.
    "zamba": dict(num_hidden_layers=4, layer_types=["linear_attention", "hybrid"] * 2),
    "zamba2": dict(hybrid_layer_ids=[1]),
    "codegen": dict(rotary_dim=8),
    "gptj": dict(rotary_dim=8),
    "reformer": dict(is_decoder=True, attn_layers=["local", "local"], axial_pos_embds=False),
    "prophetnet": dict(num_encoder_layers=1, num_decoder_layers=1),
    "xmod": dict(default_language="en_XX"),
    "dots1": dict(num_experts_per_tok=2, n_shared_experts=1),
    "mamba2": dict(num_heads=4, head_dim=16),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "zaya": dict(num_experts_per_tok=1),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "gemma4_assistant": dict(text_config=_DRAFTER_TEXT, backbone_hidden_size=32),
    "gemma4_unified_assistant": dict(backbone_hidden_size=32),
    # Byte latent transformer: hash n-gram embeddings of 500002 rows by default; its four sub-configs.
    "blt": dict(
        encoder_hash_byte_group_vocab=64,
        encoder_hash_byte_group_size=[3, 4],
        local_attention_window_len=16,
        patch_size=4,
        encoder_config=dict(hidden_size_global=32),
        decoder_config=dict(hidden_size_global=32),
        # Its forward builds DynamicCache(config=BltConfig), which has no num_hidden_layers (a stock bug in
        # 5.24 at any size): no cache, so training forwards and generation without a cache run.
        use_cache=False,
    ),
    # Per-layer-type RoPE with no default entry (the default config has none either): one for full
    # attention, M-RoPE sections summing to head_dim / 2 = 8.
    "cohere_compass_text": dict(
        layer_types=["full_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])},
    ),
    # Its own size names; its attention reads attn_config.rope_theta, which the attention config class does
    # not declare (Hub configs carry it as an extra key).
    "dbrx": dict(
        n_heads=2,
        n_layers=2,
        max_seq_len=128,
        attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    # Dots 3 Note: sliding-window layers take their MLA sizes from swa_* keys, the indexer its own sizes.
    "dots3_note_text": dict(DOTS3_TEXT),
    "dots3_note": dict(
        text_config=DOTS3_TEXT,
        # The vision and audio adapters feed the text model: their widths must match.
        vision_config=dict(adapter_in_dim=32, adapter_out_dim=32, moe_intermediate_size=32),
        audio_config=dict(adapter_input_size=32, adapter_out_dim=32, downsample_hidden_size=16, feature_size=16),
    ),
    "gemma3n_text": dict(GEMMA3N_TEXT),
    "gemma3n": dict(text_config=GEMMA3N_TEXT),
    # Short convolutions, attention and dense / MoE MLPs: its layer_types has no default.
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_hidden_layers=3, num_dense_layers=1),
    # Sliding-window layers have twice the key / value heads of full-attention layers: with 2 heads and 2
    # KV heads, repeat_kv would get 0 groups.
    "mimo_v2_flash": dict(num_attention_heads=4, num_key_value_heads=1),
    "qwen4_exp_text": dict(QWEN4_EXP_TEXT),
    "qwen4_exp": dict(text_config=QWEN4_EXP_TEXT),
    # Chinese glyph-shape and pinyin embeddings of 24858 and 910 rows by default.
    "roc_bert": dict(shape_vocab_size=16, shape_embed_dim=8, pronunciation_vocab_size=16, pronunciation_embed_dim=8),
    # Its cache sizes the mLSTM state from qk / v widths rounded up to multiples of 64, the layers from the
    # unrounded ones: widths of 64 (hidden 32 times 2) keep both the same.
    # A small output softcap (default 30), so that it changes the tiny model's loss.
    "xlstm": dict(qk_dim_factor=2.0, v_dim_factor=2.0, output_logit_soft_cap=2.0),
    # Its audio encoder's convolution channels (1024) and 24 conformer blocks.
    "phi4_multimodal": dict(
        audio_config=dict(
            nemo_conv_channels=16, ext_pw_out_channel=32, depthwise_separable_out_channel=32, num_blocks=2
        )
    ),
    # GIT's loss always drops its image tokens' positions: it needs pixel values (INPUTS); 4 patches.
    "git": dict(vision_config=dict(image_size=32, patch_size=16)),
    "musicgen": dict(decoder=dict(ffn_dim=64)),
    "musicgen_melody": dict(decoder=dict(ffn_dim=64)),
}

DEFAULTS: Dict[str, dict] = {"gemma4_assistant": dict(text_config=_DRAFTER_TEXT)}

SUB_CONFIGS: Dict[str, Tuple[str, ...]] = {
    "blt": ("patcher_config", "encoder_config", "decoder_config", "global_config"),
}

ATTENTION: Dict[str, str] = {"dory": "sdpa"}
"""Dory's loops: its eager mask does not cover the concatenated past; "eager" for every other family."""


def _drafter_inputs(model, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """A Gemma 4 assistant (speculative-decoding drafter) reads its target model's embeddings
    ``[B, S, 2 * backbone_hidden_size]`` and last keys / values per layer type ``[B, kv_heads, S, head_dim]``;
    its forward takes no labels (it computes no loss)."""
    g = torch.Generator().manual_seed(2)
    b, s = ids.shape
    text = model.config.get_text_config()
    kv: Dict[str, tuple] = {}
    for i, kind in enumerate(text.layer_types):
        layer = text.per_layer_config[i]
        shape = (b, layer.num_key_value_heads, s, layer.head_dim)
        kv.setdefault(kind, (torch.randn(shape, generator=g), torch.randn(shape, generator=g)))
    embeds = torch.randn(b, s, 2 * model.config.backbone_hidden_size, generator=g)
    # output_hidden_states: Gemma 4's shared-KV slicing indexes per-layer inputs the drafter does not
    # have (None) whenever it may slice, i.e. more than one position without recorded outputs.
    return dict(input_ids=ids, inputs_embeds=embeds, shared_kv_states=kv, output_hidden_states=True)


def _codebook_inputs(model, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """MusicGen's decoder reads ``num_codebooks`` token streams: ``input_ids [B * K, S]`` and
    ``labels [B, S, K]`` (some positions of some codebooks ignored)."""
    k = model.config.num_codebooks
    g = torch.Generator().manual_seed(3)
    b, s = ids.shape
    codes = torch.randint(3, model.config.vocab_size, (b, k, s), generator=g)
    targets = codes.transpose(1, 2).clone()
    targets[0, :3] = -100
    targets[-1, -2:, 0] = -100
    return dict(input_ids=codes.reshape(b * k, s), labels=targets)


def _image_inputs(model, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pixel values ``[B, 3, H, W]`` at the vision config's image size, beside the token batch."""
    vision = model.config.vision_config
    g = torch.Generator().manual_seed(4)
    pixels = torch.randn(ids.shape[0], vision.num_channels, vision.image_size, vision.image_size, generator=g)
    return dict(input_ids=ids, labels=labels, pixel_values=pixels)


INPUTS: Dict[str, Callable[..., dict]] = {
    "git": _image_inputs,
    "musicgen": _codebook_inputs,
    "musicgen_melody": _codebook_inputs,
    "gemma4_assistant": _drafter_inputs,
    "gemma4_unified_assistant": _drafter_inputs,
}
"""``(model, input_ids [B, S], labels [B, S]) -> forward kwargs`` (including ``input_ids``)."""

UNRUNNABLE: Dict[str, str] = {
    "gemma3n": "its vision tower is a timm model (TimmWrapperModel): needs timm and torchvision, which are not "
    "test dependencies; its text model is surveyed as gemma3n_text",
}
