"""Output layers and head steps that are not a plain linear map: matched exactly (loss and every gradient,
the scale's own parameters included) or refused with a reason, never ignored."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from hf_tiny import assert_fused_matches_stock, batch, build  # noqa: E402

from tune_losses.integrations.transformers import patch  # noqa: E402


class RowScaledHead(nn.Linear):
    """Dory's head: a learnable per-row logit scale, applied in fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.logit_scale = nn.Parameter(torch.full((linear.out_features,), 0.02))
        self.logit_scale_factor = 50.0

    def forward(self, hidden_states):
        logits = super().forward(hidden_states).float()
        return logits * (self.logit_scale.float() * self.logit_scale_factor)


class TimesFour(nn.Linear):
    def forward(self, x):
        return 4 * nn.functional.linear(x, self.weight, self.bias)


class LearnableScalar(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return super().forward(x) / self.temperature


class Shifted(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1.0


class Normalized(nn.Linear):
    def forward(self, x):
        return super().forward(nn.functional.normalize(x, dim=-1)) * 3.0


def _with_head(make, bias=False, seed=0):
    model = build("llama", seed=seed)
    old = model.lm_head
    head = make(old) if make is RowScaledHead else make(old.in_features, old.out_features, bias=bias)
    if make is not RowScaledHead:
        head.load_state_dict(old.state_dict(), strict=False)
    model.lm_head = head
    with torch.no_grad():  # every parameter off its initial value, the scale's included
        g = torch.Generator().manual_seed(seed + 1)
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.detach().abs().mean())
    return model


@pytest.mark.parametrize("make,bias", [(RowScaledHead, False), (TimesFour, True), (LearnableScalar, True)])
def test_a_scaling_linear_subclass_matches_stock_with_every_gradient(make, bias):
    stock = _with_head(make, bias)
    fused = patch(copy.deepcopy(stock))
    ids, labels = batch()
    assert_fused_matches_stock(stock, fused, input_ids=ids, labels=labels)
    for name, p in fused.lm_head.named_parameters():  # the scale trains (its gradient is not zero)
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("make", [Shifted, Normalized])
def test_an_unrecognised_linear_subclass_forward_is_refused_at_patch_time(make):
    model = _with_head(make)
    with pytest.raises(ValueError, match=rf"output layer: {make.__name__} overrides nn.Linear.forward and returns"):
        patch(model)


def test_return_dict_false_keeps_a_none_logits_slot():
    stock = build("llama")
    fused = patch(copy.deepcopy(stock))
    ids, labels = batch()
    ref = stock(input_ids=ids, labels=labels, return_dict=False)
    out = fused(input_ids=ids, labels=labels, return_dict=False)
    loss, logits = out[:2]
    assert logits is None and len(out) == len(ref)
    torch.testing.assert_close(loss, ref[0], atol=1e-5, rtol=1e-5)


def test_bamba_z_loss_over_every_position_matches_stock():
    """Bamba adds ``c * mean(lse^2)`` over all positions (ignored ones included) after its loss function."""
    import hf_survey

    stock = hf_survey.build("bamba")
    stock.z_loss_coefficient = 0.5
    fused = patch(copy.deepcopy(stock))
    ids, labels = hf_survey.batch()
    assert_fused_matches_stock(stock, fused, input_ids=ids, labels=labels)


def test_custom_loss_function_is_refused_by_function_not_name():
    model = build("llama")
    model.loss_type = "ForConditionalGeneration"  # LOSS_MAPPING maps it to the causal-LM loss: accepted
    patch(model)
    model = build("llama")
    model.loss_type = "ForMaskedLM"
    with pytest.raises(ValueError, match="ForMaskedLMLoss"):
        patch(model)
