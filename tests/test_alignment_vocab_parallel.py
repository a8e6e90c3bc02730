"""Alignment losses with a vocabulary-parallel (tensor-parallel) output weight on 2 gloo ranks equal one rank.

The losses have no parallel code of their own: the engine's ``linear_log_probs`` sees a DTensor weight
``Shard(0)`` on a ``"tp"`` mesh and reduces over the vocabulary across ranks; the sequence and pair math
then runs on identical per-token values on every rank.
"""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from multiproc import run_ranks

pytestmark = pytest.mark.distributed

CASES = ("dpo_ref_hidden", "orpo_nll", "grpo_kl_temperature", "dapo_all_ignored")


def _inputs(case: str, rows: int = 6, S: int = 7, H: int = 12, V: int = 40):
    g = torch.Generator().manual_seed(CASES.index(case))  # the same inputs on every rank
    hidden = torch.randn(rows, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    ref_hidden = torch.randn(rows, S, H, generator=g)
    ref_weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (rows, S), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    if case == "dapo_all_ignored":
        labels[:] = -100
    return hidden, weight, ref_hidden, ref_weight, labels


def _loss(case, hidden, weight, ref_hidden, ref_weight, labels):
    import tune_losses

    if case == "dpo_ref_hidden":
        return tune_losses.linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(beta=0.3, ref_hidden=ref_hidden, ref_weight=ref_weight)
        ).loss
    if case == "orpo_nll":
        return tune_losses.linear_preference_loss(
            hidden, weight, labels, **alignment_calls.preference(loss_type="orpo", nll_weight=0.5)
        ).loss
    adv = torch.linspace(-1, 1, labels.shape[0])
    ref = -3 * torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    loss_type = "grpo" if case.startswith("grpo") else "dapo"
    return tune_losses.linear_policy_loss(
        hidden,
        weight,
        labels,
        adv,
        **alignment_calls.policy(loss_type=loss_type, beta=0.1, ref_logps=ref, temperature=0.8),
    ).loss


def _compare_on_ranks(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    out = {}
    for case in CASES:
        hidden, weight, ref_hidden, ref_weight, labels = _inputs(case)
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        one = _loss(case, h1, w1, ref_hidden, ref_weight, labels)
        one.backward()
        h2 = hidden.clone().requires_grad_()
        w2 = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        rw2 = distribute_tensor(ref_weight.clone(), mesh, [Shard(0)])
        two = _loss(case, h2, w2, ref_hidden, rw2, labels)
        two.backward()
        out[case] = {
            "loss": abs(float(one.detach()) - float(two.detach())),
            "dX": float((h1.grad - h2.grad).abs().max()),
            "dW": float((w1.grad - w2.grad.full_tensor()).abs().max()),
            "finite": bool(torch.isfinite(two)),
        }
    return out


def test_tensor_parallel_weight_equals_one_rank():
    results = run_ranks(_compare_on_ranks, 2)
    for rank, res in enumerate(results):
        assert set(res) == set(CASES)
        for case, d in res.items():
            assert d["finite"], (rank, case)
            assert d["loss"] <= 1e-5 and d["dX"] <= 1e-5 and d["dW"] <= 1e-5, (rank, case, d)
