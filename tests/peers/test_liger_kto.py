"""Liger-Kernel's KTO test file, adapted to call our ``linear_kto_loss``.

Adapted from Liger-Kernel (BSD-2-Clause) ``test/chunked_loss/test_kto_loss.py``: both tests, every case
(48), their inputs (``preference_labels`` [B] bool, a given ``kl``), their torch reference (rewritten in
tests/peers/liger_preference_reference.py) and tolerances. Compared as Liger compares: the loss, and in
fp32 the per-sample means of the chosen / rejected log-probs and rewards (Liger's logit sums are not
ours to return), and the gradients. The functional test compares ours with the reference under the
functional's defaults (summed log-probs, beta 0.1, no ignored token). Tolerance fallback and the
fast / slow / ``TUNE_LOSSES_PEER_FULL`` split: tests/peers/liger_harness.py.
"""

from __future__ import annotations

import pytest
import torch
from liger_harness import _close, correctness_cases, functional_cases
from liger_preference_reference import kto_loss

from tune_losses import KTOOptions, Reference, linear_kto_loss


def _run(c, ignore_index, beta, average, ignore):
    torch.manual_seed(0)
    B, T, H, V = c["shape"]
    scalar, dtype, atol, rtol = c["dtype"]
    prefs = torch.randint(2, (B,), dtype=torch.bool)
    kl = torch.randn(1, dtype=dtype)
    w, rw = torch.randn(V, H, dtype=dtype), torch.randn(V, H, dtype=dtype)
    b = torch.randn(V, dtype=dtype) if c["bias"] else None
    rb = torch.randn(V, dtype=dtype) if c["ref_bias"] else None
    x, rx = torch.randn(B, T, H, dtype=dtype) * scalar, torch.randn(B, T, H, dtype=dtype) * scalar
    target = torch.randint(0, V, (B, T))
    if ignore:
        n = torch.randint(1, B * T // 2, (1,)).item()
        target.view(-1)[torch.randperm(B * T)[:n]] = ignore_index

    def leaves(d=None):
        return [None if t is None else t.detach().clone().to(d or t.dtype).requires_grad_() for t in (x, w, b)]

    def theirs(d=None):
        lx, lw, lb = leaves(d)
        cast = (lambda t: t) if d is None else (lambda t: None if t is None else t.to(d))
        loss, aux = kto_loss(
            lx, lw, target, prefs, lb, cast(rx), cast(rw), cast(rb), cast(kl),
            beta=beta, ignore_index=ignore_index, average_log_prob=average,
        )  # fmt: skip
        grads = torch.autograd.grad(loss, [t for t in (lx, lw, lb) if t is not None])
        return (loss.detach(),) + tuple(a.detach() for a in aux) + grads

    ox, ow, ob = leaves()
    out = linear_kto_loss(
        ox, ow, target, prefs, bias=ob, reference=None if rx is None else Reference(rx, rw, rb), kl=kl,
        ignore_index=ignore_index, options=KTOOptions(beta=beta, average_log_prob=average),
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, [t for t in (ox, ow, ob) if t is not None])
    ref = theirs()
    exact = {}

    def truth(i):
        def get():
            if not exact:
                exact["v"] = theirs(torch.float64)
            return exact["v"][i]

        return get

    _close(out.loss, ref[0], atol, rtol, "loss", truth(0))
    if dtype == torch.float32:
        n_c, n_r = prefs.sum() + 1e-20, (~prefs).sum() + 1e-20
        ours_aux = (
            out.logps[prefs].sum() / n_c,
            out.logps[~prefs].sum() / n_r,
            out.rewards[prefs].sum() / n_c,
            out.rewards[~prefs].sum() / n_r,
        )
        for i, (name, n) in enumerate(
            (("chosen_logps", n_c), ("rejected_logps", n_r), ("chosen_rewards", n_c), ("rejected_rewards", n_r))
        ):
            _close(ours_aux[i], ref[1 + i] / n, atol, rtol, name, lambda i=i, n=n: truth(1 + i)() / n)
    for k, (g, name) in enumerate(zip(grads, ("input grad", "weight grad", "bias grad"))):
        _close(g, ref[5 + k], atol, rtol, name, truth(5 + k))


@pytest.mark.parametrize(
    "c", correctness_cases(lambda c: not c["ref_bias"], ref_bias=[True, False], ii_beta=[(-100, 0.1), (42, 0.2)])
)
def test_correctness(c):
    _run(c, *c["ii_beta"], average=True, ignore=True)


@pytest.mark.parametrize("c", functional_cases(lambda c: not c["ref_bias"], ref_bias=[True, False]))
def test_correctness_functional(c):
    _run(c, -100, 0.1, average=False, ignore=False)
