"""The alignment modules: model and reference hooks, and equality with the functional losses."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from alignment_reference import ref_preference, ref_token_logps
from torch import nn

from tune_losses import LinearPolicyLoss, LinearPreferenceLoss, linear_policy_loss, linear_preference_loss

V, H = 29, 12


class TinyLM(nn.Module):
    """Embedding + one layer + an ``lm_head`` (with bias): a stand-in for any LM."""

    def __init__(self, seed: int, hidden: int = H):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, V)

    def forward(self, tokens):
        return self.lm_head(torch.tanh(self.body(self.embed(tokens))))


def _batch(b=2, s=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2 * b, s), generator=gen)
    labels = torch.cat([tokens[:, 1:], torch.full((2 * b, 1), -100)], dim=1)
    labels[:, :2] = -100  # prompt
    labels[b + 1, 4:] = -100  # a shorter rejected answer
    return tokens, labels


def test_preference_module_hooks_match_functional_and_full_logits():
    policy, reference = TinyLM(0), TinyLM(1, hidden=8)
    tokens, labels = _batch()
    with torch.no_grad():
        policy_logits = policy(tokens)
    loss_fn = LinearPreferenceLoss(beta=0.2, nll_weight=0.1)
    assert loss_fn.needs_reference and not LinearPreferenceLoss(loss_type="simpo").needs_reference
    loss_fn.set_model_output(policy)
    loss_fn.set_reference_output(reference)
    hidden = policy(tokens)
    assert hidden.shape == (4, 7, H)
    with torch.no_grad():
        ref_hidden = reference(tokens)
    out = loss_fn(hidden, labels, ref_hidden=ref_hidden)
    kw = dict(
        bias=policy.lm_head.bias,
        beta=0.2,
        nll_weight=0.1,
        ref_hidden=ref_hidden,
        ref_weight=reference.lm_head.weight,
        ref_bias=reference.lm_head.bias,
    )
    fn = linear_preference_loss(hidden, policy.lm_head.weight, labels, **alignment_calls.preference(**kw))
    for a, b in zip(out, fn):
        torch.testing.assert_close(a, b)
    # the model-output hook changed nothing about the math: full logits of the unmodified model agree
    ref = ref_preference(hidden, policy.lm_head.weight, labels, **kw)
    torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
    tok = ref_token_logps(hidden.detach(), policy.lm_head.weight.detach(), labels, policy.lm_head.bias.detach())
    full = torch.log_softmax(policy_logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tok, torch.where(labels != -100, full, torch.zeros_like(full)), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert policy.lm_head.weight.grad is not None and policy.body.weight.grad is not None
    assert all(p.grad is None for p in reference.parameters())


def test_preference_module_terms_and_errors():
    policy = TinyLM(0)
    tokens, labels = _batch()
    loss_fn = LinearPreferenceLoss()
    with pytest.raises(ValueError, match="set_model_output"):
        loss_fn(torch.zeros(4, 7, H), labels)
    loss_fn.set_model_output(policy)
    with pytest.raises(ValueError, match="reference"):
        loss_fn(policy(tokens), labels, ref_hidden=torch.zeros(4, 7, H))
    terms = loss_fn.terms(policy(tokens), labels, ref_logps=(torch.zeros(2), torch.zeros(2)))
    assert int(terms.num_pairs) == 2 and int(terms.num_chosen_tokens) == int((labels[:2] != -100).sum())
    with pytest.raises(ValueError, match="loss_type"):
        LinearPreferenceLoss(loss_type="dpo")


def test_policy_module_matches_functional_with_reference_hook():
    policy, reference = TinyLM(0), TinyLM(1)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (4, 6), generator=gen)
    labels = torch.cat([tokens[:, 1:], torch.full((4, 1), -100)], dim=1)
    labels[:, :2] = -100
    adv = torch.tensor([0.5, -1.0, 1.5, -0.2])
    loss_fn = LinearPolicyLoss(loss_type="dapo", beta=0.04, temperature=0.9, epsilon_high=0.28)
    loss_fn.set_model_output(policy)
    loss_fn.set_reference_output(reference)
    hidden = policy(tokens)
    with torch.no_grad():
        ref_hidden = reference(tokens)
    out = loss_fn(hidden, labels, adv, ref_hidden=ref_hidden, num_items_in_batch=40)
    ref_logps = ref_token_logps(
        ref_hidden, reference.lm_head.weight.detach(), labels, reference.lm_head.bias.detach(), 0.9
    ).float()
    fn = linear_policy_loss(
        hidden,
        policy.lm_head.weight,
        labels,
        adv,
        **alignment_calls.policy(
            bias=policy.lm_head.bias,
            loss_type="dapo",
            beta=0.04,
            temperature=0.9,
            epsilon_high=0.28,
            ref_logps=ref_logps,
            num_items_in_batch=40,
        ),
    )
    torch.testing.assert_close(out.loss, fn.loss, rtol=1e-5, atol=1e-6)
    assert set(out.metrics) == {"clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "kl", "entropy"}
    for k in out.metrics:
        torch.testing.assert_close(out.metrics[k], fn.metrics[k], rtol=1e-5, atol=1e-6)
