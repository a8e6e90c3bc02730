"""The Triton log-probability and divergence chunk kernels (``tune_losses.kernels.triton_terms``) and
the kernel selection, against the fp64 full-logits reference: under ``TRITON_INTERPRET=1`` on CPU
tensors (tiny odd shapes, blocks forced small so that several vocabulary blocks run), and on CUDA
(``gpu`` marker; skipped without a GPU).

bf16: values are compared with the fp64 math of the same (rounded) logits; the gradient, rounded to
bf16 once, must be no further from fp64 than the eager chunk math's gradient rounded to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from kernel_spy import spy
from reference import make_labels, ref_ce, ref_kd, ref_log_probs

from tune_losses.divergences import ChunkRun, VocabReducer, ce_chunk, kd_chunk, log_prob_chunk
from tune_losses.fused.engine import LossPlan, run_terms
from tune_losses.fused.functional import linear_distillation_loss, linear_kd_loss, linear_log_probs
from tune_losses.kernels import triton_select, triton_terms
from tune_losses.options import CEOptions, DistillationOptions, ExecutionOptions, KDOptions
from tune_losses.terms import CrossEntropyTerm, DivergenceTerm, LogProbTerm, Term, TokenStatsTerm

triton = pytest.importorskip("triton")
INTERPRETED = type(triton.language.sum).__name__ == "InterpretedFunction"
# Triton's interpreter evaluates both sides of tl.where with numpy (NaN from the unselected side warns).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
on_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (and Triton not interpreted)"
)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
VALUE_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for this test (CPU tensors)."""
    if not INTERPRETED:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def logits(n, v, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)


def token_weights(labels, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(labels.shape, generator=g, dtype=torch.float64) + 0.5
    return torch.where(labels.cpu() != -100, w, 0.0).to(labels.device)


def grad_close(got, want64, eager_rounded, dtype):
    """fp32: close to fp64. bf16: no further from fp64 than eager's gradient rounded to bf16."""
    got, want64 = got.cpu().double(), want64.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want64, atol=1e-5, rtol=1e-5)
        return
    err = (got - want64).abs().max().item()
    eager_err = (eager_rounded.cpu().double() - want64).abs().max().item()
    assert err <= 1.5 * eager_err + 1e-6, f"bf16 gradient error {err:.3g} > 1.5 x eager's {eager_err:.3g}"


# ------------------------------------------------------------------------------------ log-probs


def check_log_probs(dtype, ignore, temperature, entropy, n=5, v=67, block=32, w_lp=True, device="cpu"):
    z = logits(n, v, dtype, 3, device)
    g = torch.Generator().manual_seed(4)
    labels = make_labels((n,), v, ignore, g).to(device)
    wl = token_weights(labels, 5) if w_lp else None
    wh = token_weights(labels, 6) - 0.25 * (labels != -100).to(device) if entropy else None
    z64 = z.detach().cpu().double().requires_grad_()
    lp_ref, h_ref = ref_log_probs(z64, labels.cpu(), temperature=temperature)
    total = (lp_ref * wl.cpu()).sum() if w_lp else lp_ref.sum() * 0
    if entropy:
        total = total + (h_ref * wh.cpu()).sum()
    (want_g,) = torch.autograd.grad(total, z64)
    buf = z.clone()
    outs = triton_terms.log_prob_chunk_triton(
        buf, labels, temperature, -100, entropy, None if wl is None else wl.float(), None if wh is None else wh.float(),
        block=block,
    )  # fmt: skip
    assert len(outs) == (2 if entropy else 1) and buf.dtype == dtype
    torch.testing.assert_close(outs[0].cpu().double(), lp_ref.detach(), **VALUE_TOL)
    if entropy:
        torch.testing.assert_close(outs[1].cpu().double(), h_ref.detach(), **VALUE_TOL)
    eager = None
    if dtype != torch.float32:
        valid = labels != -100
        ws = (None if wl is None else wl.float(), None if wh is None else wh.float())
        _, g_eager = log_prob_chunk(z.float(), labels, valid, temperature, VocabReducer(v), entropy, ws)
        eager = g_eager.to(dtype)
    grad_close(buf, want_g, eager, dtype)


@DTYPES
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (2.0, True)], ids=["T1-logp", "T2-logp+entropy"])
def test_log_prob_kernel_matches_fp64(dtype, ignore, temperature, entropy, interpret):
    # V = 67 in blocks of 32: three blocks per sweep, the last one partial.
    check_log_probs(dtype, ignore, temperature, entropy)


@pytest.mark.parametrize(
    "n,v,block,dtype", [(3, 300, 64, torch.float32), (13, 101, 64, torch.float16)], ids=["fp32", "fp16"]
)
def test_log_prob_kernel_odd_shapes_entropy_weight_only(n, v, block, dtype, interpret):
    check_log_probs(dtype, "some", 2.0, True, n=n, v=v, block=block, w_lp=False)


def test_log_prob_values_only_leave_the_logits(interpret):
    z = logits(7, 45, torch.float32, 1)
    labels = make_labels((7,), 45, "some", torch.Generator().manual_seed(2))
    buf = z.clone()
    lp, h = triton_terms.log_prob_chunk_triton(buf, labels, 1.0, -100, True, block=16)
    assert torch.equal(buf, z)
    want_lp, want_h = ref_log_probs(z.double(), labels)
    torch.testing.assert_close(lp.double(), want_lp, **VALUE_TOL)
    torch.testing.assert_close(h.double(), want_h, **VALUE_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_prob_gradient_from_stored_lse(dtype, interpret):
    """Values first (with the logsumexp), then the gradient sweep alone: the same bits as one call."""
    z = logits(7, 83, dtype, 41)
    labels = make_labels((7,), 83, "some", torch.Generator().manual_seed(42))
    w_lp, w_h = token_weights(labels, 43).float(), token_weights(labels, 44).float()
    one = z.clone()
    lp, h = triton_terms.log_prob_chunk_triton(one, labels, 2.0, -100, True, w_lp, w_h, block=32)
    two = z.clone()
    lp2, h2, lse = triton_terms.log_prob_chunk_triton(two, labels, 2.0, -100, True, block=32, return_lse=True)
    assert torch.equal(two, z) and torch.equal(lp, lp2) and torch.equal(h, h2)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.double() / 2, -1), atol=1e-5, rtol=1e-5)
    out = triton_terms.log_prob_grad_triton(two, labels, 2.0, -100, lse, w_lp, w_h, entropy=h2, block=32)
    assert out is two and torch.equal(two, one)


def test_log_prob_masked_and_non_finite(interpret):
    z = logits(9, 37, torch.float32, 7)
    labels = make_labels((9,), 37, "some", torch.Generator().manual_seed(8))
    assert labels[0] == -100 and labels[-1] != -100
    z[0, 3] = float("nan")  # an ignored token: values 0, gradient 0
    z[-1, 5] = float("nan")  # a counted token: NaN
    z[-2, 6] = float("inf")  # a counted token: NaN
    z[1, :4] = float("-inf")  # masked entries: probability 0, finite values
    labels[1] = 10
    w = token_weights(labels, 9).float()
    buf = z.clone()
    lp, h = triton_terms.log_prob_chunk_triton(buf, labels, 2.0, -100, True, w, w, block=16)
    assert lp[0] == 0 and h[0] == 0 and torch.all(buf[0] == 0)
    if labels[-2] != -100:
        assert torch.isnan(lp[-2]) and torch.isnan(h[-2])
    assert torch.isnan(lp[-1]) and torch.isnan(h[-1])
    keep = (torch.arange(9) > 0) & (torch.arange(9) < 7)  # eager leaves NaN at ignored row 0 (weight 0)
    (want_lp, want_h), want_g = log_prob_chunk(
        z[keep].double(), labels[keep], labels[keep] != -100, 2.0, VocabReducer(37), True, (w[keep].double(),) * 2
    )
    torch.testing.assert_close(lp[keep].double(), want_lp, **VALUE_TOL)
    torch.testing.assert_close(h[keep].double(), want_h, **VALUE_TOL)
    torch.testing.assert_close(buf[keep].double(), want_g, atol=1e-5, rtol=1e-5)
    assert torch.all(buf[1, :4] == 0)


# ---------------------------------------------------------------------------------- divergences

# (divergence, KDOptions fields): JSD's limits beta = 0 / 1 run as forward / reverse KL (forward KL
# itself: tests/test_kernels_triton.py).
DIVS = [
    ("jsd", {"beta": 0.0}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"sym_kd_ratio": 0.3}),
    ("symmetric_kl", {"sym_kd_ratio": 0.7, "true_kl": False}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
]
DIV_IDS = ["jsd-b0", "rkl", "sym", "sym-torchtune", "jsd", "jsd-b1", "tvd"]


def check_divergence(divergence, fields, dtype, ignore, temperature, ce, n=5, v=67, block=32, device="cpu"):
    """``ce``: None (the divergence alone) or the cross-entropy's options as a dict."""
    zs, zt = logits(n, v, dtype, 11, device), logits(n, v, dtype, 12, device) * 1.5
    labels = make_labels((n,), v, ignore, torch.Generator().manual_seed(13)).to(device)
    w_ce, w_kd = token_weights(labels, 14), token_weights(labels, 15)
    kd = KDOptions(divergence=divergence, temperature=temperature, **fields)
    zs64 = zs.detach().cpu().double().requires_grad_()
    ref_kd_tok = ref_kd(zs64, zt.cpu().double(), labels.cpu(), divergence=divergence, temperature=temperature,
                        reduction="none", **fields)  # fmt: skip
    total = (ref_kd_tok * w_kd.cpu()).sum()
    if ce is not None:
        ref_ce_tok = ref_ce(zs64, labels.cpu(), reduction="none", **ce)
        total = total + (ref_ce_tok * w_ce.cpu()).sum()
    (want_g,) = torch.autograd.grad(total, zs64)
    buf = zs.clone()
    ce_opts = None if ce is None else CEOptions(**ce)
    ce_val, kd_val = triton_terms.divergence_chunk_triton(
        buf, zt, labels, kd, -100, ce_opts, w_ce.float() if ce is not None else None, w_kd.float(), block=block
    )
    torch.testing.assert_close(kd_val.cpu().double(), ref_kd_tok.detach(), **VALUE_TOL)
    if ce is not None:
        torch.testing.assert_close(ce_val.cpu().double(), ref_ce_tok.detach(), **VALUE_TOL)
    else:
        assert torch.all(ce_val == 0)
    eager = None
    if dtype != torch.float32:
        _, g_eager = kd_chunk(zs.float(), zt.float(), kd, ChunkRun(VocabReducer(v), w_kd.float()))
        if ce_opts is not None:
            valid = labels != -100
            _, g_ce = ce_chunk(zs.float(), labels, valid, ce_opts, ChunkRun(VocabReducer(v), w_ce.float()))
            g_eager = g_eager + g_ce
        eager = g_eager.to(dtype)
    grad_close(buf, want_g, eager, dtype)


@DTYPES
@pytest.mark.parametrize("temperature,ce", [(1.0, None), (2.0, {})], ids=["T1-kd", "T2-ce+kd"])
@pytest.mark.parametrize("divergence,fields", DIVS, ids=DIV_IDS)
def test_divergence_kernel_matches_fp64(divergence, fields, dtype, temperature, ce, interpret):
    check_divergence(divergence, fields, dtype, "some", temperature, ce)


@pytest.mark.parametrize(
    "divergence,temperature,ce",
    [
        ("forward_kl", 1.0, {"label_smoothing": 0.1, "z_loss": 1e-3}),  # the student's statistics shared
        ("jsd", 2.0, {"label_smoothing": 0.2}),
        ("tvd", 1.0, {"softcap": 2.5}),  # softcapped CE, raw logits for the divergence
        ("reverse_kl", 2.0, {"softcap": 3.0, "z_loss": 1e-2}),
    ],
    ids=["fkl-eps-z", "jsd-eps", "tvd-softcap", "rkl-softcap-z"],
)
def test_divergence_kernel_with_ce_options(divergence, temperature, ce, interpret):
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if divergence == "jsd" else ())
    for dtype in dtypes:
        check_divergence(divergence, {}, dtype, "some", temperature, ce)


@pytest.mark.parametrize(
    "divergence,ignore,temperature,ce,n,v,block",
    [
        ("symmetric_kl", "none", 1.0, {}, 3, 300, 128),  # CE sharing the student's statistics (T = 1)
        ("jsd", "all", 2.0, {}, 3, 300, 128),
        ("tvd", "none", 2.0, None, 13, 101, 64),
        ("reverse_kl", "all", 1.0, None, 7, 83, 64),
    ],
)
def test_divergence_kernel_shapes_and_ignored(divergence, ignore, temperature, ce, n, v, block, interpret):
    check_divergence(divergence, {}, torch.float32, ignore, temperature, ce, n=n, v=v, block=block)


def test_divergence_values_only_leave_the_logits(interpret):
    zs, zt = logits(7, 45, torch.float32, 1), logits(7, 45, torch.float32, 2)
    labels = make_labels((7,), 45, "some", torch.Generator().manual_seed(3))
    for div in ("reverse_kl", "jsd", "tvd"):
        buf = zs.clone()
        ce, kd = triton_terms.divergence_chunk_triton(
            buf, zt, labels, KDOptions(divergence=div), -100, CEOptions(), block=16
        )
        assert torch.equal(buf, zs)
        want = ref_kd(zs.double(), zt.double(), labels, divergence=div, reduction="none")
        torch.testing.assert_close(kd.double(), want, **VALUE_TOL)


@pytest.mark.parametrize("divergence,fields", DIVS, ids=DIV_IDS)
def test_divergence_kernel_masked_and_non_finite(divergence, fields, interpret):
    """-inf logits are masked entries (as the eager math counts them); NaN / +inf at a counted token
    gives NaN, at an ignored token 0 with a zero gradient."""
    zs, zt = logits(9, 37, torch.float32, 21), logits(9, 37, torch.float32, 22)
    labels = make_labels((9,), 37, "some", torch.Generator().manual_seed(23))
    assert labels[0] == -100 and labels[-1] != -100
    labels[-2] = 1
    zt[2, :5] = float("-inf")  # teacher entries masked
    zs[3, 4] = float("-inf")  # a student entry masked
    zs[4, 6] = zt[4, 6] = float("-inf")  # both sides
    zs[0, 1] = float("nan")  # an ignored token
    zs[-1, 0] = float("nan")  # counted tokens
    zt[-2, 3] = float("inf")
    kd = KDOptions(divergence=divergence, temperature=2.0, **fields)
    w = token_weights(labels, 24).float()
    buf = zs.clone()
    ce, val = triton_terms.divergence_chunk_triton(buf, zt, labels, kd, -100, CEOptions(), w, w, block=16)
    assert val[0] == 0 and ce[0] == 0 and torch.all(buf[0] == 0)
    assert torch.isnan(val[-1]) and torch.isnan(ce[-1]) and torch.isnan(val[-2])
    keep = (torch.arange(9) < 7) & (labels != -100)
    want, want_g = kd_chunk(zs[keep].double(), zt[keep].double(), kd, ChunkRun(VocabReducer(37), w[keep].double()))
    torch.testing.assert_close(val[keep].double(), want, **VALUE_TOL)
    z64 = zs[keep].double()  # (the reference's CE is NaN at -inf logits: logsumexp here)
    want_ce = torch.logsumexp(z64, -1) - z64.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ce[keep].double(), want_ce, **VALUE_TOL)
    q = torch.softmax(zs[keep].double(), -1)
    want_g = want_g + (q - F.one_hot(labels[keep], 37)) * w[keep].double().unsqueeze(-1)
    torch.testing.assert_close(buf[keep].double(), want_g, atol=1e-5, rtol=1e-5)


def test_wider_teacher_columns_are_not_read(interpret):
    """``teacher_vocab="drop"``: the engine's teacher buffer is wider than the student's; the kernel
    reads the first V columns of each row (its row stride is the teacher's)."""
    zs, zt = logits(5, 37, torch.float32, 31), logits(5, 45, torch.float32, 32)
    labels = make_labels((5,), 37, "some", torch.Generator().manual_seed(33))
    w = token_weights(labels, 34).float()
    kd = KDOptions(divergence="jsd", temperature=2.0, teacher_vocab="drop")
    got, want = zs.clone(), zs.clone()
    ce, val = triton_terms.divergence_chunk_triton(got, zt, labels, kd, -100, CEOptions(), w, w, block=16)
    ce2, val2 = triton_terms.divergence_chunk_triton(
        want, zt[:, :37].contiguous(), labels, kd, -100, CEOptions(), w, w, block=16
    )
    assert torch.equal(val, val2) and torch.equal(ce, ce2) and torch.equal(got, want)


# ------------------------------------------------------------------------------------ selection


class _Sharded(VocabReducer):
    distributed = True


def test_selection(interpret, monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_TRITON", "1")
    cpu = torch.device("cpu")

    def pick(terms, reducer=None, dtype=torch.bfloat16):
        return triton_select.triton_chunk_math(terms, reducer, cpu, dtype, -100)

    ce, lp = CrossEntropyTerm(), LogProbTerm(temperature=2.0, entropy=True)
    kds = [DivergenceTerm(KDOptions(divergence=d)) for d in ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd")]
    for terms in [(ce,), (lp,)] + [(t,) for t in kds] + [(ce, t) for t in kds]:
        assert pick(terms) is not None, terms
    assert pick((CrossEntropyTerm(CEOptions(label_smoothing=0.1, softcap=3.0)), kds[1])) is not None
    assert pick((kds[1], CrossEntropyTerm())) is None  # (the engine's order is CE first)
    assert pick((kds[3],), dtype=torch.float64) is None  # fp64 math for gradcheck
    assert pick((lp,), reducer=_Sharded(10)) is None  # vocabulary parallel
    assert pick((DivergenceTerm(KDOptions(divergence="jsd", teacher_vocab="pad_student")),)) is None
    assert pick((TokenStatsTerm(),)) is None
    monkeypatch.setenv("TUNE_LOSSES_TRITON", "0")
    assert pick((lp,)) is None


# ----------------------------------------------------------------------------- through the engine


def _same_both_ways(monkeypatch, run, kernels, calls, tol):
    """``run()`` (a tuple of tensors) with the Triton path off, then on (``TUNE_LOSSES_TRITON``):
    on, each ``triton_terms`` entry point named in ``kernels`` runs ``calls`` times (off, never);
    the two results agree within ``tol``. Returns the Triton path's results and the logits dtypes
    its kernels saw (per entry point)."""
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("TUNE_LOSSES_TRITON", mode)
        seen = [spy(monkeypatch, triton_terms, name) for name in kernels]
        results.append(run())
        assert [len(s) for s in seen] == [calls if mode == "1" else 0] * len(kernels)
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b.double(), **tol)
    return results[1], seen


def _linear_case(seed, n=11, h=8, v=29, ht=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    tx = torch.randn(n, ht, generator=g, dtype=torch.float64)
    tw = torch.randn(v, ht, generator=g, dtype=torch.float64) / ht**0.5 * 2
    return x, w, tx, tw, make_labels((n,), v, "some", g)


def test_distillation_loss_jsd_through_the_kernel(interpret, monkeypatch):
    """linear_distillation_loss with JSD: ``TUNE_LOSSES_TRITON=1`` runs every chunk through the
    kernel and matches the default path and the fp64 reference."""
    x, w, tx, tw, labels = _linear_case(31)
    opts = DistillationOptions(kd_ratio=0.4, kd=KDOptions(divergence="jsd", beta=0.3, temperature=2.0))
    execution = ExecutionOptions(dw_accumulation="fp32")

    def run():
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        out = linear_distillation_loss(xs, ws, tx.float(), tw.float(), labels, chunk_size=4, options=opts,
                                       execution=execution)  # fmt: skip
        out.loss.backward()
        return out.loss.detach(), xs.grad, ws.grad

    got, _ = _same_both_ways(monkeypatch, run, ["divergence_chunk_triton"], 3, dict(atol=1e-5, rtol=1e-5))
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    z, zt = F.linear(x64, w64), F.linear(tx, tw)
    ref = 0.4 * ref_kd(z, zt, labels, divergence="jsd", beta=0.3, temperature=2.0) + 0.6 * ref_ce(z, labels)
    ref.backward()
    for a, b in zip(got, (ref.detach(), x64.grad, w64.grad)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_kd_loss_alone_through_the_kernel(interpret, monkeypatch):
    """linear_kd_loss (one divergence term, bf16) with TVD at T = 2: the kernel's path matches the default one."""
    x, w, tx, tw, labels = _linear_case(37)
    opts = KDOptions(divergence="tvd", temperature=2.0)

    def run():
        xs, ws = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
        loss = linear_kd_loss(xs, ws, tx.bfloat16(), tw.bfloat16(), labels, chunk_size=4, options=opts,
                              execution=ExecutionOptions(dw_accumulation="fp32"))  # fmt: skip
        loss.backward()
        return loss.detach(), xs.grad, ws.grad

    _same_both_ways(monkeypatch, run, ["divergence_chunk_triton"], 3, dict(atol=1e-2, rtol=1e-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_log_probs_through_the_kernel(dtype, interpret, monkeypatch):
    """linear_log_probs with the entropy, both outputs differentiated (the recompute path)."""
    x, w, _, _, labels = _linear_case(41, n=13)

    def run():
        xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        lp, ent = linear_log_probs(
            xs, ws, labels, temperature=2.0, return_entropy=True, chunk_size=4, dw_accumulation="fp32"
        )
        (lp.float() * 0.7 - 0.3 * ent.float()).sum().backward()
        return lp.detach(), ent.detach(), xs.grad, ws.grad

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    _, (calls,) = _same_both_ways(monkeypatch, run, ["log_prob_chunk_triton"], 8, tol)  # 4 chunks, fwd and bwd
    assert all(c == dtype for c in calls)


@dataclass(frozen=True)
class _RatioTerm(Term):
    """A policy-like term over the label's log-probability: ``-adv * exp(log q[y] - old)`` per token
    (``adv``, ``old`` per-token side inputs); ``d value / d log q[y] = value``. Its Triton math uses
    the log-prob kernel twice: values, then the gradient for the formula's per-token weight."""

    temperature: float = 2.0
    name: str = "ratio"
    compilable = False

    def _value(self, lp, inputs, valid):
        ratio = torch.exp(lp - inputs["old"].to(lp.dtype))
        return torch.where(valid, -inputs["adv"].to(lp.dtype) * ratio, 0.0)

    def compute(self, chunk, weights, consume_student, consume_teacher):
        red, t = chunk.reducer, self.temperature
        (lp,), _ = log_prob_chunk(chunk.student, chunk.labels, chunk.valid, t, red)
        value = self._value(lp, chunk.inputs, chunk.valid)
        if weights is None or weights[0] is None:
            return (value,), None
        (_,), g = log_prob_chunk(chunk.student, chunk.labels, chunk.valid, t, red, weights=(weights[0] * value, None))
        return (value,), g

    def triton_chunk_math(self, ignore_index):
        def run(z, zt, labels, weights, inputs=None):
            t = self.temperature
            lp, lse = triton_terms.log_prob_chunk_triton(z, labels, t, ignore_index, return_lse=True)
            value = self._value(lp, inputs, labels != ignore_index)
            w = None if weights[0] is None else weights[0][0]
            if w is None:
                return [value], None
            return [value], triton_terms.log_prob_grad_triton(z, labels, t, ignore_index, lse, w_lp=w * value)

        return run


def test_a_term_of_its_own_through_the_log_prob_kernel(interpret, monkeypatch):
    """A term defining ``triton_chunk_math`` (an alignment-style formula over log q[y]) runs through
    the engine's Triton path with its side inputs, matching its eager math."""
    x, w, _, _, labels = _linear_case(51)
    g = torch.Generator().manual_seed(52)
    inputs = {"old": -torch.rand(11, generator=g) * 3, "adv": torch.randn(11, generator=g)}
    plan = LossPlan(terms=(_RatioTerm(),), chunk_size=4, dw_accumulation="fp32")

    def run():
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        loss, _ = run_terms(
            xs, ws, None, labels, None, None, None, plan, per_token=False, recompute=False, inputs=inputs
        )
        loss.backward()
        return loss.detach(), xs.grad, ws.grad

    kernels = ["log_prob_chunk_triton", "log_prob_grad_triton"]  # 3 chunks: values, then the gradient
    _same_both_ways(monkeypatch, run, kernels, 3, dict(atol=1e-5, rtol=1e-5))


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_prob_kernel_on_cuda(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_log_probs(dtype, "some", 2.0, True, n=64, v=50257, block=None, device="cuda")


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence,fields", DIVS, ids=DIV_IDS)
def test_divergence_kernel_on_cuda(divergence, fields, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_divergence(divergence, fields, dtype, "some", 2.0, {}, n=64, v=50257, block=None, device="cuda")
