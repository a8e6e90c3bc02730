"""TRL's other DPO loss types (robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down,
discopop) and ORPO's separate NLL labels, on both paths, against the fp64 full-logits reference
(tests/alignment_reference.py, written from TRL 1.16's ``DPOTrainer``): values, gradients, ignored
tokens, uncounted pairs, fp32 / bf16, bad options."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from alignment_reference import ref_preference
from test_alignment_losses import _pair_labels

from tune_losses import LinearPreferenceLoss, linear_preference_loss
from tune_losses.alignment.formulas import preference_pair_losses

NEW_TYPES = ("robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop")
ALGORITHMS = ("auto", "recompute")
B, S, H, V = 3, 11, 16, 41
_OPTIONS = {
    "robust": dict(label_smoothing=0.2),
    "exo_pair": dict(label_smoothing=1e-3),
    "discopop": dict(discopop_tau=0.3),
}


def _labels(gen, empty_rejected=False):
    """[2B, S] labels (see test_alignment_losses) with prompts of up to 3 tokens."""
    return _pair_labels(gen, B, S, V, empty_rejected=empty_rejected, max_prompt=3)


def _case(dtype=torch.float64, seed=0, empty_rejected=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, S, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=gen)).to(dtype).requires_grad_()
    ref_hidden = torch.randn(2 * B, S, H, generator=gen).to(dtype)
    ref_weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    return hidden, weight, bias, ref_hidden, ref_weight, _labels(gen, empty_rejected=empty_rejected)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_new_types_match_fp64_reference(loss_type, algorithm):
    hidden, weight, bias, ref_hidden, ref_weight, labels = _case(empty_rejected=True)
    kwargs = dict(loss_type=loss_type, beta=0.6, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight)
    kwargs.update(_OPTIONS.get(loss_type, {}))
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(algorithm=algorithm, **kwargs))
    ref = ref_preference(hidden, weight, labels, **kwargs)
    _close(out.loss, ref["loss"], 1e-9)
    for name in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        _close(getattr(out, name), ref[name], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias])):
        _close(g, r, 1e-9)


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_new_types_with_precomputed_reference_and_nll(loss_type):
    """Sequence-level reference log-probs, the mean log-prob and an RPO-style NLL term."""
    hidden, weight, bias, _, _, labels = _case(seed=1)
    gen = torch.Generator().manual_seed(5)
    ref_logps = (-8 * torch.rand(B, generator=gen, dtype=torch.float64), -8 * torch.rand(B, generator=gen).double())
    kwargs = dict(loss_type=loss_type, beta=0.3, ref_logps=ref_logps, nll_weight=0.4, average_log_prob=True)
    kwargs.update(_OPTIONS.get(loss_type, {}))
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(**kwargs))
    ref = ref_preference(hidden, weight, labels, **kwargs)
    _close(out.loss, ref["loss"], 1e-9)
    _close(out.nll, ref["nll"], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight]), _grads(ref["loss"], [hidden, weight])):
        _close(g, r, 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("loss_type", ["robust", "nca_pair", "apo_down", "discopop"])
def test_new_types_low_precision(dtype, tol, algorithm, loss_type):
    hidden, weight, bias, ref_hidden, ref_weight, labels = _case(dtype=dtype, seed=2)
    kwargs = dict(loss_type=loss_type, beta=0.5, ref_hidden=ref_hidden, ref_weight=ref_weight)
    kwargs.update(_OPTIONS.get(loss_type, {}))
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(algorithm=algorithm, **kwargs))
    assert out.loss.dtype == torch.float32
    ref = ref_preference(hidden, weight, labels, **kwargs)
    _close(out.loss, ref["loss"], tol)
    for g, r in zip(_grads(out.loss, [hidden, weight]), _grads(ref["loss"], [hidden, weight])):
        assert g.dtype == dtype
        scale = r.abs().max().clamp(min=1e-6)
        assert ((g.double() - r).abs().max() / scale) < 10 * tol


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_no_valid_token_is_zero_and_nan_is_not_hidden(loss_type, algorithm):
    hidden, weight, bias, ref_hidden, ref_weight, labels = _case(dtype=torch.float32, seed=3)
    kwargs = dict(loss_type=loss_type, ref_hidden=ref_hidden, ref_weight=ref_weight, algorithm=algorithm)
    kwargs.update(_OPTIONS.get(loss_type, {}))
    out = linear_preference_loss(hidden, weight, torch.full_like(labels, -100), **alignment_calls.preference(**kwargs))
    assert out.loss.item() == 0.0
    gh, gw = _grads(out.loss, [hidden, weight])
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0
    bad = hidden.detach().clone()
    valid = (labels[0] != -100).nonzero()[0, 0]
    bad[0, valid, 0] = float("nan")
    out = linear_preference_loss(bad.requires_grad_(), weight, labels, **alignment_calls.preference(**kwargs))
    assert not torch.isfinite(out.loss)


def test_discopop_is_finite_where_its_exponential_overflows():
    """A very negative margin: TRL's written-out form gives inf * 0 = NaN; ours the limit -log s(z)."""
    pc = torch.tensor([-1000.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = preference_pair_losses(pc, zero, zero, zero, loss_type="discopop", beta=1.0)
    (g,) = torch.autograd.grad(loss.sum(), pc)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    torch.testing.assert_close(loss, torch.tensor([1000.0]))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_orpo_nll_target(algorithm):
    """ORPO with separate NLL labels (Liger's ``nll_target``): the NLL over those labels' valid tokens."""
    hidden, weight, bias, _, _, labels = _case(seed=4)
    gen = torch.Generator().manual_seed(9)
    nll_target = _labels(gen)
    kwargs = dict(loss_type="orpo", beta=0.2, bias=bias, nll_target=nll_target)
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(algorithm=algorithm, **kwargs))
    ref = ref_preference(hidden, weight, labels, **kwargs)
    _close(out.loss, ref["loss"], 1e-9)
    _close(out.nll, ref["nll"], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias])):
        _close(g, r, 1e-9)
    # The module takes it per call.
    module = LinearPreferenceLoss(loss_type="orpo", beta=0.2)
    module.projection = type("P", (), {"weight": weight, "bias": bias})()
    _close(module(hidden, labels, nll_target=nll_target).loss, ref["loss"], 1e-9)


def test_bad_options_name_the_argument():
    hidden, weight, _, _, _, labels = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match="label_smoothing.*exo_pair"):
        linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(loss_type="exo_pair"))
    with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\).*robust"):
        linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(loss_type="robust", label_smoothing=0.5)
        )
    with pytest.raises(ValueError, match="label_smoothing: only"):
        linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(loss_type="apo_zero", label_smoothing=0.1)
        )
    with pytest.raises(ValueError, match="discopop_tau"):
        linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(loss_type="discopop", discopop_tau=0.0)
        )
    with pytest.raises(ValueError, match="nll_target"):
        linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(loss_type="orpo", nll_target=labels[:, :-1])
        )
    with pytest.raises(ValueError, match="grad_in_forward"):
        linear_preference_loss(
            hidden,
            weight,
            labels,
            **alignment_calls.preference(loss_type="orpo", nll_target=labels, algorithm="grad_in_forward"),
        )
    with pytest.raises(ValueError, match="loss_type"):
        LinearPreferenceLoss(loss_type="kto_pair")
