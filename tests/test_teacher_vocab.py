"""Distillation between a student and a teacher with a larger (padded) vocabulary.

The reference aligns full fp64 logits by hand: ``"drop"`` compares the student with the teacher's
first ``V_s`` logits; ``"pad_student"`` appends zero logits to the student. Fused and chunked-output
losses must give the same values and student gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import DIVERGENCES, make_labels, ref_ce, ref_kd

import tune_losses as tl
from tune_losses.options import DistillationOptions, KDOptions

VS, VT, HS, HT = 37, 45, 16, 24


def _ref_aligned(zs, zt, mode):
    return (zs, zt[..., : zs.shape[-1]]) if mode == "drop" else (F.pad(zs, (0, zt.shape[-1] - zs.shape[-1])), zt)


def _inputs(seed=0, shape=(2, 9), ignore="some", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(*shape, HS, generator=g, dtype=torch.float64)
    ws = torch.randn(VS, HS, generator=g, dtype=torch.float64) * 0.5
    xt = torch.randn(*shape, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(VT, HT, generator=g, dtype=torch.float64) * 0.5
    bt = torch.randn(VT, generator=g, dtype=torch.float64)
    labels = make_labels(shape, VS, ignore, g)
    return [t.to(dtype) for t in (xs, ws, xt, wt, bt)] + [labels]


@pytest.mark.parametrize("mode", ["drop", "pad_student"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_fused_kd_matches_reference(mode, divergence, ignore):
    xs, ws, xt, wt, bt, labels = _inputs(ignore=ignore)
    xs.requires_grad_(True)
    ws.requires_grad_(True)
    options = KDOptions(divergence=divergence, temperature=1.5, teacher_vocab=mode)
    loss = tl.linear_kd_loss(xs, ws, xt, wt, labels, teacher_bias=bt, chunk_size=5, options=options)
    loss.backward()
    rx = xs.detach().double().requires_grad_(True)
    rw = ws.detach().double().requires_grad_(True)
    zs, zt = _ref_aligned(rx @ rw.T, xt.double() @ wt.double().T + bt.double(), mode)
    ref = ref_kd(zs, zt, labels, divergence=divergence, temperature=1.5)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs.grad.double(), rx.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws.grad.double(), rw.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["drop", "pad_student"])
def test_fused_distillation_matches_reference(mode):
    xs, ws, xt, wt, bt, labels = _inputs(seed=1, shape=(3, 7))
    xs.requires_grad_(True)
    options = DistillationOptions(kd_ratio=0.3, kd=KDOptions(teacher_vocab=mode))
    out = tl.linear_distillation_loss(xs, ws, xt, wt, labels, teacher_bias=bt, options=options)
    out.loss.backward()
    rx = xs.detach().double().requires_grad_(True)
    zs_full = rx @ ws.double().T
    zs, zt = _ref_aligned(zs_full, xt.double() @ wt.double().T + bt.double(), mode)
    ref = 0.7 * ref_ce(zs_full, labels) + 0.3 * ref_kd(zs, zt, labels, divergence="forward_kl")
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs.grad.double(), rx.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["drop", "pad_student"])
@pytest.mark.parametrize(
    "cls",
    [
        "ForwardKLWithChunkedOutputLoss",
        "ReverseKLWithChunkedOutputLoss",
        "SymmetricKLWithChunkedOutputLoss",
        "JSDWithChunkedOutputLoss",
        "TVDWithChunkedOutputLoss",
    ],
)
def test_chunked_output_matches_reference(mode, cls):
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(2, 11, VS, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 11, VT, generator=g, dtype=torch.float64)
    labels = make_labels((2, 11), VS, "some", g)
    kwargs = {"true_kl": True} if "ForwardKL" in cls or "Symmetric" in cls else {}
    loss_fn = getattr(tl, cls)(num_output_chunks=3, teacher_vocab=mode, **kwargs)
    s = zs.float().requires_grad_(True)
    loss = loss_fn(list(torch.tensor_split(s, 3, dim=1)), list(torch.tensor_split(zt.float(), 3, dim=1)), labels)
    loss.backward()
    divergence = {
        "ForwardKL": "forward_kl",
        "ReverseKL": "reverse_kl",
        "SymmetricKL": "symmetric_kl",
        "JSD": "jsd",
        "TVD": "tvd",
    }[cls.split("With")[0]]
    r = zs.clone().requires_grad_(True)
    a, b = _ref_aligned(r, zt, mode)
    ref = ref_kd(a, b, labels, divergence=divergence)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


def test_bf16_no_worse_than_eager():
    xs, ws, xt, wt, bt, labels = _inputs(seed=3, shape=(4, 16), dtype=torch.bfloat16)
    ours = tl.linear_kd_loss(xs, ws, xt, wt, labels, teacher_bias=bt, options=KDOptions(teacher_vocab="drop"))
    # eager PyTorch in bf16: the model's own F.linear, then the fp32 loss on the upcast logits
    eager = ref_kd(F.linear(xs, ws).float(), F.linear(xt, wt, bt).float()[..., :VS], labels, divergence="forward_kl")
    exact = ref_kd(
        xs.double() @ ws.double().T,
        (xt.double() @ wt.double().T + bt.double())[..., :VS],
        labels,
        divergence="forward_kl",
    )
    assert abs(ours.double() - exact) <= 1.5 * abs(eager.double() - exact) + 1e-6


def test_smaller_teacher_vocabulary_is_an_error_that_says_what_to_do():
    xs, ws, xt, wt, bt, labels = _inputs()
    with pytest.raises(ValueError, match=r"teacher_weight: .*at least the student's 37.*pad the teacher"):
        tl.linear_kd_loss(xs, ws, xt, wt[:30], labels)
    loss_fn = tl.ForwardKLWithChunkedOutputLoss(num_output_chunks=1)
    with pytest.raises(ValueError, match=r"teacher_logits\[0\].*smaller than the student's"):
        loss_fn([torch.randn(2, 9, VS)], [torch.randn(2, 9, 30)], labels)
    with pytest.raises(ValueError, match="teacher_vocab"):
        tl.linear_kd_loss(xs, ws, xt, wt, labels, options=KDOptions(teacher_vocab="truncate"))


def test_another_vocabulary_size_is_an_error_unless_teacher_vocab_is_set():
    """A teacher of another vocabulary size is often another tokenizer: by default an error naming both sizes."""
    xs, ws, xt, wt, bt, labels = _inputs()
    msg = rf"teacher_weight: the teacher's vocabulary has {VT} entries, the student's {VS}.*teacher_vocab='drop'"
    with pytest.raises(ValueError, match=msg):
        tl.linear_kd_loss(xs, ws, xt, wt, labels, teacher_bias=bt)
    with pytest.raises(ValueError, match=msg):
        tl.linear_distillation_loss(xs, ws, xt, wt, labels, teacher_bias=bt)
    loss_fn = tl.ForwardKLWithChunkedOutputLoss(num_output_chunks=1)
    with pytest.raises(
        ValueError, match=rf"teacher_logits: the teacher's vocabulary has {VT} entries, the student's {VS}"
    ):
        loss_fn([torch.randn(2, 9, VS)], [torch.randn(2, 9, VT)], labels)
    assert tl.KDOptions().teacher_vocab is None
    # the same size needs no setting
    tl.linear_kd_loss(xs, ws, xt, wt[:VS], labels, teacher_bias=bt[:VS])


def test_drop_never_computes_the_padding_rows():
    """With "drop" the teacher's padding rows take no part: changing them changes nothing."""
    xs, ws, xt, wt, bt, labels = _inputs(seed=4)
    a = tl.linear_kd_loss(xs, ws, xt, wt, labels, teacher_bias=bt, options=KDOptions(teacher_vocab="drop"))
    wt2, bt2 = wt.clone(), bt.clone()
    wt2[VS:] = float("nan")
    bt2[VS:] = float("inf")
    b = tl.linear_kd_loss(xs, ws, xt, wt2, labels, teacher_bias=bt2, options=KDOptions(teacher_vocab="drop"))
    assert torch.equal(a, b)


def _vocab_parallel_rank(rank: int, world: int, mode: str, teacher_sharded: bool, divergence: str):
    """One rank: a Shard(0) student weight on a 'tp' mesh against the single-process result."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    xs, ws, xt, wt, bt, labels = _inputs(seed=5, shape=(2, 13))
    single_x = xs.clone().requires_grad_(True)
    single_w = ws.clone().requires_grad_(True)
    kw = dict(chunk_size=4, options=KDOptions(divergence=divergence, teacher_vocab=mode))
    single = tl.linear_kd_loss(single_x, single_w, xt, wt, labels, teacher_bias=bt, **kw)
    single.backward()
    x = xs.clone().requires_grad_(True)
    w = distribute_tensor(ws, mesh, [Shard(0)]).requires_grad_(True)
    t_w = distribute_tensor(wt, mesh, [Shard(0)]) if teacher_sharded else wt
    t_b = distribute_tensor(bt, mesh, [Shard(0)]) if teacher_sharded else bt
    loss = tl.linear_kd_loss(x, w, xt, t_w, labels, teacher_bias=t_b, **kw)
    loss.backward()
    torch.testing.assert_close(loss, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, single_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.full_tensor(), single_w.grad, rtol=1e-5, atol=1e-6)
    return float(loss)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["drop", "pad_student"])
@pytest.mark.parametrize("teacher_sharded", [False, True], ids=["teacher_replicated", "teacher_sharded"])
def test_vocab_parallel_equals_one_rank(mode, teacher_sharded):
    from multiproc import run_ranks

    losses = run_ranks(_vocab_parallel_rank, 2, mode, teacher_sharded, "jsd" if teacher_sharded else "forward_kl")
    assert losses[0] == losses[1]


def test_qwen2_5_7b_to_0_5b_config_builds_on_meta():
    """The real-model config whose teacher's vocabulary (152064 rows) exceeds the student's (151936)."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "qwen2_5" / "7B_to_0.5B_kd.yaml")
    with torch.device("meta"):
        student, teacher = config.instantiate(cfg.model), config.instantiate(cfg.teacher_model)
    proj_s, proj_t = tl.output_projection(student), tl.output_projection(teacher)
    assert (proj_s.weight.shape[0], proj_t.weight.shape[0]) == (151936, 152064)
    loss_fn = config.instantiate(cfg.loss)
    assert loss_fn.options.kd.teacher_vocab == "drop"
