"""Fused preference and policy losses against the fp64 full-logits references (values and gradients),
and torchtune's DPOLoss / RSOLoss against ours."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from alignment_reference import ref_policy, ref_preference, ref_token_logps

import tune_losses
from tune_losses import DPOLoss, RSOLoss, linear_policy_loss, linear_preference_loss

PREF_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
POLICY_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
B, S, H, V = 3, 9, 16, 37


def _pair_labels(gen, b=B, s=S, v=V, empty_rejected=False, max_prompt=2):
    """[2B, S] labels: per row an ignored prompt (0 to ``max_prompt`` tokens), a response of its own
    length, ignored padding."""
    labels = torch.randint(0, v, (2 * b, s), generator=gen)
    for i in range(2 * b):
        prompt = int(torch.randint(0, max_prompt + 1, (1,), generator=gen))
        length = int(torch.randint(1, s - prompt + 1, (1,), generator=gen))
        labels[i, :prompt] = -100
        labels[i, prompt + length :] = -100
    if empty_rejected:
        labels[b] = -100  # pair 0's rejected sequence has no valid token: that pair does not count
    return labels


def _inputs(dtype=torch.float64, seed=0, rows=2 * B, bias=True, hidden_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, S, H, generator=gen) * hidden_scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=gen)).to(dtype).requires_grad_() if bias else None
    return gen, hidden, weight, b


def _grads(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- preference


@pytest.mark.parametrize("loss_type", PREF_TYPES)
@pytest.mark.parametrize("reference", ["hidden", "logps", "none"])
def test_preference_matches_fp64_reference(loss_type, reference):
    gen, hidden, weight, bias = _inputs()
    labels = _pair_labels(gen)
    kwargs = dict(loss_type=loss_type, beta=0.7, bias=bias)
    if loss_type == "simpo":
        kwargs.update(gamma=0.3, label_smoothing=0.1)
    if loss_type == "sigmoid":
        kwargs.update(label_smoothing=0.2, nll_weight=0.5)
    if reference == "hidden":
        ref_hidden = torch.randn(2 * B, S, 8, generator=gen, dtype=torch.float64)
        ref_weight = torch.randn(V, 8, generator=gen, dtype=torch.float64)
        kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight)
    elif reference == "logps":
        kwargs.update(
            ref_logps=(
                -5 * torch.rand(B, generator=gen, dtype=torch.float64),
                -5 * torch.rand(B, generator=gen, dtype=torch.float64),
            )
        )
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(**kwargs))
    ref = ref_preference(hidden, weight, labels, **kwargs)
    _close(out.loss, ref["loss"], 1e-9)
    for name in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "nll"):
        got = getattr(out, name)
        assert not got.requires_grad, name
        _close(got, ref[name], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref["loss"], [hidden, weight, bias])):
        _close(g, r, 1e-9)


@pytest.mark.parametrize("loss_type", PREF_TYPES)
def test_preference_average_flag_unequal_lengths_and_uncounted_pair(loss_type):
    """average_log_prob overrides the default; a pair with an empty side counts for nothing."""
    gen, hidden, weight, _ = _inputs(seed=1, bias=False)
    labels = _pair_labels(gen, empty_rejected=True)
    avg = loss_type not in ("ipo", "simpo", "orpo")  # the opposite of the default
    kwargs = dict(loss_type=loss_type, beta=0.3, average_log_prob=avg, nll_weight=0.25)
    out = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(**kwargs))
    ref = ref_preference(hidden, weight, labels, **kwargs)
    assert torch.isfinite(out.loss)
    _close(out.loss, ref["loss"], 1e-9)
    _close(out.chosen_logps, ref["chosen_logps"], 1e-9)
    for g, r in zip(_grads(out.loss, [hidden, weight]), _grads(ref["loss"], [hidden, weight])):
        assert torch.isfinite(g).all()
        _close(g, r, 1e-9)


def test_preference_reference_gets_no_gradient_and_default_reference_is_zero():
    gen, hidden, weight, _ = _inputs(seed=2, bias=False)
    labels = _pair_labels(gen)
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    out = linear_preference_loss(
        hidden, weight, labels, **alignment_calls.preference(ref_hidden=ref_hidden, ref_weight=ref_weight)
    )
    # Reference = policy: rewards 0, d = 0, DPO loss log 2.
    _close(out.chosen_rewards, torch.zeros(B), 1e-12)
    _close(out.loss, torch.tensor(0.6931471805599453, dtype=torch.float64), 1e-12)
    out.loss.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    free = linear_preference_loss(hidden, weight, labels)
    _close(free.chosen_rewards, 0.1 * free.chosen_logps, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_preference_low_precision(dtype, tol, loss_type):
    gen, hidden, weight, bias = _inputs(dtype=dtype, seed=3)
    labels = _pair_labels(gen)
    out = linear_preference_loss(
        hidden, weight, labels, **alignment_calls.preference(loss_type=loss_type, bias=bias, nll_weight=0.1)
    )
    ref = ref_preference(hidden, weight, labels, loss_type=loss_type, bias=bias, nll_weight=0.1)
    assert out.loss.dtype == torch.float32
    _close(out.loss, ref["loss"], tol)
    gs = _grads(out.loss, [hidden, weight, bias])
    rs = _grads(ref["loss"], [hidden, weight, bias])
    for g, r, t in zip(gs, rs, [hidden, weight, bias]):
        assert g.dtype == dtype
        scale = r.abs().max().item()
        assert (g.double() - r).abs().max().item() <= tol * max(scale, 1e-3) * 4


@pytest.mark.parametrize("loss_type", PREF_TYPES)
def test_preference_no_valid_token_is_zero_and_nan_is_not_hidden(loss_type):
    gen, hidden, weight, _ = _inputs(seed=4, bias=False)
    labels = torch.full((2 * B, S), -100)
    out = linear_preference_loss(
        hidden, weight, labels, **alignment_calls.preference(loss_type=loss_type, nll_weight=1.0)
    )
    assert out.loss.item() == 0.0
    gh, gw = _grads(out.loss, [hidden, weight])
    assert (gh == 0).all() and (gw == 0).all()
    labels = _pair_labels(gen)
    bad = hidden.detach().clone()
    row, col = 0, int((labels[0] != -100).nonzero()[0])
    bad[row, col, 0] = float("nan")
    assert not torch.isfinite(
        linear_preference_loss(bad, weight, labels, **alignment_calls.preference(loss_type=loss_type)).loss
    )


def test_preference_global_normalizers():
    """Two halves normalized by the whole batch's counts add up to the whole batch's loss and gradient."""
    gen, hidden, weight, _ = _inputs(seed=5, rows=8, bias=False)
    labels = _pair_labels(gen, b=4)
    full = linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(nll_weight=0.5))
    g_full = _grads(full.loss, [weight])[0]
    n_pairs, n_tok = 4, int((labels[:4] != -100).sum())
    total, g = 0.0, torch.zeros_like(weight)
    for idx in ([0, 1, 4, 5], [2, 3, 6, 7]):
        part = linear_preference_loss(
            hidden[idx],
            weight,
            labels[idx],
            **alignment_calls.preference(nll_weight=0.5, num_pairs=n_pairs, num_chosen_tokens=n_tok),
        )
        total = total + part.loss.detach()
        g += _grads(part.loss, [weight])[0]
    _close(total, full.loss.detach(), 1e-12)
    _close(g, g_full, 1e-12)


def test_preference_bad_arguments():
    gen, hidden, weight, _ = _inputs(seed=6, bias=False)
    labels = _pair_labels(gen)
    with pytest.raises(ValueError, match="loss_type"):
        linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(loss_type="kto"))
    with pytest.raises(ValueError, match="even number of rows"):
        linear_preference_loss(hidden[:5], weight, labels[:5])
    with pytest.raises(ValueError, match="beta"):
        linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(beta=0.0))
    with pytest.raises(ValueError, match="ref_weight"):
        linear_preference_loss(hidden, weight, labels, **alignment_calls.preference(ref_hidden=hidden.detach()))
    with pytest.raises(ValueError, match="ref_logps"):
        linear_preference_loss(hidden, weight, labels, ref_logps=(torch.zeros(B + 1), torch.zeros(B)))
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(loss_type="ipo", label_smoothing=0.1)
        )
    with pytest.raises(ValueError, match="hidden"):
        linear_preference_loss(hidden[:, :4], weight, labels)


# ------------------------------------------------------------------------------------------ policy


def _policy_case(dtype=torch.float64, seed=10, G=4):
    gen, hidden, weight, bias = _inputs(dtype=dtype, seed=seed, rows=G)
    labels = torch.randint(0, V, (G, S), generator=gen)
    for i in range(G):
        labels[i, : i % 3] = -100  # prompt
        labels[i, S - i :] = -100  # unequal completion lengths (row 0 full)
    base = ref_token_logps(hidden.detach(), weight.detach(), labels, bias.detach())
    noise = lambda: 0.4 * torch.randn(G, S, generator=gen, dtype=torch.float64)  # noqa: E731
    old = torch.where(labels != -100, base + noise(), torch.full_like(base, float("-inf")))
    ref = base + noise()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5][:G], dtype=torch.float64)
    return hidden, weight, bias, labels, adv, old, ref


@pytest.mark.parametrize("loss_type", POLICY_TYPES)
@pytest.mark.parametrize(
    "beta,temperature,eps_high,with_old", [(0.0, 1.0, None, True), (0.05, 0.7, 0.28, True), (0.05, 1.0, None, False)]
)
def test_policy_matches_fp64_reference(loss_type, beta, temperature, eps_high, with_old):
    hidden, weight, bias, labels, adv, old, ref_lp = _policy_case()
    kwargs = dict(
        loss_type=loss_type,
        beta=beta,
        temperature=temperature,
        epsilon_high=eps_high,
        bias=bias,
        old_logps=old if with_old else None,
        ref_logps=ref_lp if beta else None,
    )
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 12
    if loss_type == "dapo":
        kwargs["num_items_in_batch"] = 50
    out = linear_policy_loss(hidden, weight, labels, adv, **alignment_calls.policy(**kwargs))
    ref_loss, ref_metrics = ref_policy(hidden, weight, labels, adv, **kwargs)
    _close(out.loss, ref_loss, 1e-9)
    assert set(out.metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        _close(out.metrics[k], v, 1e-9)
    if with_old:
        assert out.metrics["clip_ratio/low"] > 0 and out.metrics["clip_ratio/high"] > 0
    for g, r in zip(_grads(out.loss, [hidden, weight, bias]), _grads(ref_loss, [hidden, weight, bias])):
        _close(g, r, 1e-9)


@pytest.mark.parametrize("loss_type", POLICY_TYPES)
def test_policy_no_valid_token_and_low_precision(loss_type):
    hidden, weight, bias, labels, adv, old, ref_lp = _policy_case(seed=11)
    none = torch.full_like(labels, -100)
    out = linear_policy_loss(
        hidden,
        weight,
        none,
        adv,
        **alignment_calls.policy(loss_type=loss_type, beta=0.1, ref_logps=ref_lp, old_logps=old),
    )
    assert out.loss.item() == 0.0 and all(torch.isfinite(v) for v in out.metrics.values())
    assert all((g == 0).all() for g in _grads(out.loss, [hidden, weight]))
    h32, w32 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    out = linear_policy_loss(
        h32, w32, labels, adv, **alignment_calls.policy(loss_type=loss_type, old_logps=old.float())
    )
    ref_loss, _ = ref_policy(h32, w32, labels, adv, loss_type=loss_type, old_logps=old)
    _close(out.loss, ref_loss, 3e-2)
    gh = _grads(out.loss, [h32])[0]
    assert gh.dtype == torch.bfloat16 and torch.isfinite(gh).all()


def test_policy_bad_arguments():
    hidden, weight, bias, labels, adv, old, ref_lp = _policy_case(seed=12)
    with pytest.raises(ValueError, match="loss_type"):
        linear_policy_loss(hidden, weight, labels, adv, **alignment_calls.policy(loss_type="ppo"))
    with pytest.raises(ValueError, match="ref_logps"):
        linear_policy_loss(hidden, weight, labels, adv, **alignment_calls.policy(beta=0.1))
    with pytest.raises(ValueError, match="advantages"):
        linear_policy_loss(hidden, weight, labels, adv[:2])
    with pytest.raises(ValueError, match="old_logps"):
        linear_policy_loss(hidden, weight, labels, adv, old_logps=old[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        linear_policy_loss(hidden, weight, labels, adv, **alignment_calls.policy(temperature=0))


# --------------------------------------------------------------------------- torchtune's DPO losses


@pytest.mark.parametrize(
    "cls,kwargs",
    [("DPOLoss", {}), ("DPOLoss", dict(beta=0.3, label_smoothing=0.15)), ("RSOLoss", {}), ("RSOLoss", dict(gamma=0.7))],
)
def test_dpo_and_rso_match_torchtune(cls, kwargs):
    from torchtune.rlhf import loss as tt_loss

    gen = torch.Generator().manual_seed(20)
    inputs = [-20 * torch.rand(6, generator=gen) for _ in range(4)]
    ours_in = [t.clone().requires_grad_() for t in inputs]
    theirs_in = [t.clone().requires_grad_() for t in inputs]
    ours = getattr(tune_losses, cls)(**kwargs)(*ours_in)
    theirs = getattr(tt_loss, cls)(**kwargs)(*theirs_in)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.requires_grad == b.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours[0].sum().backward()
    theirs[0].sum().backward()
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_dpo_loss_signature_and_errors():
    assert DPOLoss().beta == 0.1 and DPOLoss().label_smoothing == 0.0 and RSOLoss().gamma == 0.1
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        DPOLoss()(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3))
