"""Batches of varying length keep the compiled chunk math: a handful of shapes per loss, each
compiled once, never the eager fallback that torch's recompile limit would force."""

import pytest
import torch

import tune_losses as tl
from tune_losses.fused import compiled

pytestmark = pytest.mark.slow


def test_varying_lengths_grad_and_no_grad_stay_compiled(monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    if compiled._BROKEN:
        pytest.skip(f"compilation already off in this process: {compiled._BROKEN[0]}")
    torch.manual_seed(0)
    w = torch.randn(1000, 16, requires_grad=True)
    for n in (10, 20, 40, 80, 160, 320, 640, 1280, 2560, 33, 77, 130):
        x = torch.randn(n, 16, requires_grad=True)
        y = torch.randint(0, 1000, (n,))
        tl.linear_cross_entropy(x, w, y).backward()
        with torch.no_grad():
            tl.linear_cross_entropy(x, w, y)
        tl.linear_log_probs(x, w, y).sum().backward()
    assert compiled._BROKEN == []
