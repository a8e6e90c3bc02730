"""Per-token side inputs reach the terms chunk by chunk (``Chunk.inputs``), on the eager and the
compiled chunk math, with padded last chunks; the result is checked against fp64 full logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from reference import make_labels

from tune_losses.divergences import ChunkRun, ce_chunk
from tune_losses.fused import compiled
from tune_losses.fused.engine import LossPlan, run_terms
from tune_losses.options import CEOptions
from tune_losses.terms import Term


@dataclass(frozen=True)
class TokenScaledCE(Term):
    """Cross-entropy times a per-token factor read from ``chunk.inputs["factor"]`` ``[n]``."""

    name: str = "scaled_ce"

    def compute(self, chunk, weights, consume_student, consume_teacher):
        factor = chunk.inputs["factor"].to(chunk.student.dtype)
        w = None if weights is None else weights[0] * factor
        loss, g = ce_chunk(
            chunk.student, chunk.labels, chunk.valid, CEOptions(), ChunkRun(chunk.reducer, w, consume_student)
        )
        return (loss * factor,), g


@pytest.mark.parametrize("compile_mode", ["0", "1"])
@pytest.mark.parametrize("per_token", [False, True])
def test_token_inputs_sliced_per_chunk(monkeypatch, compile_mode, per_token):
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", compile_mode)
    monkeypatch.setattr(compiled, "_BROKEN", [])
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 37, 8, 50
    x = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hdim, generator=g, dtype=torch.float64) / hdim**0.5
    labels = make_labels((n,), vocab, "some", torch.Generator().manual_seed(1))
    factor = torch.rand(n, generator=g, dtype=torch.float64) + 0.5

    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    plan = LossPlan(terms=(TokenScaledCE(),), chunk_size=16)
    loss, _ = run_terms(
        xf, wf, None, labels, None, None, None, plan, per_token=per_token, recompute=False, inputs={"factor": factor}
    )
    (loss.sum() if per_token else loss).backward()

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(xr @ wr.T, labels.clamp(min=0), reduction="none")
    ref = torch.where(valid, ce * factor, 0.0)
    (ref if per_token else ref.sum()).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach() if per_token else ref.sum().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wf.grad.double(), wr.grad, rtol=1e-4, atol=1e-5)
