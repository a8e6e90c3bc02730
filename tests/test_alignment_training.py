"""DPO training pieces: fused and torchtune full-logits paths agree; pair counting; metrics."""

from __future__ import annotations

import copy

import pytest
import torch
from test_alignment_modules import TinyLM, V

from tune_losses import DPOLoss, LinearPreferenceLoss
from tune_losses.training.dpo import (
    PreferenceForward,
    count_pairs_and_tokens,
    metric_sums,
    scaled_loss,
)


def _shift(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def _batch(b=3, s=8, seed=0):
    """Collate-style (unshifted) labels: prompt ignored, padded answers."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2 * b, s), generator=gen)
    raw = tokens.clone()
    raw[:, :3] = -100
    raw[1, 6:] = -100
    raw[b + 2, 5:] = -100
    return tokens, raw


@pytest.mark.parametrize("torchtune_loss", [True, False])
def test_fused_path_equals_torchtune_full_logits_path(torchtune_loss):
    from torchtune.rlhf.loss import DPOLoss as TorchtuneDPOLoss

    policy, reference = TinyLM(0), TinyLM(1)
    tokens, raw = _batch()
    labels = _shift(raw)
    seq_loss = TorchtuneDPOLoss(beta=0.2, label_smoothing=0.1) if torchtune_loss else DPOLoss(0.2, 0.1)
    p_full, r_full = copy.deepcopy(policy), copy.deepcopy(reference)
    full = PreferenceForward(seq_loss, p_full, r_full, -100).terms(tokens, labels)
    fused = PreferenceForward(LinearPreferenceLoss(beta=0.2, label_smoothing=0.1), policy, reference, -100).terms(
        tokens, labels
    )
    assert not full.pair_loss_sum.isnan()
    for name in ("pair_loss_sum", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(fused, name), getattr(full, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.num_pairs, full.num_pairs) and torch.equal(fused.counted, full.counted)
    counts = count_pairs_and_tokens([labels], -100)
    scaled_loss(full, counts, 1).backward()
    scaled_loss(fused, counts, 1).backward()
    for a, b in zip(policy.parameters(), p_full.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in reference.parameters())


def test_counts_metrics_and_reference_free():
    tokens, raw = _batch()
    labels = _shift(raw)
    labels[2] = -100  # pair 2 has no chosen token: it does not count
    counts = count_pairs_and_tokens([labels, labels[[0, 1, 3, 4]]], -100)
    assert counts.tolist() == [2 + 2, 2 * int((labels[:3] != -100).sum())]
    policy = TinyLM(0)
    simpo = LinearPreferenceLoss(loss_type="simpo", beta=2.0, gamma=0.5)
    terms = PreferenceForward(simpo, policy, None, -100).terms(tokens, labels)
    sums = metric_sums(terms)
    assert int(terms.num_pairs) == 2 and set(sums) >= {"rewards/accuracies", "rewards/margins", "log_probs/chosen"}
    m = terms.counted
    torch.testing.assert_close(sums["rewards/margins"], (terms.chosen_rewards - terms.rejected_rewards)[m].sum())
    with pytest.raises(ValueError, match="reference"):
        PreferenceForward(LinearPreferenceLoss(), TinyLM(0), None, -100)


def test_dpo_configs_build_on_the_meta_device():
    """The tiny and the Llama 3.2 1B DPO configs exist; the 1B policy builds on the meta device with
    the fused loss (every component of every config is also checked by test_configs.py)."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from torchtune import config

    root = Path(__file__).resolve().parents[1]
    for name in ("tiny/dpo.yaml", "llama3_2/1B_dpo.yaml"):
        cfg = OmegaConf.load(root / "configs" / name)
        loss = config.instantiate(cfg.loss)
        assert isinstance(loss, LinearPreferenceLoss) and loss.needs_reference
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    loss.set_model_output(model)
    assert loss.projection.weight.shape == (128256, 2048)
