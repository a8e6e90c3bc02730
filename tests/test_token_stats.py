"""The logging statistics (entropy, top-1 hits) run on the engine as a values-only term; checked
against full fp64 logits, with ignored tokens, softcap and chunks that split the tokens."""

from __future__ import annotations

import pytest
import torch
from reference import make_labels

from tune_losses.integrations.token_stats import token_stats


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_token_stats_match_full_logits(softcap, ignore):
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(3, 7, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    labels = make_labels((3, 7), 40, ignore, torch.Generator().manual_seed(1))
    z = (h.double() @ w.double().T + b.double()).reshape(-1, 40)
    y = labels.reshape(-1)
    valid = y != -100
    # A label the model predicts (so that top-1 hits are not all 0).
    if valid.any():
        y = y.clone()
        y[valid.nonzero()[0]] = z[valid.nonzero()[0]].argmax(-1)
        labels = y.view(3, 7)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    got = token_stats(h, w, labels, bias=b, softcap=softcap, chunk_size=4)
    torch.testing.assert_close(got.entropy.double(), entropy[valid].sum(), rtol=1e-5, atol=1e-5)
    assert got.correct.dtype == torch.int64 and got.entropy.dtype == torch.float32
    assert int(got.correct) == int((z.argmax(-1) == y)[valid].sum())
    assert int(got.count) == int(valid.sum())
