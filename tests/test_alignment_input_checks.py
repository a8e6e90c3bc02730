"""Alignment losses reject meaningless options when called or built, naming the argument."""

import alignment_calls
import pytest
import torch

import tune_losses as tl

H, V = 8, 11


def _inputs(*extra_shapes):
    """hidden [4, 3, H], weight [V, H], labels [4, 3] and a randn tensor per shape in ``extra_shapes``."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(4, 3, H, generator=g), torch.randn(V, H, generator=g), torch.randint(0, V, (4, 3), generator=g))
    return base + tuple(torch.randn(shape, generator=g) for shape in extra_shapes)


def _pref(**kw):
    return tl.linear_preference_loss(*_inputs(), **alignment_calls.preference(**kw))


def _policy(**kw):
    return tl.linear_policy_loss(*_inputs((4,)), **alignment_calls.policy(**kw))


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(beta=float("nan")), "beta"),
        (dict(beta=0), "beta"),
        (dict(gamma=float("inf")), "gamma"),
        (dict(nll_weight=True), "nll_weight"),
        (dict(nll_weight=float("nan")), "nll_weight"),
        (dict(label_smoothing=0.7), "label_smoothing"),
        (dict(loss_type="kto"), "loss_type"),
    ],
)
def test_preference_options(kw, name):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: expected"):
        _pref(**kw)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(beta=float("nan")), "beta"),
        (dict(beta=True), "beta"),
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(epsilon_high=float("nan")), "epsilon_high"),
        (dict(max_completion_length=True), "max_completion_length"),
        (dict(loss_type="dapo", num_items_in_batch=0), "num_items_in_batch"),
        (dict(loss_type="dapo", num_items_in_batch=0.5), "num_items_in_batch"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_policy_options(kw, name):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: expected"):
        _policy(**kw)


def test_pair_counts_and_torchtune_compat_constructors():
    with pytest.raises(ValueError, match="^num_pairs: expected"):
        _pref(num_pairs=0)
    for build, name in [
        (lambda: tl.DPOLoss(beta=-1), "beta"),
        (lambda: tl.DPOLoss(label_smoothing=2), "label_smoothing"),
        (lambda: tl.DPOLoss(beta="a"), "beta"),
        (lambda: tl.RSOLoss(gamma=-1), "gamma"),
    ]:
        with pytest.raises((ValueError, TypeError), match=rf"^{name}: expected"):
            build()
