"""Every causal-LM class of the installed Transformers, built tiny from its config, patched and compared
with stock: loss and every gradient (weights moved off their initial values), eval logits, greedy
generation, and unpatch.

Each model type ends in one of four outcomes:

* ``matched``: ``patch`` accepted it and every comparison holds;
* ``refused``: ``patch`` raised a ValueError (its message is the reason); a stock forward that returns
  no loss (a drafter's) must be refused;
* ``not buildable``: the tiny model cannot be built, or its stock forward cannot run on its batch (the
  stock error is recorded, after the known reason from ``hf_families.UNRUNNABLE``): nothing to compare;
* ``MISMATCH`` / ``CRASH``: ``patch`` accepted it and then differed from stock, or raised something
  other than a clear refusal. Both are bugs; the survey test requires there be none.

The batch is ``input_ids`` / ``labels`` (``batch``), or what ``hf_families.INPUTS`` makes for a family
whose stock forward needs more (codebooks, pixel values, a drafter's target states).

Run as a script to write the generated table: ``python tests/hf_survey.py docs/hf_models.md``.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import hf_families as families
import torch

V = families.V


def _named(value, *names: str) -> dict:
    """``value`` under each of ``names``: one size, which the families call by different names."""
    return dict.fromkeys(names, value)


TINY = {
    **_named(V, "vocab_size", "unpadded_vocab_size"),
    # widths, depths, heads (with GPT-2 / BERT / BART-style names), positions
    **_named(32, "hidden_size", "n_embd", "d_model", "embedding_size"),
    **_named(64, "intermediate_size", "n_inner", "d_ff", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim"),
    **_named(2, "num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "encoder_layers", "num_decoder_layers"),
    **_named(2, "num_attention_heads", "num_key_value_heads", "n_head", "num_heads"),
    **_named(2, "decoder_attention_heads", "encoder_attention_heads"),
    **_named(16, "head_dim"),
    **_named(128, "max_position_embeddings", "n_positions", "n_ctx"),
    # mixture of experts: 4 experts, 2 per token, experts half as wide as the dense MLP
    **_named(4, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    **_named(2, "num_experts_per_tok", "moe_k"),
    **_named(32, "moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    **_named(1, "n_group", "topk_group"),
    # multi-head latent attention (DeepSeek-style)
    **_named(16, "q_lora_rank", "kv_lora_rank", "qk_head_dim", "v_head_dim"),
    **_named(8, "qk_rope_head_dim", "qk_nope_head_dim"),
    # state-space and linear-attention layers
    **_named(8, "state_size", "mamba_d_state", "ssm_state_size"),
    **_named(4, "mamba_n_heads", "time_step_rank"),
    **_named(16, "mamba_d_head", "mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim"),
    **_named(64, "mamba_d_ssm"),
    **_named(1, "n_groups", "mamba_n_groups"),
    **_named(2, "linear_num_key_heads", "linear_num_value_heads"),
    # per-layer input embeddings (Gemma 3n / 4)
    **_named(V, "vocab_size_per_layer_input"),
    **_named(8, "hidden_size_per_layer_input"),
    # windows
    **_named(16, "sliding_window", "attention_window_size"),
}
"""Tiny sizes, set where the model's config has the attribute."""

SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "decoder", "encoder", "speech_config")
"""Sub-configs every family gets the tiny sizes in (more per family: ``hf_families.SUB_CONFIGS``)."""

MAX_PARAMS = 3_000_000


@dataclass
class Outcome:
    model_type: str
    cls: str
    status: str  # matched | refused | not buildable | MISMATCH | CRASH
    reason: str = ""
    seconds: float = 0.0


def _has(config, key: str) -> bool:
    """``key`` is a plain, settable attribute of ``config`` (not a read-only property, not per-layer only)."""
    if isinstance(getattr(type(config), key, None), property):
        return False
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 (per-layer attributes raise their own error type on read)
        return False


def _tiny_kwargs(default, extra: dict, subs: Tuple[str, ...] = SUB_CONFIGS) -> dict:
    """The generic tiny sizes ``default`` has, with ``extra`` on top (a dict under a sub-config's name in
    ``subs`` is merged into that sub-config's own tiny sizes)."""
    kw = {k: v for k, v in TINY.items() if _has(default, k)}
    for k, v in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if _has(default, k) and (getattr(default, k) is None or isinstance(getattr(default, k), int)):
            kw[k] = v
    for k in dir(default):
        if ("dropout" in k or "pdrop" in k or k.endswith("_drop") or k == "layerdrop") and isinstance(
            _get(default, k), float
        ):
            kw[k] = 0.0
    for key in ("layer_types", "mlp_layer_types"):
        # One layer of each kind the model has (hybrid stacks: linear and full attention, dense and MoE MLP).
        types = _get(default, key)
        derived = isinstance(getattr(type(default), "layers_block_type", None), property)  # set from other fields
        if (
            not derived
            and _has(default, key)
            and isinstance(types, list)
            and types
            and all(isinstance(t, str) for t in types)
        ):
            kinds = list(dict.fromkeys(types))
            n = max(2, len(kinds), kw.get("num_hidden_layers", 2))
            kw[key] = (kinds * n)[:n]
            if "num_hidden_layers" in kw:
                kw["num_hidden_layers"] = n
    merged = set()
    for name in subs:
        sub = _get(default, name)
        if sub is not None and hasattr(sub, "to_dict"):
            own = extra.get(name)
            kw[name] = _tiny_kwargs(sub, own if isinstance(own, dict) else {})
            merged.add(name)
    if "qk_rope_head_dim" in kw and _has(default, "head_dim"):
        kw["head_dim"] = kw["qk_rope_head_dim"]  # multi-head latent attention: the rotary part's size
    kw.update({k: v for k, v in extra.items() if k not in merged})
    return kw


def _get(config, key: str):
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001
        return None


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    default = cfg_cls(**families.DEFAULTS.get(model_type, {}))
    subs = SUB_CONFIGS + families.SUB_CONFIGS.get(model_type, ())
    cfg = cfg_cls(**_tiny_kwargs(default, families.OVERRIDES.get(model_type, {}), subs))
    for c in [cfg] + [getattr(cfg, n) for n in subs if getattr(cfg, n, None) is not None]:
        if hasattr(c, "_attn_implementation"):
            c._attn_implementation = families.ATTENTION.get(model_type, "eager")
    return cfg


def model_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def build(model_type: str, seed: int = 0):
    """A tiny fp32 model in training mode with every parameter moved off its initial value."""
    cls = model_class(model_type)
    cfg = tiny_config(model_type)
    if not isinstance(cfg, cls.config_class):  # e.g. "llama4" maps to Llama4ForCausalLM, which takes the text config
        cfg = next((getattr(cfg, n) for n in SUB_CONFIGS if isinstance(_get(cfg, n), cls.config_class)), cfg)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"not tiny: {n} parameters with the generic sizes; add an override")
    torch.manual_seed(seed)
    model = cls(cfg).float().train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the initial values: ones / zeros (norms, scales, biases) would hide steps
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        head = model.get_output_embeddings()
        if isinstance(getattr(head, "weight", None), torch.Tensor):  # larger logits: structure to get wrong
            head.weight.mul_(4.0)
    return model


def batch(seed: int = 1, b: int = 2, s: int = 9, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[-1, -2:] = -100
    return ids, labels


def inputs(model_type: str, model, seed: int = 1) -> dict:
    """The forward's keyword arguments for a token batch: ``input_ids`` and ``labels`` (``batch``), or what
    the family's stock forward needs instead (``hf_families.INPUTS``)."""
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or V
    ids, labels = batch(seed, vocab=min(vocab, V))
    make = families.INPUTS.get(model_type)
    return make(model, ids, labels) if make is not None else dict(input_ids=ids, labels=labels)


def _run(model, batch_kw: dict, **kw):
    torch.manual_seed(0)
    return model(**batch_kw, **kw)


def _grads(model) -> Dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, atol=2e-5, rtol=2e-4) -> Optional[str]:
    try:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    except AssertionError as e:
        return str(e).splitlines()[0] if str(e) else "differs"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # ImportError's start with a newline
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def check(model_type: str, generate: bool = True) -> Outcome:
    """Build ``model_type`` tiny and compare the patched copy with stock."""
    from tune_losses.integrations.transformers import is_patched, patch, unpatch

    t0 = time.perf_counter()
    name = "?"
    try:
        name = model_class(model_type).__name__
        stock = build(model_type)
        try:
            fused = copy.deepcopy(stock)
        except RuntimeError:  # a module holding a non-leaf tensor: the same seed builds the same weights
            fused = build(model_type)
    except Exception as e:  # noqa: BLE001 (a survey: any error building stock is recorded)
        return Outcome(
            model_type, name, "not buildable", _unrunnable(model_type, _first_line(e)), time.perf_counter() - t0
        )
    feed = inputs(model_type, stock)
    ids = feed["input_ids"]
    try:
        ref = _run(stock, feed)
        ref_loss = getattr(ref, "loss", None)
        if ref_loss is not None:
            ref_loss.backward()
    except Exception as e:  # noqa: BLE001
        reason = _unrunnable(model_type, "stock forward: " + _first_line(e))
        return Outcome(model_type, name, "not buildable", reason, time.perf_counter() - t0)

    def done(status, reason=""):
        return Outcome(model_type, name, status, reason, time.perf_counter() - t0)

    try:
        patch(fused)
    except ValueError as e:
        return done("refused", str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001
        return done("CRASH", "patch: " + _first_line(e))
    if ref_loss is None:  # nothing to compare: patch must have refused it
        return done("MISMATCH", "patch accepted a model whose stock forward returns no loss")
    try:
        out = _run(fused, feed)
        if out.logits is not None:
            return done("MISMATCH", "patched training forward returned logits")
        bad = _close(out.loss, ref.loss)
        if bad:
            return done("MISMATCH", f"loss {out.loss.item():.6g} vs stock {ref.loss.item():.6g}: {bad}")
        out.loss.backward()
        want, got = _grads(stock), _grads(fused)
        if set(want) != set(got):
            return done("MISMATCH", f"gradients on different parameters: {sorted(set(want) ^ set(got))[:4]}")
        for n in want:
            bad = _close(got[n], want[n])
            if bad:
                return done("MISMATCH", f"gradient of {n}: {bad}")
        tup = _run(fused, feed, return_dict=False)
        if not (isinstance(tup, tuple) and tup[1] is None and _close(tup[0], ref.loss) is None):
            return done("MISMATCH", "return_dict=False: expected (loss, None, ...)")
        stock.eval()
        fused.eval()
        with torch.no_grad():
            a, b = _run(stock, feed), _run(fused, feed)
        bad = _close(b.logits, a.logits) or _close(b.loss, a.loss)
        if bad:
            return done("MISMATCH", f"eval: {bad}")
        if generate and hasattr(stock, "generate") and stock.can_generate():
            kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
            try:
                want_ids = stock.generate(ids[:1, :5], **kw)
            except Exception:  # noqa: BLE001 (stock cannot generate from a plain prompt: nothing to compare)
                want_ids = None
            if want_ids is not None and not torch.equal(fused.generate(ids[:1, :5], **kw), want_ids):
                return done("MISMATCH", "generate differs")
        unpatch(fused)
        fused.train()
        stock.train()
        if is_patched(fused) or "forward" in fused.__dict__:
            return done("MISMATCH", "unpatch left a forward on the instance")
        with torch.no_grad():
            a, b = _run(stock, feed), _run(fused, feed)
        if b.logits is None or _close(b.loss, a.loss):
            return done("MISMATCH", "after unpatch: not stock")
    except Exception as e:  # noqa: BLE001
        return done("CRASH", _first_line(e))
    return done("matched")


def _unrunnable(model_type: str, error: str) -> str:
    """The stock error, after the known reason where the family cannot run tiny on CPU at all."""
    known = families.UNRUNNABLE.get(model_type)
    return f"{known} ({error})" if known else error


def survey(model_types=None, generate: bool = True):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) if model_types is None else list(model_types)
    out = []
    for t in types:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(check(t, generate=generate))
    return out


def markdown(outcomes, seconds: Optional[float] = None) -> str:
    import transformers

    counts: Dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines = [
        "# Hugging Face causal LMs under `patch`",
        "",
        f"Generated by `python tests/hf_survey.py` with transformers {transformers.__version__}: every entry of",
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` built tiny from its config, weights moved off their initial values,",
        "then `patch` compared with stock (loss, every gradient, `return_dict=False`, eval logits, greedy",
        "generation, unpatch). The same check runs as `tests/test_hf_survey.py` (slow). Families the generic",
        "tiny sizes do not cover get their settings, and the inputs their stock forward needs, from",
        "`tests/hf_families.py`.",
        "",
        f"{len(outcomes)} model types: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("matched", "refused", "not buildable", "MISMATCH", "CRASH")),
        "",
        *(
            [
                f"Survey time: {seconds:.0f} s on CPU (2 cores shared with other jobs), {sum(o.seconds for o in outcomes):.0f} s in checks.",
                "",
            ]
            if seconds is not None
            else []
        ),
        "| model type | class | outcome | reason |",
        "|---|---|---|---|",
    ]
    order = {"MISMATCH": 0, "CRASH": 1, "refused": 2, "not buildable": 3, "matched": 4}
    for o in sorted(outcomes, key=lambda o: (order[o.status], o.model_type)):
        reason = o.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {o.model_type} | {o.cls} | {o.status} | {reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    t = time.perf_counter()
    results = survey(sys.argv[2:] or None)
    for o in results:
        print(f"{o.status:14s} {o.seconds:6.2f}s {o.model_type:28s} {o.reason[:200]}", flush=True)
    total = time.perf_counter() - t
    print(f"total {total:.1f}s")
    if len(sys.argv) > 1 and sys.argv[1] != "-":
        with open(sys.argv[1], "w") as f:
            f.write(markdown(results, total))
