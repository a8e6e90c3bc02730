"""The GRPO family's loss types and options (TRL 1.16's definitions) on both policy paths
(grad-in-forward term and recompute), against the fp64 full-logits reference: values, gradients
(hidden, weight, bias) and metrics; plus edge cases (no valid token, non-finite input, bf16)."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from alignment_reference import ref_policy, ref_token_logps

from tune_losses import linear_policy_loss
from tune_losses.alignment.policy_formulas import importance_sampling_ratio

TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
PATHS = ("grad_in_forward", "recompute")
G, S, H, V = 4, 9, 16, 37


def _case(dtype=torch.float64, seed=10, empty_row=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(G, S, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (G, S), generator=gen)
    for i in range(G):
        labels[i, : i % 3] = -100  # prompt
        labels[i, S - i :] = -100  # unequal completion lengths (row 0 full)
    if empty_row:
        labels[2] = -100
    base = ref_token_logps(hidden.detach(), weight.detach(), labels, bias.detach())
    noise = lambda: 0.4 * torch.randn(G, S, generator=gen, dtype=torch.float64)  # noqa: E731
    old = torch.where(labels != -100, base + noise(), torch.full_like(base, float("-inf")))
    ref = torch.where(labels != -100, base + noise(), torch.full_like(base, float("nan")))
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    ratio = torch.rand(G, S, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, adv=adv, old=old, ref=ref, ratio=ratio)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _check(c, path, tol=1e-9, chunk_size=None, **kwargs):
    args = (c["hidden"], c["weight"], c["labels"], c["adv"])
    kwargs.setdefault("old_logps", c["old"])
    out = linear_policy_loss(
        *args, **alignment_calls.policy(bias=c["bias"], algorithm=path, chunk_size=chunk_size, **kwargs)
    )
    ref_loss, ref_metrics = ref_policy(*args, bias=c["bias"], **kwargs)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=tol, atol=tol)
    assert set(out.metrics) == set(ref_metrics), (set(out.metrics), set(ref_metrics))
    for k, v in ref_metrics.items():
        torch.testing.assert_close(out.metrics[k].double(), v, rtol=tol, atol=tol, msg=k)
    params = [c["hidden"], c["weight"], c["bias"]]
    for g, r, name in zip(_grads(out.loss, params), _grads(ref_loss, params), ("hidden", "weight", "bias")):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=name)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TYPES)
def test_loss_types_match_trl_reference(loss_type, level, path):
    c = _case()
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05, ref_logps=c["ref"])
    kwargs["epsilon_high"] = 1.3 if loss_type == "cispo" else 0.28
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 12
    if loss_type in ("dapo", "cispo", "vespo"):
        kwargs["num_items_in_batch"] = 50
    out = _check(c, path, chunk_size=S if level == "sequence" or loss_type == "vespo" else 8, temperature=0.8, **kwargs)
    if loss_type in CLIP_TYPES and level == "token":
        assert out.metrics["clip_ratio/low"] > 0 and out.metrics["clip_ratio/high"] > 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_delta_two_sided_clipping(loss_type, level, path):
    c = _case(seed=3)
    _check(c, path, loss_type=loss_type, importance_sampling_level=level, delta=1.1, epsilon_high=0.3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_bias_corrected_kl(loss_type, level, path):
    c = _case(seed=4)
    _check(
        c,
        path,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.1,
        ref_logps=c["ref"],
        use_bias_correction_kl=True,
        epsilon_high=2.0 if loss_type == "cispo" else None,
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", ["token", "sequence", "flat"])
@pytest.mark.parametrize("loss_type", ["bnpo", "cispo", "sapo", "vespo"])
def test_vllm_importance_sampling_ratio(loss_type, shape, path):
    c = _case(seed=5)
    ratio = c["ratio"]
    if shape == "sequence":
        ratio = ratio[:, :1]
    elif shape == "flat":
        ratio = ratio[:, 0]
    kwargs = dict(loss_type=loss_type, vllm_is_ratio=ratio, beta=0.05, ref_logps=c["ref"])
    if loss_type == "cispo":
        kwargs["epsilon_high"] = 5.0
    _check(c, path, **kwargs)


def test_importance_sampling_ratio_modes():
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    samp = old + torch.randn(3, 5, generator=gen, dtype=torch.float64)
    samp[0, 1] = float("nan")
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    d = torch.where(mask, old - samp, 0.0).nan_to_num(nan=0.0)
    tok = importance_sampling_ratio(old, samp, mask, mode="token_truncate", clip_max=2.0)
    torch.testing.assert_close(tok, d.exp().clamp(max=2.0))
    masked = importance_sampling_ratio(old, samp, mask, mode="token_mask", clip_min=0.5, clip_max=2.0)
    r = d.exp()
    torch.testing.assert_close(masked, torch.where((r < 0.5) | (r > 2.0), 0.0, r))
    seq = importance_sampling_ratio(old, samp, mask, mode="sequence_truncate", clip_max=2.0)
    torch.testing.assert_close(seq, d.sum(-1, keepdim=True).exp().clamp(max=2.0))
    with pytest.raises(ValueError, match="mode"):
        importance_sampling_ratio(old, samp, mask, mode="tokens")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", ["grpo", "vespo", "luspo"])
def test_sequence_level_with_an_empty_sequence_and_many_chunks(loss_type, path):
    """Chunks of whole sequences (2 per chunk, a partial last chunk), a sequence with no valid token."""
    c = _case(seed=6, empty_row=True)
    c["adv"] = torch.tensor([1.0, -0.5, 0.0, -1.5], dtype=torch.float64)  # a group's zero advantage
    args = (c["hidden"], c["weight"], c["labels"], c["adv"])
    kw = dict(bias=c["bias"], old_logps=c["old"], loss_type=loss_type, importance_sampling_level="sequence")
    out = linear_policy_loss(*args, **alignment_calls.policy(**kw, chunk_size=2 * S + 3, algorithm=path))
    ref_loss, _ = ref_policy(*args, **kw)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-9, atol=1e-9)
    for g, r in zip(_grads(out.loss, [c["hidden"], c["weight"]]), _grads(ref_loss, [c["hidden"], c["weight"]])):
        torch.testing.assert_close(g.double(), r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", TYPES)
def test_no_valid_token_nonfinite_and_bf16(loss_type, path):
    c = _case(seed=11)
    none = torch.full_like(c["labels"], -100)
    kw = dict(loss_type=loss_type, beta=0.1, ref_logps=c["ref"], old_logps=c["old"], algorithm=path)
    out = linear_policy_loss(c["hidden"], c["weight"], none, c["adv"], **alignment_calls.policy(**kw))
    assert out.loss.item() == 0.0 and all(torch.isfinite(v) for v in out.metrics.values())
    assert all((g == 0).all() for g in _grads(out.loss, [c["hidden"], c["weight"]]))
    # A non-finite hidden state at a counted token: a non-finite loss, never a number.
    bad = c["hidden"].detach().clone()
    bad[0, 3, 0] = float("nan")
    bad.requires_grad_()
    out = linear_policy_loss(bad, c["weight"].detach(), c["labels"], c["adv"], **alignment_calls.policy(**kw))
    assert not torch.isfinite(out.loss)
    # bf16 inputs, fp32 math: close to the fp64 reference, gradients bf16 and finite.
    h16 = c["hidden"].detach().bfloat16().requires_grad_()
    w16 = c["weight"].detach().bfloat16().requires_grad_()
    kw16 = dict(loss_type=loss_type, old_logps=c["old"].float(), importance_sampling_level="sequence")
    out = linear_policy_loss(h16, w16, c["labels"], c["adv"].float(), **alignment_calls.policy(algorithm=path, **kw16))
    ref_loss, _ = ref_policy(h16, w16, c["labels"], c["adv"], **kw16)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=3e-2, atol=3e-2)
    gh = _grads(out.loss, [h16])[0]
    assert gh.dtype == torch.bfloat16 and torch.isfinite(gh).all()


def test_paths_agree_in_fp32():
    c = _case(dtype=torch.float32, seed=12)
    kw = dict(loss_type="dapo", beta=0.04, ref_logps=c["ref"].float(), old_logps=c["old"].float(), bias=c["bias"])
    outs = [
        linear_policy_loss(
            c["hidden"], c["weight"], c["labels"], c["adv"].float(), **alignment_calls.policy(algorithm=p, **kw)
        )
        for p in PATHS
    ]
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    g0, g1 = (_grads(o.loss, [c["hidden"], c["weight"]]) for o in outs)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_options_name_the_argument():
    c = _case(seed=13)
    args = (c["hidden"], c["weight"], c["labels"], c["adv"])
    with pytest.raises(ValueError, match="loss_type"):
        linear_policy_loss(*args, **alignment_calls.policy(loss_type="ppo"))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        linear_policy_loss(*args, **alignment_calls.policy(importance_sampling_level="group"))
    with pytest.raises(ValueError, match="delta"):
        linear_policy_loss(*args, **alignment_calls.policy(loss_type="cispo", delta=2.0))
    with pytest.raises(ValueError, match="delta"):
        linear_policy_loss(*args, **alignment_calls.policy(delta=0.0))
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        linear_policy_loss(*args, **alignment_calls.policy(loss_type="sapo", sapo_temperature_neg=0.0))
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        linear_policy_loss(*args, vllm_is_ratio=torch.ones(G, S + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="algorithm"):
        linear_policy_loss(*args, **alignment_calls.policy(algorithm="fast"))
    with torch.no_grad(), pytest.raises(ValueError, match="grad_in_forward"):
        linear_policy_loss(*args, **alignment_calls.policy(algorithm="grad_in_forward"))


@pytest.mark.slow  # about a minute of compilation per case on 2 CPU cores
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token")])
def test_compiled_chunk_math(monkeypatch, loss_type, level):
    """The term through the engine's compiled chunk math (padded chunks, whole-sequence chunks)."""
    from tune_losses.fused import compiled

    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    monkeypatch.setattr(compiled, "_BROKEN", [])
    c = _case(dtype=torch.float32, seed=14)
    kw = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        ref_logps=c["ref"].float(),
        old_logps=c["old"].float(),
        bias=c["bias"],
    )
    out = linear_policy_loss(
        c["hidden"], c["weight"], c["labels"], c["adv"].float(), **alignment_calls.policy(chunk_size=2 * S, **kw)
    )
    assert not compiled._BROKEN, compiled._BROKEN
    ref_loss, ref_metrics = ref_policy(c["hidden"], c["weight"], c["labels"], c["adv"], **kw)
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(out.metrics[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    params = [c["hidden"], c["weight"], c["bias"]]
    for g, r in zip(_grads(out.loss, params), _grads(ref_loss, params)):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
