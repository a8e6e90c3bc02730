"""The compiled per-chunk math (TorchInductor) gives the eager math's values and gradients, compiles
once for every batch size (the last chunk is padded), and steps aside under a user's torch.compile."""

from __future__ import annotations

import pytest
import torch
from reference import make_labels

from tune_losses import linear_cross_entropy, linear_distillation_loss
from tune_losses.fused import compiled
from tune_losses.options import CEOptions, DistillationOptions, KDOptions


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _run(n, divergence, seed=0, hdim=16, vocab=300, temperature=2.0):
    g = gen(seed)
    h, th = torch.randn(n, hdim, generator=g), torch.randn(n, hdim, generator=g)
    w, tw = torch.randn(vocab, hdim, generator=g) / 4, torch.randn(vocab, hdim, generator=g) / 4
    b = torch.randn(vocab, generator=g)
    labels = make_labels((n,), vocab, "some", gen(seed + 1))
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    options = DistillationOptions(kd=KDOptions(divergence, temperature), ce=CEOptions(label_smoothing=0.1))
    out = linear_distillation_loss(hh, ww, th, tw, labels, student_bias=bb, chunk_size=32, options=options)
    out.loss.backward()
    return [out.loss.detach(), out.ce, out.kd, hh.grad, ww.grad, bb.grad]


@pytest.mark.slow
@pytest.mark.parametrize("divergence,temperature", [("jsd", 2.0), ("forward_kl", 1.0), ("forward_kl", 2.0)])
def test_compiled_equals_eager_and_compiles_once_per_term_set(monkeypatch, divergence, temperature):
    monkeypatch.setattr(compiled, "_CACHE", {})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # earlier tests' compilations count in the same process
    frames = torch._dynamo.utils.counters["stats"]
    for n in (70, 45, 96):  # full chunks plus partial ones of 6, 13 and 0 tokens
        monkeypatch.setenv("TUNE_LOSSES_COMPILE", "0")
        eager = _run(n, divergence, temperature=temperature)
        monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
        got = _run(n, divergence, temperature=temperature)
        assert not compiled._BROKEN, compiled._BROKEN
        for a, e in zip(got, eager):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    # one graph for the grad-in-forward chunk math of these terms, whatever N
    assert frames["unique_graphs"] == 1, dict(frames)


@pytest.mark.slow
def test_user_compile_of_model_and_loss_with_compiled_math_on(monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 8)
    head = torch.nn.Linear(8, 50)
    x = torch.randn(2, 9, 8, generator=gen(3))
    labels = make_labels((2, 9), 50, "some", gen(4))

    def step(inp):
        return linear_cross_entropy(
            torch.tanh(lin(inp)), head.weight, labels, bias=head.bias, chunk_size=5, options=CEOptions(validate=False)
        )

    eager = step(x)
    eager.backward()
    expected = [p.grad.clone() for p in (*lin.parameters(), *head.parameters())]
    for p in (*lin.parameters(), *head.parameters()):
        p.grad = None
    loss = torch.compile(step, backend="aot_eager")(x)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for p, e in zip((*lin.parameters(), *head.parameters()), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_under_a_user_dispatch_mode_the_eager_math_runs(monkeypatch):
    """A memory tracker or operator profiler (a TorchDispatchMode) around the loss: Dynamo compiles
    nothing under it, so the chunk math must run eagerly there, with the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.calls += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(compiled, "_CACHE", {})
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    plain = _run(40, "forward_kl")
    with CountOps():
        tracked = _run(40, "forward_kl")
    assert CountOps.calls > 0 and not compiled._BROKEN
    for a, e in zip(tracked, plain):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
