"""A non-finite value at a token the loss leaves out (a padding position, whose hidden state some
attention implementations make NaN) changes nothing: finite loss, finite gradients, equal to the
same batch with that position finite. At a counted token it still makes the loss non-finite."""

from __future__ import annotations

import pytest
import torch

import tune_losses as tl
from tune_losses.options import ExecutionOptions, KDOptions

V, H = 11, 6


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, H, generator=g)
    w = torch.randn(V, H, generator=g)
    tx = torch.randn(2, 5, H, generator=g)
    tw = torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, :2] = -100
    return x, w, tx, tw, y


def _grads(fn, x, w):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


CASES = {
    "ce": lambda x, w, tx, tw, y: tl.linear_cross_entropy(x, w, y),
    "kd_forward_kl": lambda x, w, tx, tw, y: tl.linear_kd_loss(x, w, tx, tw, y),
    "kd_jsd": lambda x, w, tx, tw, y: tl.linear_kd_loss(x, w, tx, tw, y, options=KDOptions(divergence="jsd")),
    "distillation": lambda x, w, tx, tw, y: tl.linear_distillation_loss(x, w, tx, tw, y).loss,
    "ce_recompute": lambda x, w, tx, tw, y: tl.linear_cross_entropy(
        x, w, y, execution=ExecutionOptions(algorithm="recompute")
    ),
}


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_non_finite_at_an_ignored_token_changes_nothing(case, side, bad):
    x, w, tx, tw, y = _batch()
    fn = CASES[case]
    clean = _grads(lambda a, b: fn(a, b, tx, tw, y), x, w)
    if side == "student":
        x = x.clone()
        x[0, 1] = bad
    else:
        tx = tx.clone()
        tx[0, 0] = bad
    dirty = _grads(lambda a, b: fn(a, b, tx, tw, y), x, w)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)
    assert not dirty[1][0, :2].any()  # ignored rows: zero hidden-state gradient


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_non_finite_at_a_counted_token_is_non_finite(case):
    x, w, tx, tw, y = _batch()
    x[1, 3] = float("nan")
    tx[1, 2] = float("nan")
    assert not torch.isfinite(CASES[case](x, w, tx, tw, y))


@pytest.mark.parametrize(
    "cls",
    [
        tl.CEWithChunkedOutputLoss,
        tl.ForwardKLWithChunkedOutputLoss,
        tl.ReverseKLWithChunkedOutputLoss,
        tl.JSDWithChunkedOutputLoss,
    ],
)
def test_chunked_non_finite_at_an_ignored_token_changes_nothing(cls):
    x, w, tx, tw, y = _batch(1)
    z, zt = x @ w.T, tx @ tw.T
    dirty_t = zt.clone()
    dirty_t[0, 0] = float("nan")
    dirty_s = z.clone()
    dirty_s[0, 1] = float("inf")
    loss_fn = cls(num_output_chunks=2)
    results = []
    for s, t in ((z, zt), (dirty_s, dirty_t)):
        s = s.clone().requires_grad_(True)
        chunks = list(torch.tensor_split(s, 2, dim=1))
        loss = (
            loss_fn(chunks, y)
            if cls is tl.CEWithChunkedOutputLoss
            else loss_fn(chunks, list(torch.tensor_split(t, 2, dim=1)), y)
        )
        loss.backward()
        results.append((loss.detach(), s.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
