"""patch() under FSDP2 on 2 gloo ranks: loss and gathered gradients equal one process on the whole batch,
with the output layer in the root's parameter group and sharded on its own (gathered by our placement code)."""

import pytest
import torch

pytest.importorskip("transformers")

from multiproc import run_ranks  # noqa: E402


def _fsdp_rank(rank, world, kind, shard_head):
    import copy

    from hf_tiny import batch, build
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import tune_losses.fused.placement as placement
    from tune_losses.integrations.transformers import patch

    gathered = []
    real = placement.materialize_weight
    placement.materialize_weight = lambda w, *a: gathered.append(isinstance(w, DTensor)) or real(w, *a)

    torch.manual_seed(0)
    stock = build(kind)  # same seed on every rank: same parameters
    model = patch(copy.deepcopy(stock))
    ids, labels = batch(b=4, s=9)
    n_global = (labels[:, 1:] != -100).sum()
    ref = stock(input_ids=ids, labels=labels)
    ref.loss.backward()

    for layer in model.model.layers:
        fully_shard(layer)
    if shard_head:
        fully_shard(model.lm_head)
    fully_shard(model)
    mine = slice(rank * 2, rank * 2 + 2)
    # FSDP2 averages gradients over ranks: sum_r / (N / world) per rank is the whole batch's mean.
    out = model(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=n_global.float() / world)
    out.loss.backward()
    total = out.loss.detach().clone()
    torch.distributed.all_reduce(total)
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), stock.named_parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, (grad - q.grad).abs().max().item())
    return {
        "loss": (total / world).item(),
        "ref": ref.loss.item(),
        "worst": worst,
        "logits": out.logits is None,
        "gathered": any(gathered),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("kind,shard_head", [("llama", False), ("llama", True), ("llama_tied", False)])
def test_fsdp2_two_ranks_equal_one(kind, shard_head):
    for r in run_ranks(_fsdp_rank, 2, kind, shard_head, timeout=240):
        assert r["logits"]
        assert r["gathered"] == shard_head  # a separately sharded head is a DTensor here, gathered by our placement
        assert r["loss"] == pytest.approx(r["ref"], abs=1e-5)
        assert r["worst"] < 1e-5
