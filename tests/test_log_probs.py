"""``tune_losses.linear_log_probs`` against the independent fp64 full-logits reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import make_labels, ref_log_probs

from tune_losses import linear_log_probs

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(lead=(3, 7), hdim=16, vocab=50, bias=True, seed=0, dtype=torch.float32):
    g = gen(seed)
    h = torch.randn(*lead, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) * (2.0 / hdim**0.5)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    return [None if t is None else t.to(dtype) for t in (h, w, b)]


def _with_grads(fn, tensors, grad_outputs, dtype=None):
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * go.to(o.dtype)).sum() for o, go in zip(outs, grad_outputs))
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_values_and_gradients_match_fp64_reference(ignore, temperature, entropy, chunk_size):
    h, w, b = inputs(seed=1)
    labels = make_labels((3, 7), 50, ignore, gen(2))
    gos = [torch.rand(3, 7, generator=gen(3)) - 0.3, torch.rand(3, 7, generator=gen(4)) - 0.5][: 1 + entropy]

    def ours(hh, ww, bb):
        return linear_log_probs(
            hh, ww, labels, bias=bb, temperature=temperature, return_entropy=entropy, chunk_size=chunk_size
        )

    def ref(hh, ww, bb):
        lp, ent = ref_log_probs(F.linear(hh, ww, bb), labels, temperature=temperature)
        return (lp, ent) if entropy else lp

    got, got_g = _with_grads(ours, (h, w, b), gos)
    want, want_g = _with_grads(ref, (h, w, b), gos, dtype=torch.float64)
    for o, r in zip(got, want):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        torch.testing.assert_close(o.double(), r, rtol=2e-5, atol=2e-6)
        assert (o[labels == -100] == 0).all()
    for g, r in zip(got_g, want_g):
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-6)
    if ignore == "all":
        assert all((g == 0).all() for g in got_g)


def test_bf16_inputs_give_fp32_log_probs_and_bf16_grads():
    h, w, b = inputs(seed=5, dtype=torch.bfloat16)
    labels = make_labels((3, 7), 50, "some", gen(6))
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    lp, ent = linear_log_probs(*leaves[:2], labels, bias=leaves[2], return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    ref_lp, ref_ent = ref_log_probs(F.linear(h, w, b).double(), labels)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in leaves)


def test_fp64_in_fp64_out_and_gradcheck():
    h, w, b = inputs(lead=(2, 3), hdim=4, vocab=9, seed=7, dtype=torch.float64)
    labels = make_labels((2, 3), 9, "some", gen(8))
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]

    def fn(hh, ww, bb):
        return linear_log_probs(hh, ww, labels, bias=bb, temperature=1.3, return_entropy=True, chunk_size=4)

    lp, ent = fn(*leaves)
    assert lp.dtype == ent.dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves)


def test_only_one_output_used_and_no_grad():
    h, w, b = inputs(seed=9)
    labels = make_labels((3, 7), 50, "some", gen(10))
    hh = h.clone().requires_grad_()
    lp, ent = linear_log_probs(hh, w, labels, return_entropy=True)
    (g,) = torch.autograd.grad(ent.sum(), hh)
    x = h.double().requires_grad_()
    (rg,) = torch.autograd.grad(ref_log_probs(F.linear(x, w.double()), labels)[1].sum(), x)
    torch.testing.assert_close(g.double(), rg, rtol=2e-5, atol=2e-6)
    with torch.no_grad():
        lp2 = linear_log_probs(hh, w, labels)
    assert lp2.grad_fn is None
    torch.testing.assert_close(lp2, lp.detach())


def test_masked_vocabulary_entries_stay_finite():
    h, w, b = inputs(seed=11)
    b[[3, 17]] = float("-inf")
    labels = make_labels((3, 7), 50, "some", gen(12))
    labels = torch.where((labels == 3) | (labels == 17), 0, labels)
    hh = h.clone().requires_grad_()
    lp, ent = linear_log_probs(hh, w, labels, bias=b, return_entropy=True, chunk_size=5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(hh.grad).all()


def test_bad_temperature_raises():
    h, w, _ = inputs()
    labels = make_labels((3, 7), 50, "some", gen(13))
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            linear_log_probs(h, w, labels, temperature=t)
