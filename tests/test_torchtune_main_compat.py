"""torchtune main's loss API on our side: models that honour ``skip_output_layer`` and the
constructor of torchtune main's ``LinearCrossEntropyLoss``.

torchtune main (the last code before development stopped) switches a decoder to hidden states with
``model.skip_output_layer = True`` and its ``LinearCrossEntropyLoss(num_output_chunks, ignore_index,
tp_enabled, mask_ignored_tokens)`` takes hidden states. torchtune 0.6.1 has neither, so the model
here is a 0.6.1 decoder whose ``unembed`` honours the flag, as torchtune main's does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tune_losses import set_output_mode
from tune_losses.options import ExecutionOptions

torchtune_models = pytest.importorskip("torchtune.models.llama2")
from torchtune.modules import TransformerDecoder  # noqa: E402

VOCAB, DIM = 96, 32


class MainStyleDecoder(TransformerDecoder):
    """A torchtune 0.6.1 decoder with torchtune main's ``skip_output_layer`` flag."""

    def unembed(self, h):
        h = self.norm(h)
        if self.skip_output_layer:
            return h
        if self.num_output_chunks > 0:
            return self.chunked_output(h)
        return self.output(h).float()


def main_style_decoder(seed: int = 0) -> MainStyleDecoder:
    torch.manual_seed(seed)
    model = torchtune_models.llama2(
        vocab_size=VOCAB, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=DIM, max_seq_len=64
    )
    model.__class__ = MainStyleDecoder
    model.skip_output_layer = False
    return model


class MainStyleHead(nn.Module):
    """Not a torchtune decoder: a body, an ``output`` projection and the ``skip_output_layer`` flag."""

    def __init__(self):
        super().__init__()
        self.body = nn.Embedding(VOCAB, DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.skip_output_layer = False

    def forward(self, tokens):
        h = self.body(tokens)
        return h if self.skip_output_layer else self.output(h)


@pytest.mark.parametrize("make", [main_style_decoder, MainStyleHead], ids=["decoder", "plain"])
def test_hidden_mode_uses_the_models_own_flag(make):
    model = make()
    tokens = torch.randint(0, VOCAB, (2, 7))
    logits = model(tokens)
    proj = set_output_mode(model, "hidden")
    assert model.skip_output_layer is True
    assert "unembed" not in model.__dict__ and "forward" not in model.output.__dict__  # nothing overridden
    hidden = model(tokens)
    assert hidden.shape == (2, 7, DIM)
    torch.testing.assert_close(proj(hidden).float(), logits.float())
    set_output_mode(model, "chunks", 3)
    assert model.skip_output_layer is False
    chunks = model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 3
    torch.testing.assert_close(torch.cat(chunks, dim=1).float(), logits.float())
    set_output_mode(model, "logits")
    assert model.skip_output_layer is False
    torch.testing.assert_close(model(tokens).float(), logits.float())


# --------------------------------------------------- torchtune main's LinearCrossEntropyLoss


def _ref_ce(hidden, weight, bias, labels):
    """fp64 full-logits mean CE over valid tokens (0 when none)."""
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    valid = labels != -100
    per = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return per / valid.sum().clamp(min=1)


def _labels(shape, ignore, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=g)
    if ignore == "all":
        return torch.full(shape, -100)
    if ignore == "prompt":  # the first 60 % of every sequence is prompt
        labels[:, : int(shape[1] * 0.6)] = -100
    return labels


def test_yaml_constructor_of_torchtune_main():
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create(
        {
            "_component_": "tune_losses.LinearCrossEntropyLoss",
            "num_output_chunks": 8,
            "ignore_index": -100,
            "tp_enabled": False,
            "mask_ignored_tokens": True,
        }
    )
    loss_fn = config.instantiate(cfg)
    assert loss_fn.num_output_chunks == 8 and loss_fn.apply_compile_strategy() is loss_fn
    for bad, message in [
        ({"num_output_chunks": 0}, "num_output_chunks"),
        ({"tp_enabled": 1}, "tp_enabled"),
        ({"mask_ignored_tokens": "yes"}, "mask_ignored_tokens"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            config.instantiate(OmegaConf.merge(cfg, bad))


@pytest.mark.parametrize("mask_ignored_tokens", [True, False])
@pytest.mark.parametrize("ignore", ["none", "prompt", "all"])
@pytest.mark.parametrize("seq_len", [7, 16])
def test_main_style_decoder_values_and_gradients(mask_ignored_tokens, ignore, seq_len):
    """torchtune main's loss tests in our words: a decoder switched by ``set_model_output``, the loss on
    its hidden states against fp64 full logits, values and gradients (hidden states and weight)."""
    import tune_losses as tl

    model = main_style_decoder()
    loss_fn = tl.LinearCrossEntropyLoss(num_output_chunks=8, mask_ignored_tokens=mask_ignored_tokens)
    loss_fn.set_model_output(model)
    assert model.skip_output_layer is True
    tokens = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))
    labels = _labels((2, seq_len), ignore)
    hidden = model(tokens).detach().requires_grad_(True)
    loss = loss_fn(hidden, labels)
    loss.backward()
    ref_h = hidden.detach().double().requires_grad_(True)
    ref_w = model.output.weight.detach().double().requires_grad_(True)
    ref = _ref_ce(ref_h, ref_w, None, labels)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.output.weight.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-6)
    if ignore == "all":
        assert loss.item() == 0.0 and not hidden.grad.any() and not model.output.weight.grad.any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "prompt", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_rows_change_nothing_but_the_work(reduction, ignore, dtype):
    """``drop_ignored_tokens``: same values and gradients (hidden, weight, bias) as the fp64 reference,
    zero hidden-state gradient rows for ignored tokens; bf16 no worse than eager bf16."""
    import tune_losses as tl

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 20, DIM, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(VOCAB, DIM, generator=g) * 0.3).to(dtype).requires_grad_(True)
    bias = torch.randn(VOCAB, generator=g).to(dtype).requires_grad_(True)
    labels = _labels((3, 20), ignore, seed=3)
    loss = tl.linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        reduction=reduction,
        chunk_size=16,
        execution=ExecutionOptions(drop_ignored_tokens=True),
    )
    grad_out = torch.rand(loss.shape, generator=g) if reduction == "none" else torch.tensor(1.0)
    (loss * grad_out).sum().backward()
    rh, rw, rb = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    logits = rh @ rw.T + rb
    per = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none", ignore_index=-100
    ).reshape(labels.shape)
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / (labels != -100).sum().clamp(min=1)}[reduction]
    (ref * grad_out.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(loss.double(), ref, **tol)
    for ours, theirs in ((hidden.grad, rh.grad), (weight.grad, rw.grad), (bias.grad, rb.grad)):
        torch.testing.assert_close(ours.double(), theirs, **tol)
    assert not hidden.grad[labels == -100].any()


def test_tp_enabled_needs_a_vocabulary_sharded_weight():
    import tune_losses as tl

    loss_fn = tl.LinearCrossEntropyLoss(tp_enabled=True)
    loss_fn.set_model_output(MainStyleHead())
    with pytest.raises(ValueError, match="vocab_parallel=True"):
        loss_fn(torch.randn(2, 5, DIM), torch.randint(0, VOCAB, (2, 5)))


@pytest.mark.slow
def test_sft_recipe_takes_the_torchtune_main_config_form(tmp_path, tiny_assets):
    """A torchtune-main loss config trains as ours does: same first steps with and without dropping
    the ignored rows (prompt and padding tokens)."""
    from test_recipes import SHORT, _assert_same_first_steps, tune_run

    main_form = [
        "loss._component_=tune_losses.LinearCrossEntropyLoss",
        "loss.num_output_chunks=8",
        "loss.ignore_index=-100",
        "loss.tp_enabled=False",
    ]
    runs = {
        mask: tune_run(
            "sft_single_device", "sft", tmp_path / str(mask), *SHORT, *main_form, f"loss.mask_ignored_tokens={mask}"
        )
        for mask in (True, False)
    }
    _assert_same_first_steps(runs)
