"""The preference losses' grad-in-forward path over chunks of whole pairs against the fp64 full-logits
reference (values and gradients), its packing, its fallbacks and its normalization."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from alignment_reference import ref_preference
from test_alignment_losses import _pair_labels

from tune_losses import linear_preference_loss
from tune_losses.alignment import linear_preference_terms
from tune_losses.alignment.pair_chunks import default_row_budget, pair_chunk_layout, pair_chunk_limits

PREF_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
B, S, H, V = 4, 11, 16, 37


def _labels(gen):
    """[2B, S] (see test_alignment_losses): pair 0's rejected row empty, pair 2 with no valid token."""
    labels = _pair_labels(gen, b=B, s=S, empty_rejected=True)
    labels[2] = labels[B + 2] = -100
    return labels


def _inputs(dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, S, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=gen)).to(dtype).requires_grad_() if bias else None
    return gen, hidden, weight, b


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def _pair_sizes(labels):
    n = (labels != -100).sum(-1)
    return (n[:B] + n[B:]).tolist()


@pytest.mark.parametrize("loss_type", PREF_TYPES)
@pytest.mark.parametrize("reference", ["hidden", "logps", "none"])
@pytest.mark.parametrize("average", [None, True, False])
def test_pair_chunks_match_fp64_reference(loss_type, reference, average):
    """Several pairs per chunk, unequal lengths, an uncounted pair, an empty pair, NLL term, bias."""
    gen, hidden, weight, bias = _inputs(
        seed=PREF_TYPES.index(loss_type) * 9
        + ["hidden", "logps", "none"].index(reference) * 3
        + [None, True, False].index(average)
    )
    labels = _labels(gen)
    kwargs = dict(loss_type=loss_type, beta=0.6, bias=bias, nll_weight=0.4, average_log_prob=average)
    if loss_type in ("sigmoid", "simpo"):
        kwargs.update(label_smoothing=0.15)
    if loss_type == "simpo":
        kwargs.update(gamma=0.3)
    if reference == "hidden":
        kwargs.update(
            ref_hidden=torch.randn(2 * B, S, 8, generator=gen, dtype=torch.float64),
            ref_weight=torch.randn(V, 8, generator=gen, dtype=torch.float64),
            ref_bias=torch.randn(V, generator=gen, dtype=torch.float64),
        )
    elif reference == "logps":
        kwargs.update(
            ref_logps=(
                -5 * torch.rand(B, generator=gen, dtype=torch.float64),
                -5 * torch.rand(B, generator=gen, dtype=torch.float64),
            )
        )
    budget = 2 * max(_pair_sizes(labels))  # at least two pairs in the first chunk
    out = linear_preference_loss(
        hidden, weight, labels, **alignment_calls.preference(algorithm="grad_in_forward", chunk_size=budget, **kwargs)
    )
    assert type(out.loss.grad_fn).__name__ == "GradInForwardBackward"
    ref = ref_preference(hidden, weight, labels, **kwargs)
    _close(out.loss, ref["loss"], 1e-9)
    for name in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "nll"):
        _close(getattr(out, name), ref[name], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias])):
        _close(g, r, 1e-9)


def test_layout_packs_whole_pairs_in_order():
    labels = torch.full((6, 5), -100)
    labels[0, 1:3] = 1  # pair 0: chosen 2 tokens, rejected 1
    labels[3, 4] = 2
    labels[1, :5] = 3  # pair 1: chosen 5, rejected 0
    labels[5, 0] = 4  # pair 2: chosen 0, rejected 1
    layout = pair_chunk_layout(labels, -100, chunk_size=6)
    assert layout.chunks == ((0, 1, 0, 3), (1, 3, 3, 9))
    assert layout.rows.tolist() == [0, 0, 3, 1, 1, 1, 1, 1, 5]
    assert layout.tokens.tolist() == [1, 2, 19, 5, 6, 7, 8, 9, 25]
    assert layout.lengths.tolist() == [2, 5, 0, 1, 0, 1]
    # chunk_size is tokens per chunk: whole pairs up to that many, at least one pair per chunk
    assert pair_chunk_layout(labels, -100, chunk_size=4).chunks == ((0, 1, 0, 3), (1, 2, 3, 8), (2, 3, 8, 9))
    assert pair_chunk_layout(labels, -100, chunk_size=2).chunks == ((0, 1, 0, 3), (1, 2, 3, 8), (2, 3, 8, 9))
    assert pair_chunk_layout(labels, -100, chunk_size=4, max_pair=4) is None  # pair 1 alone holds 5 tokens
    assert pair_chunk_layout(labels, -100, chunk_size=1) is None  # 5 tokens: more than 4 chunks of 1
    assert default_row_budget(32768, torch.device("cpu")) == 512
    assert pair_chunk_limits(None, 32768, torch.device("cpu")) == (512, 512)
    assert pair_chunk_limits(100, 32768, torch.device("cpu")) == (100, 400)


def test_pair_over_four_chunks_falls_back_to_per_token_path():
    gen, hidden, weight, bias = _inputs(seed=7)
    labels = _labels(gen)
    sizes = _pair_sizes(labels)
    # chunk_size below the shortest pair: one pair per chunk, still grad-in-forward
    one_pair = linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=min(s for s in sizes if s) - 1)
    assert type(one_pair.loss.grad_fn).__name__ == "GradInForwardBackward"
    small = (max(sizes) - 1) // 4  # the longest pair holds more than 4 chunks of this many tokens
    kwargs = dict(bias=bias, nll_weight=0.2, chunk_size=small)
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(**kwargs))
    assert type(out.loss.grad_fn).__name__ != "GradInForwardBackward"
    ref = ref_preference(hidden, weight, labels, bias=bias, nll_weight=0.2)
    _close(out.loss, ref["loss"], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias])):
        _close(g, r, 1e-9)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(algorithm="grad_in_forward", **kwargs)
        )


def test_auto_takes_pair_chunks_by_default_and_recompute_allows_gradcheck():
    gen, hidden, weight, _ = _inputs(seed=8, bias=False)
    labels = _labels(gen)
    auto = linear_preference_loss(hidden, weight, labels)
    assert type(auto.loss.grad_fn).__name__ == "GradInForwardBackward"
    with torch.no_grad():  # no gradient wanted: the per-token path computes values only
        assert linear_preference_loss(hidden, weight, labels).loss.grad_fn is None
    small = (hidden[:, :4].detach().clone().requires_grad_(), weight.detach().clone().requires_grad_())
    lab = labels[:, :4]
    torch.autograd.gradcheck(
        lambda x, w: linear_preference_loss(x, w, lab, **alignment_calls.preference(algorithm="recompute")).loss, small
    )
    with pytest.raises(ValueError, match="algorithm"):
        linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(algorithm="fast"))


def test_backward_once_and_in_place_change_raise():
    gen, hidden, weight, _ = _inputs(seed=9, bias=False)
    labels = _labels(gen)
    out = linear_preference_loss(hidden, weight, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute"):
        out.loss.backward()
    out = linear_preference_loss(hidden, weight, labels)
    with torch.no_grad():
        weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_pair_chunks_low_precision(dtype, tol):
    gen, hidden, weight, bias = _inputs(dtype=dtype, seed=11)
    labels = _labels(gen)
    ref_hidden = torch.randn(2 * B, S, H, generator=gen).to(dtype)
    kwargs = dict(bias=bias, nll_weight=0.1, ref_hidden=ref_hidden, ref_weight=weight.detach().flip(0))
    out = linear_preference_loss(
        hidden, weight, labels, **alignment_calls.preference(algorithm="grad_in_forward", **kwargs)
    )
    ref = ref_preference(hidden, weight, labels, **kwargs)
    assert out.loss.dtype == torch.float32
    _close(out.loss, ref["loss"], tol)
    for g, r, t in zip(
        _grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias]), [hidden, weight, bias]
    ):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max().item() <= tol * max(r.abs().max().item(), 1e-3) * 4


def test_terms_gradient_is_exact_for_any_normalizer():
    """Trainer use: terms now, step-global counts later. Without an NLL term the pair-chunked sums are
    differentiable and exact; with one, the per-token path keeps the two sums apart."""
    gen, hidden, weight, _ = _inputs(seed=12, bias=False)
    labels = _labels(gen)
    for nll_weight, fast in ((0.0, True), (0.5, False)):
        terms = linear_preference_terms(
            hidden, weight, labels, **alignment_calls.preference(beta=0.3, nll_weight=nll_weight)
        )
        assert (type(terms.pair_loss_sum.grad_fn).__name__ == "GradInForwardBackward") == fast
        pairs, tokens = torch.tensor(7), torch.tensor(40)
        loss = terms.loss(num_pairs=pairs, num_chosen_tokens=tokens)
        pair_mean = ref_preference(hidden, weight, labels, beta=0.3)["loss"]
        nll_mean = ref_preference(hidden, weight, labels, beta=0.3, nll_weight=1.0)["loss"] - pair_mean
        n_pairs = int(((labels[:B] != -100).any(-1) & (labels[B:] != -100).any(-1)).sum())
        n_tok = int((labels[:B] != -100).sum())
        want = pair_mean * n_pairs / 7 + nll_weight * nll_mean * n_tok / 40
        _close(loss, want, 1e-9)
        for g, r in zip(_grads(loss, [hidden, weight]), _grads(want, [hidden, weight])):
            _close(g, r, 1e-9)
    with pytest.raises(ValueError, match="normalizers"):
        linear_preference_terms(
            hidden, weight, labels, **alignment_calls.preference(loss_type="orpo", algorithm="grad_in_forward")
        )
    with pytest.raises(TypeError, match="num_pairs"):
        linear_preference_terms(hidden, weight, labels, num_pairs=3)


def test_given_normalizers_fold_into_the_gradient():
    """linear_preference_loss with a step's counts: two halves add up to the whole batch (NLL term on)."""
    gen, hidden, weight, bias = _inputs(seed=13)
    labels = _labels(gen)
    kwargs = dict(loss_type="orpo", bias=bias, nll_weight=0.5)
    full = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(**kwargs))
    g_full = _grads(full.loss, [hidden, weight, bias])
    n_pairs = torch.tensor(int(((labels[:B] != -100).any(-1) & (labels[B:] != -100).any(-1)).sum()))
    n_tok = torch.tensor(int((labels[:B] != -100).sum()))
    total, grads = 0.0, None
    for idx in ([0, 1, 4, 5], [2, 3, 6, 7]):
        part = linear_preference_loss(
            hidden[idx],
            weight,
            labels[idx],
            **alignment_calls.preference(num_pairs=n_pairs, num_chosen_tokens=n_tok, **kwargs),
        )
        assert type(part.loss.grad_fn).__name__ == "GradInForwardBackward"
        total = total + part.loss.detach()
        g = _grads(part.loss, [hidden, weight, bias])
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    _close(total, full.loss.detach(), 1e-12)
    for a, b in zip(grads, g_full):
        _close(a, b, 1e-12)
