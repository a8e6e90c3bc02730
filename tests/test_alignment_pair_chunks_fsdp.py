"""The pair-chunked preference path with FSDP2-style weights (DTensor ``Shard(0)`` on a data-parallel
mesh) on 2 gloo ranks: gathered once per call, gradients averaged over the ranks like FSDP2's; a rank
whose pair does not fit a chunk takes the per-token path beside one that does (same collectives)."""

from __future__ import annotations

import alignment_calls
import pytest
import torch
from multiproc import run_ranks

pytestmark = pytest.mark.distributed

B, S, H, V = 2, 9, 12, 40


def _batch(rank: int):
    g = torch.Generator().manual_seed(rank)  # each rank's own batch, known to every rank
    hidden = torch.randn(2 * B, S, H, generator=g)
    ref_hidden = torch.randn(2 * B, S, H, generator=g)
    labels = torch.randint(0, V, (2 * B, S), generator=g)
    labels[:, :2] = -100
    labels[1, 6:] = -100
    return hidden, ref_hidden, labels


def _weights():
    g = torch.Generator().manual_seed(100)
    return (
        torch.randn(V, H, generator=g) / H**0.5,
        torch.randn(V, H, generator=g) / H**0.5,
        0.1 * torch.randn(V, generator=g),
    )


def _on_ranks(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tune_losses import linear_preference_loss

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    weight, ref_weight, bias = _weights()
    chunk = [None, 3][rank]  # rank 1: a pair of 14 tokens, more than 4 chunks of 3 (the per-token path)
    kwargs = dict(loss_type="orpo", nll_weight=0.3)
    # One process: each rank's loss and gradients with plain tensors; dW and db averaged over the ranks.
    want_dw, want_db = torch.zeros_like(weight), torch.zeros_like(bias)
    for r in range(world):
        hidden, ref_hidden, labels = _batch(r)
        h, w, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
        one = linear_preference_loss(
            h, w, labels, **alignment_calls.preference(bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight, **kwargs)
        ).loss
        one.backward()
        want_dw += w.grad / world
        want_db += b.grad / world
        if r == rank:
            want_loss, want_dx = one.detach(), h.grad
    hidden, ref_hidden, labels = _batch(rank)
    h = hidden.clone().requires_grad_()
    w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_()
    rw = distribute_tensor(ref_weight.clone(), mesh, [Shard(0)])
    out = linear_preference_loss(
        h,
        w,
        labels,
        **alignment_calls.preference(bias=b, ref_hidden=ref_hidden, ref_weight=rw, chunk_size=chunk, **kwargs),
    ).loss
    out.backward()
    return {
        "fast": type(out.grad_fn).__name__ == "GradInForwardBackward",
        "loss": abs(float(out.detach() - want_loss)),
        "dX": float((h.grad - want_dx).abs().max()),
        "dW": float((w.grad.full_tensor() - want_dw).abs().max()),
        "db": float((b.grad.full_tensor() - want_db).abs().max()),
    }


def test_fsdp_weights_take_the_pair_chunked_path_and_match_one_process():
    results = run_ranks(_on_ranks, 2)
    assert [r["fast"] for r in results] == [True, False]
    for rank, r in enumerate(results):
        assert max(r["loss"], r["dX"], r["dW"], r["db"]) <= 1e-5, (rank, r)
