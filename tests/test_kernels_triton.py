"""The Triton cross-entropy chunk kernel against the fp64 reference: under ``TRITON_INTERPRET=1`` on
CPU tensors (small shapes, every run), and on CUDA (``gpu`` marker; skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_spy import spy
from reference import make_labels, ref_ce, ref_kd

from tune_losses.divergences import ChunkRun, VocabReducer, kd_chunk
from tune_losses.fused.functional import linear_cross_entropy, linear_distillation_loss, linear_kd_loss
from tune_losses.kernels import triton_ce, triton_terms
from tune_losses.options import CEOptions, DistillationOptions, ExecutionOptions, KDOptions

triton = pytest.importorskip("triton")
# Triton fixes at its first import whether kernels are interpreted (tests/conftest.py sets it on a
# machine without a GPU): the CPU tests need the interpreter, the gpu-marked ones need it off.
INTERPRETED = type(triton.language.sum).__name__ == "InterpretedFunction"
# Triton's interpreter evaluates both sides of tl.where with numpy (NaN from the unselected side warns).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

OPTS = [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 2.5}]
OPT_IDS = ["plain", "eps-z", "softcap"]


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for this test (CPU tensors)."""
    if not INTERPRETED:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def case(n=9, v=37, dtype=torch.float32, ignore="some", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = make_labels((n,), v, ignore, g)
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    weight = torch.where(labels != -100, weight, 0.0)
    return z.to(device), labels.to(device), weight.to(device)


def reference(z, labels, weight, **opts):
    """fp64 per-token loss and the gradient of ``sum(weight * loss)`` w.r.t. the (rounded) logits."""
    z64 = z.detach().cpu().double().requires_grad_()
    loss = ref_ce(z64, labels.cpu(), reduction="none", **opts)
    (g,) = torch.autograd.grad((loss * weight.cpu().double()).sum(), z64)
    return loss.detach(), g


def tolerances(dtype):
    # bf16: the gradient is rounded to bf16 once (eager autograd's logit gradient is too)
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=1e-2)


def check(dtype, ignore, opts, n=9, v=37, block=16, device="cpu"):
    z, labels, weight = case(n, v, dtype, ignore, device=device)
    want_loss, want_g = reference(z, labels, weight, **opts)
    buf = z.clone()
    loss, lse = triton_ce.ce_chunk_triton(buf, labels, CEOptions(**opts), weight.float(), block=block)
    assert loss.dtype == torch.float32 and buf.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf.cpu().double(), want_g, **tolerances(dtype))
    capped = z.double() if opts.get("softcap") is None else opts["softcap"] * torch.tanh(z.double() / opts["softcap"])
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(capped, -1).cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
def test_ce_kernel_matches_fp64(dtype, ignore, opts, interpret):
    # V = 37 with blocks of 16: three sweeps per row, the last one partial.
    check(dtype, ignore, opts)


def test_values_only_leave_the_logits(interpret):
    z, labels, _ = case()
    buf = z.clone()
    loss, _ = triton_ce.ce_chunk_triton(buf, labels, CEOptions(), None, block=16)
    assert torch.equal(buf, z)
    torch.testing.assert_close(loss.double(), ref_ce(z.double(), labels, reduction="none"), atol=1e-5, rtol=1e-5)


def test_non_finite_and_masked_logits(interpret):
    z, labels, weight = case(ignore="some")
    assert labels[0] == -100 and labels[-1] != -100
    z[0, 3] = float("nan")  # an ignored token: loss 0, gradient 0
    z[-1, 5] = float("nan")  # a counted token: NaN
    z[1, 7] = float("-inf")  # a masked entry: probability 0, finite loss
    buf = z.clone()
    loss, _ = triton_ce.ce_chunk_triton(buf, labels, CEOptions(), weight, block=16)
    assert loss[0] == 0 and torch.all(buf[0] == 0)
    assert torch.isnan(loss[-1])
    if labels[1] != -100 and labels[1] != 7:
        assert torch.isfinite(loss[1]) and buf[1, 7] == 0


def test_engine_uses_the_kernel(interpret, monkeypatch):
    """``TUNE_LOSSES_TRITON=1``: the fused loss runs its chunks through the kernel (bf16 buffers)."""
    monkeypatch.setenv("TUNE_LOSSES_TRITON", "1")
    calls = spy(monkeypatch, triton_ce, "ce_chunk_triton")
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(13, 8, generator=g, dtype=torch.float64)
        w = torch.randn(29, 8, generator=g, dtype=torch.float64) / 8**0.5
        labels = make_labels((13,), 29, "some", g)
        xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        loss = linear_cross_entropy(
            xs,
            ws,
            labels,
            chunk_size=4,
            options=CEOptions(label_smoothing=0.1),
            execution=ExecutionOptions(dw_accumulation="fp32"),
        )
        loss.backward()
        x64, w64 = xs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
        ref = ref_ce(F.linear(x64, w64), labels, label_smoothing=0.1)
        ref.backward()
        tol = tolerances(dtype)  # bf16: the logits are bf16 too (as in eager PyTorch)
        torch.testing.assert_close(loss.double(), ref.detach(), **tol)
        torch.testing.assert_close(xs.grad.double(), x64.grad, **tol)
        torch.testing.assert_close(ws.grad.double(), w64.grad, **tol)
        assert calls and calls[-1] == dtype
    assert len(calls) == 8  # 4 chunks per call


def test_off_by_default_on_cpu(monkeypatch):
    monkeypatch.delenv("TUNE_LOSSES_TRITON", raising=False)
    assert not triton_ce.triton_wanted(torch.device("cpu"))
    monkeypatch.setenv("TUNE_LOSSES_TRITON", "0")
    assert not triton_ce.triton_wanted(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (and Triton not interpreted)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
def test_ce_kernel_on_cuda(dtype, opts, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check(dtype, "some", opts, n=64, v=50257, block=None, device="cuda")


# ------------------------------------------------------------------- distillation: CE + forward KL


def check_distill(dtype, ignore, temperature, true_kl, with_ce, n=9, v=37, block=16, device="cpu"):
    zs, labels, w_ce = case(n, v, dtype, ignore, seed=1, device=device)
    zt, _, w_kd = case(n, v, dtype, ignore, seed=2, device=device)
    w_kd = torch.where(labels != -100, w_kd, 0.0)
    kd = KDOptions(temperature=temperature, true_kl=true_kl)
    zs64 = zs.detach().cpu().double().requires_grad_()
    ref_kd_tok = ref_kd(zs64, zt.cpu().double(), labels.cpu(), divergence="forward_kl", temperature=temperature,
                        true_kl=true_kl, reduction="none")  # fmt: skip
    ref_ce_tok = ref_ce(zs64, labels.cpu(), reduction="none")
    total = (ref_kd_tok * w_kd.cpu().double()).sum()
    if with_ce:
        total = total + (ref_ce_tok * w_ce.cpu().double()).sum()
    (want_g,) = torch.autograd.grad(total, zs64)
    buf = zs.clone()
    ce, kd_val = triton_terms.divergence_chunk_triton(
        buf,
        zt,
        labels,
        kd,
        -100,
        CEOptions() if with_ce else None,
        w_ce.float() if with_ce else None,
        w_kd.float(),
        block=block,
    )
    torch.testing.assert_close(kd_val.cpu().double(), ref_kd_tok.detach(), atol=1e-5, rtol=1e-5)
    if with_ce:
        torch.testing.assert_close(ce.cpu().double(), ref_ce_tok.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf.cpu().double(), want_g, **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("temperature,true_kl,with_ce", [(1.0, True, True), (2.0, False, True), (2.0, True, False)])
def test_distill_kernel_matches_fp64(dtype, ignore, temperature, true_kl, with_ce, interpret):
    check_distill(dtype, ignore, temperature, true_kl, with_ce)


def test_distill_kernel_masked_and_non_finite(interpret):
    zs, labels, w = case(ignore="some", seed=1)
    zt, _, _ = case(ignore="some", seed=2)
    zt[2, :5] = float("-inf")  # teacher entries masked: they count 0
    zs[3, 4] = float("-inf")
    zs[-1, 0] = float("nan")  # a counted token
    buf = zs.clone()
    ce, kd = triton_terms.divergence_chunk_triton(buf, zt, labels, KDOptions(), -100, CEOptions(), w, w, block=16)
    assert torch.isnan(kd[-1]) and torch.isnan(ce[-1])
    # Entries where either side is -inf count 0: the engine's eager math (the reference takes a
    # student -inf under teacher mass as an infinite divergence), valid rows only.
    want, _ = kd_chunk(zs[:-1].double(), zt[:-1].double(), KDOptions(), ChunkRun(VocabReducer(zs.shape[1])))
    keep = labels[:-1] != -100
    torch.testing.assert_close(kd[:-1][keep].double(), want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0], ids=["distill", "kd-only"])
def test_engine_uses_the_distill_kernel(kd_ratio, interpret, monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_TRITON", "1")
    calls = spy(monkeypatch, triton_terms, "divergence_chunk_triton")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(11, 8, generator=g, dtype=torch.float64)
    w = torch.randn(29, 8, generator=g, dtype=torch.float64) / 8**0.5
    tx = torch.randn(11, 6, generator=g, dtype=torch.float64)
    tw = torch.randn(29, 6, generator=g, dtype=torch.float64) / 6**0.5
    labels = make_labels((11,), 29, "some", g)
    xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
    kd = KDOptions(temperature=2.0)
    kw = dict(chunk_size=4, execution=ExecutionOptions(dw_accumulation="fp32"))
    if kd_ratio == 1.0:
        loss = linear_kd_loss(xs, ws, tx.float(), tw.float(), labels, options=kd, **kw)
    else:
        options = DistillationOptions(kd_ratio, kd)
        loss = linear_distillation_loss(xs, ws, tx.float(), tw.float(), labels, options=options, **kw).loss
    loss.backward()
    x64, w64 = x.requires_grad_(), w.requires_grad_()
    z, zt = F.linear(x64, w64), F.linear(tx, tw)
    ref = kd_ratio * ref_kd(z, zt, labels, divergence="forward_kl", temperature=2.0)
    if kd_ratio < 1:
        ref = ref + (1 - kd_ratio) * ref_ce(z, labels)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ws.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    assert len(calls) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (and Triton not interpreted)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_distill_kernel_on_cuda(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_distill(dtype, "some", 2.0, True, True, n=64, v=50257, block=None, device="cuda")
