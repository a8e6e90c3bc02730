"""linear_kto_loss (TRL 1.16's KTO and apo_zero_unpaired) against the fp64 full-logits reference: values,
gradients, KL reference point given / estimated from mismatched completions / none, weights, ignored
tokens, fp32 / bf16, bad input."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from alignment_reference import ref_kto

from tune_losses import linear_kto_loss

B, S, H, V = 5, 10, 16, 37


def _case(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).to(dtype).requires_grad_()
    ref_hidden = torch.randn(B, S, H, generator=g).to(dtype)
    ref_weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    for i in range(B):
        prompt = int(torch.randint(0, 4, (1,), generator=g))
        labels[i, :prompt] = -100
        labels[i, prompt + int(torch.randint(1, S - prompt + 1, (1,), generator=g)) :] = -100
    labels[3] = -100  # a row without a completion token: it does not count
    kto_labels = torch.tensor([True, False, True, False, False])
    return hidden, weight, bias, ref_hidden, ref_weight, labels, kto_labels


def _grads(loss, ts):
    return torch.autograd.grad(loss, ts)


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kl_mode", ["given", "estimated", "none"])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("average", [False, True])
def test_kto_matches_fp64_reference(loss_type, kl_mode, average):
    hidden, weight, bias, ref_hidden, ref_weight, labels, kto_labels = _case()
    kw = dict(
        loss_type=loss_type,
        beta=0.7,
        desirable_weight=1.3,
        undesirable_weight=0.6,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        average_log_prob=average,
        bias=bias,
    )
    if kl_mode == "given":
        kw["kl"] = torch.tensor([0.4], dtype=torch.float64)
    elif kl_mode == "estimated":
        # TRL's mismatched pairs: the completions shifted by one row (here: the rows rolled).
        kw.update(
            kl_hidden=hidden.detach().roll(1, 0), kl_labels=labels.roll(1, 0), kl_ref_hidden=ref_hidden.roll(1, 0)
        )
    out = linear_kto_loss(hidden, weight, labels, kto_labels, **alignment_calls.kto(**kw))
    ref = ref_kto(hidden, weight, labels, kto_labels, **kw)
    _close(out.loss, ref["loss"], 1e-10)
    for name in ("rewards", "logps"):
        _close(getattr(out, name), ref[name], 1e-10)
    _close(out.kl, ref["kl"] if loss_type == "kto" else torch.zeros(()), 1e-10)  # apo_zero_unpaired has none
    if loss_type == "kto" and kl_mode != "none":
        assert out.kl.item() != 0
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias])):
        _close(g, r, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-5), (torch.bfloat16, 3e-2)])
def test_kto_low_precision(dtype, tol):
    hidden, weight, _, ref_hidden, ref_weight, labels, kto_labels = _case(dtype=dtype, seed=1)
    kw = dict(beta=0.5, ref_hidden=ref_hidden, ref_weight=ref_weight, kl=0.2)
    out = linear_kto_loss(hidden, weight, labels, kto_labels, **alignment_calls.kto(**kw))
    ref = ref_kto(hidden, weight, labels, kto_labels, **kw)
    assert out.loss.dtype == torch.float32
    _close(out.loss, ref["loss"], tol)
    for g, r in zip(_grads(out.loss, [hidden, weight]), _grads(ref["loss"], [hidden, weight])):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() / r.abs().max() < 10 * tol


def test_kto_precomputed_reference_no_valid_token_and_nan():
    hidden, weight, _, _, _, labels, kto_labels = _case(dtype=torch.float32, seed=2)
    ref_logps = -torch.rand(B) * 5
    out = linear_kto_loss(hidden, weight, labels, kto_labels, ref_logps=ref_logps, kl=0.1)
    assert torch.isfinite(out.loss)
    empty = linear_kto_loss(hidden, weight, torch.full_like(labels, -100), kto_labels, kl=0.1)
    assert empty.loss.item() == 0.0
    gh, gw = _grads(empty.loss, [hidden, weight])
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0
    bad = hidden.detach().clone()
    bad[0, (labels[0] != -100).nonzero()[0, 0], 0] = float("nan")
    assert not torch.isfinite(linear_kto_loss(bad, weight, labels, kto_labels).loss)


def test_kto_bad_input_names_the_argument():
    hidden, weight, _, ref_hidden, ref_weight, labels, kto_labels = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match="kto_labels"):
        linear_kto_loss(hidden, weight, labels, kto_labels[:-1])
    with pytest.raises(ValueError, match="kto_labels.*bool"):
        linear_kto_loss(hidden, weight, labels, kto_labels.long())
    with pytest.raises(ValueError, match="loss_type"):
        linear_kto_loss(hidden, weight, labels, kto_labels, **alignment_calls.kto(loss_type="bco"))
    with pytest.raises(ValueError, match="kl:"):
        linear_kto_loss(
            hidden, weight, labels, kto_labels, **alignment_calls.kto(kl=0.1, kl_hidden=hidden, kl_labels=labels)
        )
    with pytest.raises(ValueError, match="kl:"):
        linear_kto_loss(hidden, weight, labels, kto_labels, kl=torch.zeros(2))
    with pytest.raises(ValueError, match="ref_logps"):
        linear_kto_loss(hidden, weight, labels, kto_labels, ref_logps=torch.zeros(B + 1))
    with pytest.raises(ValueError, match="desirable_weight"):
        linear_kto_loss(hidden, weight, labels, kto_labels, **alignment_calls.kto(desirable_weight=-1.0))
