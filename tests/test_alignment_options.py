"""The alignment losses' options objects: old flat keywords still work (same loss, same gradients, a
DeprecationWarning naming the new form), each options object is checked once, when made, and no
public signature grows past 13 parameters."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import tune_losses as tl
from tune_losses.alignment import linear_preference_terms, policy_loss_from_log_probs, preference_terms
from tune_losses.deprecation import PREFIX, TuneLossesDeprecationWarning

G, B, S, H, V = 4, 2, 6, 8, 13


def _tensors(seed, rows):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, V, (rows, S), generator=g)
    labels[:, :2] = -100
    labels[-1, 4:] = -100
    ref = (
        torch.randn(rows, S, H, generator=g, dtype=torch.float64),
        torch.randn(V, H, generator=g, dtype=torch.float64),
    )
    return hidden, weight, bias, labels, ref


def _policy(old: bool):
    hidden, weight, bias, labels, _ = _tensors(0, G)
    adv = torch.linspace(-1, 1, G, dtype=torch.float64)
    ref_logps = -torch.rand(G, S, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flat = dict(loss_type="dapo", beta=0.05, epsilon_high=0.3, temperature=0.9, return_entropy=False, validate=False)
    if old:
        out = tl.linear_policy_loss(
            hidden, weight, labels, adv, bias=bias, ref_logps=ref_logps, algorithm="recompute", **flat
        )
    else:
        out = tl.linear_policy_loss(
            hidden, weight, labels, adv, bias=bias, ref_logps=ref_logps,
            options=tl.PolicyOptions(**flat), execution=tl.ExecutionOptions(algorithm="recompute"),
        )  # fmt: skip
    return out.loss, (hidden, weight, bias)


def _policy_from_log_probs(old: bool):
    hidden, weight, _, labels, _ = _tensors(2, G)
    logps = tl.linear_log_probs(hidden, weight, labels)
    adv = torch.linspace(-1, 1, G, dtype=torch.float64)
    flat = dict(loss_type="dr_grpo", max_completion_length=2 * S, epsilon_low=0.1)
    if old:
        out = policy_loss_from_log_probs(logps, labels, adv, **flat)
    else:
        out = policy_loss_from_log_probs(logps, labels, adv, options=tl.PolicyOptions(**flat))
    return out.loss, (hidden, weight)


def _preference(old: bool):
    hidden, weight, bias, labels, (rh, rw) = _tensors(3, 2 * B)
    flat = dict(loss_type="ipo", beta=0.3, nll_weight=0.2)
    if old:
        out = tl.linear_preference_loss(
            hidden, weight, labels, bias=bias, ref_hidden=rh, ref_weight=rw, algorithm="grad_in_forward", **flat
        )
    else:
        out = tl.linear_preference_loss(
            hidden, weight, labels, bias=bias, reference=tl.Reference(rh, rw),
            options=tl.PreferenceOptions(**flat), execution=tl.ExecutionOptions(algorithm="grad_in_forward"),
        )  # fmt: skip
    return out.loss, (hidden, weight, bias)


def _preference_terms(old: bool):
    hidden, weight, _, labels, (rh, rw) = _tensors(4, 2 * B)
    if old:
        terms = linear_preference_terms(hidden, weight, labels, ref_hidden=rh, ref_weight=rw, loss_type="hinge")
    else:
        reference, options = tl.Reference(rh, rw), tl.PreferenceOptions(loss_type="hinge")
        terms = linear_preference_terms(hidden, weight, labels, reference=reference, options=options)
    return terms.loss(), (hidden, weight)


def _preference_from_log_probs(old: bool):
    hidden, weight, _, labels, _ = _tensors(5, 2 * B)
    logps = tl.linear_log_probs(hidden, weight, labels)
    if old:
        terms = preference_terms(logps, labels, loss_type="simpo", gamma=0.5, beta=2.0)
    else:
        terms = preference_terms(logps, labels, options=tl.PreferenceOptions(loss_type="simpo", gamma=0.5, beta=2.0))
    return terms.loss(), (hidden, weight)


def _kto(old: bool):
    hidden, weight, bias, labels, (rh, rw) = _tensors(6, G)
    kto_labels = torch.tensor([True, False, True, False])
    kl_hidden, kl_labels = hidden.detach().flip(0), labels.roll(1, 0)
    if old:
        out = tl.linear_kto_loss(
            hidden, weight, labels, kto_labels, bias=bias, ref_hidden=rh, ref_weight=rw,
            kl_hidden=kl_hidden, kl_labels=kl_labels, kl_ref_hidden=rh.flip(0), beta=0.2, desirable_weight=1.5,
        )  # fmt: skip
    else:
        out = tl.linear_kto_loss(
            hidden, weight, labels, kto_labels, bias=bias, reference=tl.Reference(rh, rw),
            kl=tl.KLEstimate(kl_hidden, kl_labels, ref_hidden=rh.flip(0)),
            options=tl.KTOOptions(beta=0.2, desirable_weight=1.5),
        )  # fmt: skip
    assert out.kl > 0  # the estimate ran
    return out.loss, (hidden, weight, bias)


CASES = {
    "linear_policy_loss": _policy,
    "policy_loss_from_log_probs": _policy_from_log_probs,
    "linear_preference_loss": _preference,
    "linear_preference_terms": _preference_terms,
    "preference_terms": _preference_from_log_probs,
    "linear_kto_loss": _kto,
}


@pytest.mark.parametrize("name", list(CASES))
def test_old_flat_keywords_warn_and_give_the_same_loss_and_gradients(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new form warns nothing
        new, new_inputs = CASES[name](old=False)
        new_grads = torch.autograd.grad(new, new_inputs)
    with pytest.warns(TuneLossesDeprecationWarning, match=rf"^{PREFIX}{name}\(.*\.\.\.\): pass .*=") as record:
        old, old_inputs = CASES[name](old=True)
    assert all(w.filename == __file__ for w in record if issubclass(w.category, DeprecationWarning))
    old_grads = torch.autograd.grad(old, old_inputs)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    for a, b in zip(old_grads, new_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_options_checked_when_made_and_not_given_twice():
    for build, name in [
        (lambda: tl.PolicyOptions(beta=-1.0), "beta"),
        (lambda: tl.PolicyOptions(temperature=0.0), "temperature"),
        (lambda: tl.PolicyOptions(return_entropy=1), "return_entropy"),
        (lambda: tl.PreferenceOptions(loss_type="kto"), "loss_type"),
        (lambda: tl.PreferenceOptions(average_log_prob=1), "average_log_prob"),
        (lambda: tl.KTOOptions(desirable_weight=float("nan")), "desirable_weight"),
    ]:
        with pytest.raises((ValueError, TypeError), match=rf"^{name}: expected"):
            build()
    assert tl.PolicyOptions(epsilon_low=0.3).epsilon_high == 0.3  # TRL's default: high = low
    hidden, weight, _, labels, (rh, rw) = _tensors(7, 2 * B)
    with pytest.raises(TypeError, match="beta= and options= both given"):
        tl.linear_preference_loss(hidden, weight, labels, beta=0.2, options=tl.PreferenceOptions())
    with pytest.raises(TypeError, match="reference= both given"):
        tl.linear_preference_loss(hidden, weight, labels, reference=tl.Reference(rh, rw), ref_hidden=rh, ref_weight=rw)
    with pytest.raises(TypeError, match="reference: expected a Reference"):
        tl.linear_preference_loss(hidden, weight, labels, reference=(rh, rw))
    with pytest.raises(TypeError, match="options: expected a PolicyOptions"):
        tl.linear_policy_loss(hidden, weight, labels, torch.zeros(2 * B), options=tl.PreferenceOptions())
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['betta'\\]"):
        tl.linear_kto_loss(hidden, weight, labels, torch.ones(2 * B, dtype=torch.bool), betta=0.1)


@pytest.mark.parametrize(
    "fn",
    [
        tl.linear_policy_loss,
        policy_loss_from_log_probs,
        tl.linear_preference_loss,
        linear_preference_terms,
        preference_terms,
        tl.linear_kto_loss,
    ],
)
def test_signatures_stay_small(fn):
    named = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert len(named) <= 13, [p.name for p in named]


def test_modules_build_their_options_once_and_warn_nothing():
    hidden, weight, _, labels, (rh, rw) = _tensors(8, 2 * B)
    pref = tl.LinearPreferenceLoss(loss_type="sigmoid", beta=0.2, nll_weight=0.1)
    policy = tl.LinearPolicyLoss(loss_type="grpo", temperature=0.7, delta=3.0, algorithm="recompute")
    assert isinstance(pref.options, tl.PreferenceOptions) and pref.options.beta == 0.2
    assert isinstance(policy.options, tl.PolicyOptions) and policy.options.delta == 3.0
    head, ref_head = torch.nn.Linear(H, V, bias=False).double(), torch.nn.Linear(H, V, bias=False).double()
    head.weight.data.copy_(weight.detach())
    ref_head.weight.data.copy_(rw)
    pref.projection = policy.projection = tl.OutputProjection(head)
    pref.reference_projection = policy.reference_projection = tl.OutputProjection(ref_head)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        pref(hidden, labels, ref_hidden=rh).loss.backward()
        policy(hidden, labels, torch.linspace(-1, 1, 2 * B, dtype=torch.float64), ref_hidden=rh).loss.backward()
    with pytest.raises(TypeError, match="unexpected option"):
        tl.LinearPolicyLoss(bogus=1)


@pytest.mark.parametrize("algorithm", ["auto", "recompute"])
def test_execution_options_change_the_work_not_the_result(algorithm):
    """``drop_ignored_tokens`` and ``dw_accumulation`` reach both paths: same loss and gradients."""
    hidden, weight, bias, labels, (rh, rw) = _tensors(9, 2 * B)
    adv = torch.linspace(-1, 1, 2 * B, dtype=torch.float64)
    inputs = (hidden, weight, bias)
    results = []
    for ex in (
        tl.ExecutionOptions(algorithm=algorithm),
        tl.ExecutionOptions(algorithm=algorithm, drop_ignored_tokens=True, dw_accumulation="fp32"),
    ):
        policy = tl.linear_policy_loss(hidden, weight, labels, adv, bias=bias, execution=ex).loss
        pref = tl.linear_preference_loss(
            hidden, weight, labels, bias=bias, reference=tl.Reference(rh, rw), execution=ex
        )
        kto = tl.linear_kto_loss(hidden, weight, labels, adv > 0, bias=bias, execution=ex).loss
        results.append([(loss, torch.autograd.grad(loss, inputs)) for loss in (policy, pref.loss, kto)])
    for (a, ga), (b, gb) in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="algorithm"):
        tl.linear_kto_loss(hidden, weight, labels, adv > 0, execution=tl.ExecutionOptions(algorithm="grad_in_forward"))
