"""The engine's contracts: matmul work per call, non-finite inputs never hidden, stale gradients
refused, fp64 computed in fp64 (gradcheck), the step's token count applied in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_common import DIVERGENCE_CASES, DIVERGENCE_IDS
from reference import make_labels, object_form, ref_ce
from torch.utils._python_dispatch import TorchDispatchMode

from tune_losses import (
    CEWithChunkedOutputLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDWithChunkedOutputLoss,
    ReverseKLWithChunkedOutputLoss,
    SymmetricKLWithChunkedOutputLoss,
    TVDWithChunkedOutputLoss,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_kd_loss,
)
from tune_losses.options import CEOptions, DistillationOptions, ExecutionOptions, KDOptions

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(n=24, hdim=8, vocab=40, seed=0, dtype=torch.float32):
    g = gen(seed)
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hdim, generator=g, dtype=torch.float64) / hdim**0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3
    th = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    tw = torch.randn(vocab, hdim, generator=g, dtype=torch.float64) / hdim**0.5
    labels = make_labels((n,), vocab, "some", gen(seed + 1))
    return [t.to(dtype) for t in (h, w, b, th, tw)] + [labels]


# ------------------------------------------------------------------------------- matmul work


class MatmulFlops(TorchDispatchMode):
    """Counts the flops of every matrix product (mm / addmm / bmm, in-place and out= variants)."""

    OPS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm, torch.ops.aten.baddbmm}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.OPS:
            a, b = (args[0], args[1]) if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm) else args[1:3]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **kwargs)


@pytest.mark.parametrize("algorithm", ["grad_in_forward", "recompute"])
@pytest.mark.parametrize("kind", ["ce", "distillation", "kd"])
def test_matmul_work_per_call(kind, algorithm):
    n, hdim, vocab = 64, 16, 96
    h, w, b, th, tw, labels = inputs(n, hdim, vocab, seed=3)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    unit = 2 * n * hdim * vocab
    with MatmulFlops() as counter:
        if kind == "ce":
            loss = linear_cross_entropy(hh, ww, labels, chunk_size=16, execution=ExecutionOptions(algorithm=algorithm))
        elif kind == "kd":
            loss = linear_kd_loss(
                hh, ww, th, tw, labels, chunk_size=16, execution=ExecutionOptions(algorithm=algorithm)
            )
        else:
            loss = linear_distillation_loss(
                hh, ww, th, tw, labels, chunk_size=16, execution=ExecutionOptions(algorithm=algorithm)
            ).loss
        loss.backward()
    # student logits, dX, dW (+ the teacher's logits); recompute makes the logits once more in backward.
    expected = {"ce": 3, "kd": 4, "distillation": 4}[kind] + (1 + (kind != "ce") if algorithm == "recompute" else 0)
    assert counter.flops == expected * unit, (counter.flops / unit, expected)


# -------------------------------------------------------------------------- non-finite inputs


def _poison(t, value, row):
    t = t.clone()
    t[row, 1] = value
    return t


def _fused_losses(h, w, b, th, tw, labels, divergence, extra):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    options = DistillationOptions(kd=KDOptions(divergence, **extra))
    out = linear_distillation_loss(hh, ww, th, tw, labels, student_bias=b, chunk_size=5, options=options)
    out.loss.backward()
    kd = linear_kd_loss(
        h,
        w,
        th,
        tw,
        labels,
        student_bias=b,
        chunk_size=5,
        options=KDOptions(divergence=divergence, **extra),
        execution=ExecutionOptions(algorithm="recompute"),
    )
    return out, kd, hh.grad


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("divergence,extra", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_non_finite_hidden_state_at_a_counted_token_is_never_hidden(divergence, extra, value, side):
    h, w, b, th, tw, labels = inputs(seed=5)
    row = int((labels != -100).nonzero()[2])
    if side == "student":
        h = _poison(h, value, row)
    else:
        th = _poison(th, value, row)
    out, kd, grad = _fused_losses(h, w, b, th, tw, labels, divergence, extra)
    assert not torch.isfinite(out.kd), (out.kd, "fused distillation KD part")
    assert not torch.isfinite(out.loss)
    assert not torch.isfinite(kd)
    # chunked-output classes on the logits
    chunked = {
        "forward_kl": ForwardKLWithChunkedOutputLoss(2, true_kl=True),
        "reverse_kl": ReverseKLWithChunkedOutputLoss(2),
        "symmetric_kl": SymmetricKLWithChunkedOutputLoss(2, extra.get("sym_kd_ratio", 0.5)),
        "jsd": JSDWithChunkedOutputLoss(2, extra.get("beta", 0.5)),
        "tvd": TVDWithChunkedOutputLoss(2),
    }[divergence]
    zs, zt = F.linear(h, w, b)[None], F.linear(th, tw)[None]
    assert not torch.isfinite(chunked(list(zs.tensor_split(2, 1)), list(zt.tensor_split(2, 1)), labels[None]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_hidden_state_in_cross_entropy(value):
    h, w, b, _, _, labels = inputs(seed=6)
    row = int((labels != -100).nonzero()[0])
    h = _poison(h, value, row)
    for algorithm in ("grad_in_forward", "recompute"):
        assert not torch.isfinite(
            linear_cross_entropy(h, w, labels, bias=b, chunk_size=7, execution=ExecutionOptions(algorithm=algorithm))
        )
    z = F.linear(h, w, b)[None]
    assert not torch.isfinite(CEWithChunkedOutputLoss(2)(list(z.tensor_split(2, 1)), labels[None]))


def test_non_finite_at_an_ignored_token_does_not_reach_the_loss():
    h, w, b, th, tw, labels = inputs(seed=7)
    row = int((labels == -100).nonzero()[0])
    h, th = _poison(h, float("nan"), row), _poison(th, float("nan"), row)
    out = linear_distillation_loss(
        h, w, th, tw, labels, student_bias=b, chunk_size=5, options=DistillationOptions(kd=KDOptions(divergence="jsd"))
    )
    assert torch.isfinite(out.loss) and torch.isfinite(out.kd) and torch.isfinite(out.ce)


@pytest.mark.parametrize("divergence,extra", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_masked_vocabulary_entries_stay_finite(divergence, extra):
    h, w, b, th, tw, labels = inputs(seed=8)
    labels = torch.where((labels == 3) | (labels == 11), 0, labels)
    b = b.clone()
    b[[3, 11]] = float("-inf")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    options = DistillationOptions(kd=KDOptions(divergence, **extra))
    out = linear_distillation_loss(
        hh, ww, th, tw, labels, student_bias=b, teacher_bias=b, chunk_size=5, options=options
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()


# ---------------------------------------------------------------------------- stale gradients


@pytest.mark.parametrize("which", ["weight", "hidden"])
def test_modified_in_place_between_forward_and_backward_raises(which):
    h, w, b, th, tw, labels = inputs(seed=9)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, labels, execution=ExecutionOptions(algorithm="grad_in_forward"))
    with torch.no_grad():
        (ww if which == "weight" else hh).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # As eager autograd (and algorithm="recompute") does:
    eager = F.cross_entropy(F.linear(hh, ww), labels)
    with torch.no_grad():
        (ww if which == "weight" else hh).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        eager.backward()


def test_backward_twice_error_explains_gradcheck():
    h, w, b, th, tw, labels = inputs(seed=10)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, labels, execution=ExecutionOptions(algorithm="grad_in_forward"))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="gradcheck"):
        loss.backward()


# -------------------------------------------------------------------------------------- fp64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp64_cross_entropy_gradcheck(reduction):
    h, w, b, th, tw, labels = inputs(n=7, hdim=3, vocab=6, seed=11, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]

    def fn(hh, ww, bb):
        return linear_cross_entropy(
            hh,
            ww,
            labels,
            bias=bb,
            reduction=reduction,
            chunk_size=3,
            options=CEOptions(label_smoothing=0.1, z_loss=1e-2, softcap=3.0),
            execution=ExecutionOptions(algorithm="recompute"),
        )

    out = fn(*leaves)
    assert out.dtype == torch.float64
    ref = ref_ce(F.linear(h, w, b), labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("divergence,extra", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_fp64_divergence_gradcheck(divergence, extra):
    h, w, b, th, tw, labels = inputs(n=7, hdim=3, vocab=6, seed=12, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]

    kw = dict(
        options=DistillationOptions(kd=KDOptions(divergence, 1.5, **extra)), execution=ExecutionOptions("recompute")
    )

    def fn(hh, ww, bb):
        return linear_distillation_loss(hh, ww, th, tw, labels, student_bias=bb, chunk_size=3, **kw).loss

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves)


# ------------------------------------------------------------------- the step's token count


def test_num_tokens_scales_in_fp32_before_the_bf16_cast():
    h, w, b, th, tw, labels = inputs(n=150, hdim=32, vocab=512, seed=13)
    count = 3 * int((labels != -100).sum())
    ref = ref_ce(F.linear(h.double(), w.double(), b.double()), labels, reduction="sum") / count
    got = linear_cross_entropy(h, w, labels, bias=b, num_tokens=torch.tensor(count), chunk_size=16)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    got_n = linear_distillation_loss(h, w, th, tw, labels, student_bias=b, num_tokens=count).loss
    got_1 = linear_distillation_loss(h, w, th, tw, labels, student_bias=b, reduction="sum").loss / count
    torch.testing.assert_close(got_n, got_1)
    with pytest.raises(ValueError, match="num_tokens"):
        linear_cross_entropy(h, w, labels, reduction="sum", num_tokens=count)


def test_scale_multiplies_the_sum_before_the_cast():
    h, w, b, th, tw, labels = inputs(n=150, hdim=32, vocab=512, seed=14)
    h, w, b = (t.bfloat16() for t in (h, w, b))
    count = torch.tensor(2 * int((labels != -100).sum()))
    grads = []
    for kw in (dict(num_tokens=count), dict(reduction="sum", scale=1.0 / count.double())):
        hh = h.clone().requires_grad_()
        loss = linear_cross_entropy(hh, w, labels, bias=b, chunk_size=16, **object_form("ce", **kw))
        loss.backward()
        grads.append((loss.detach(), hh.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="scale"):
        linear_cross_entropy(h, w, labels, scale=0.5)
