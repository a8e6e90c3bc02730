"""The (sum, num_tokens) contract (``tune_losses.accounting``): normalize, token counting across
micro-batches and ranks, and the Megatron-style loss function."""

import os

import pytest
import torch
import torch.nn.functional as F

from tune_losses import accounting

# ------------------------------------------------------------------------------------- normalize


def test_normalize_divides_by_the_count():
    total = torch.tensor(6.0, requires_grad=True)
    out = accounting.normalize(total, torch.tensor(4))
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == 1.5
    (g,) = torch.autograd.grad(out, total)
    assert g.item() == 0.25


def test_normalize_with_no_valid_token_is_zero_not_nan():
    x = torch.randn(5, requires_grad=True)
    total = (x * 0).sum()  # a loss over no valid token: sum 0, in the graph
    out = accounting.normalize(total, torch.tensor(0))
    assert out.item() == 0.0 and not torch.isnan(out)
    (g,) = torch.autograd.grad(out, x)
    assert (g == 0).all()


def test_normalize_keeps_the_total_dtype():
    assert accounting.normalize(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2)).dtype == torch.float64
    assert accounting.normalize(torch.tensor(3.0), torch.tensor(2, dtype=torch.int32)).dtype == torch.float32


def test_loss_sum_mean():
    assert float(accounting.LossSum(torch.tensor(9.0), torch.tensor(3)).mean()) == 3.0
    assert float(accounting.LossSum(torch.tensor(0.0), torch.tensor(0)).mean()) == 0.0


# ------------------------------------------------------------------------------------- counting


def test_count_valid_tokens():
    labels = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    n = accounting.count_valid_tokens(labels)
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == 3
    assert int(accounting.count_valid_tokens(labels, ignore_index=0)) == 5
    assert int(accounting.count_valid_tokens(torch.full((2, 4), -100))) == 0


def test_count_step_tokens_sums_every_micro_batch():
    batches = [
        torch.tensor([[1, -100, 3]]),
        torch.tensor([[-100, -100], [5, 6]]),  # other shapes are fine
        torch.full((3, 4), -100),  # a micro-batch with nothing valid
    ]
    n = accounting.count_step_tokens(batches)
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == 4
    assert int(accounting.count_step_tokens(iter(batches))) == 4  # any iterable, e.g. a generator
    assert int(accounting.count_step_tokens(batches, ignore_index=5)) == 3 + 3 + 12
    assert not n.requires_grad


def test_count_step_tokens_needs_a_micro_batch():
    with pytest.raises(ValueError, match="label_batches"):
        accounting.count_step_tokens([])


def test_all_reduce_token_count_without_distributed_is_an_identity_copy():
    n = torch.tensor(7)
    out = accounting.all_reduce_token_count(n)
    assert int(out) == 7
    out += 1  # a new tensor: the caller's count is untouched
    assert int(n) == 7


def test_step_normalization_equals_one_big_batch():
    """Backpropagating sum_i / global_count per micro-batch gives the gradient of one big batch."""
    g = torch.Generator().manual_seed(0)
    V = 11
    logits = torch.randn(4, 6, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (4, 6), generator=g)
    labels[torch.rand(4, 6, generator=g) < 0.4] = -100
    labels[2:] = -100  # the second micro-batch has few valid tokens
    labels[3, 0] = 1
    micro = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    global_count = accounting.count_step_tokens(lab for _, lab in micro)
    for x, lab in micro:
        loss_sum = F.cross_entropy(x.reshape(-1, V), lab.reshape(-1), reduction="sum")
        accounting.normalize(loss_sum, global_count).backward()
    stepped = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)).backward()
    torch.testing.assert_close(stepped, logits.grad)


def _count_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        if rank == 0:
            batches = [torch.tensor([[1, -100, 2]]), torch.tensor([[3, 4, -100]])]  # 4 valid
        else:
            batches = [torch.full((1, 3), -100), torch.full((2, 2), -100)]  # none valid: still calls
        n = accounting.count_step_tokens(batches)
        torch.save(n, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_count_step_tokens_sums_over_ranks(tmp_path):
    """2 gloo ranks on CPU: every rank gets the global count, also the rank with nothing valid."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _count_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    import time

    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("2-rank token count did not finish in 120 s")
    counts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [int(c) for c in counts] == [4, 4]
    assert all(c.dtype == torch.int64 for c in counts)


# ------------------------------------------------------------------------------------ megatron


def test_megatron_loss_func_returns_sum_count_and_metric():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    loss_sum, num_tokens, metrics = accounting.megatron_loss_func(mask, losses)
    assert loss_sum.dim() == 0 and loss_sum.item() == 1 + 3 + 4 + 5
    assert num_tokens.dim() == 0 and int(num_tokens) == 4
    assert set(metrics) == {"lm loss"}
    metric = metrics["lm loss"]
    assert metric.dtype == torch.float32 and not metric.requires_grad
    assert metric.tolist() == [13.0, 4.0]
    (g,) = torch.autograd.grad(loss_sum, losses)
    assert torch.equal(g, mask.float())


def test_megatron_loss_func_masks_nan_at_masked_positions():
    losses = torch.tensor([1.0, float("nan"), 2.0, float("inf")], requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])  # float masks as Megatron passes them
    loss_sum, num_tokens, metrics = accounting.megatron_loss_func(mask, losses)
    assert loss_sum.item() == 3.0 and int(num_tokens) == 2
    assert torch.isfinite(metrics["lm loss"]).all()
    (g,) = torch.autograd.grad(loss_sum, losses)
    assert torch.equal(g, mask) and not torch.isnan(g).any()


def test_megatron_loss_func_all_masked():
    losses = torch.full((2, 3), float("nan"), requires_grad=True)
    loss_sum, num_tokens, metrics = accounting.megatron_loss_func(torch.zeros(2, 3), losses)
    assert loss_sum.item() == 0.0 and int(num_tokens) == 0
    assert metrics["lm loss"].tolist() == [0.0, 0.0]
    assert accounting.normalize(loss_sum, num_tokens).item() == 0.0


def test_megatron_loss_func_sums_low_precision_losses_in_fp32():
    """Per-token bf16 losses are summed in fp32 (as Megatron's loss_func upcasts), not in bf16."""
    g = torch.Generator().manual_seed(1)
    losses = (torch.rand(4096, generator=g) * 10).to(torch.bfloat16).requires_grad_()
    mask = torch.ones(4096)
    loss_sum, _, metrics = accounting.megatron_loss_func(mask, losses)
    exact = losses.detach().double().sum()
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(metrics["lm loss"][0].double(), exact, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(loss_sum, losses)
    assert grad.dtype == torch.bfloat16


def test_megatron_loss_func_with_per_token_cross_entropy():
    g = torch.Generator().manual_seed(2)
    V = 9
    logits = torch.randn(2, 5, V, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = -100
    per_token = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(2, 5)
    loss_sum, num_tokens, _ = accounting.megatron_loss_func((labels != -100).long(), per_token)
    torch.testing.assert_close(loss_sum / num_tokens, F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)))


def test_megatron_loss_func_shape_mismatch_names_loss_mask():
    with pytest.raises(ValueError, match="loss_mask"):
        accounting.megatron_loss_func(torch.ones(2, 4), torch.ones(2, 3))
