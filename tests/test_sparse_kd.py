"""Distillation from a cached sparse teacher (``linear_sparse_kd_loss`` and its composition with CE)
against an fp64 full-logits reference written here: the student's dense ``log_softmax`` over the
whole vocabulary, gathered at the teacher's ids, and autograd for the gradients.
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks
from reference import make_labels
from torch.utils._python_dispatch import TorchDispatchMode

import tune_losses as tl
from tune_losses import SparseDistillationLoss, linear_kd_loss, linear_sparse_distillation_loss, linear_sparse_kd_loss
from tune_losses.fused import compiled
from tune_losses.options import ExecutionOptions, KDOptions, SparseKDOptions, VocabParallelOptions

REDUCTIONS = ("mean", "sum", "none")
TAILS = ("renormalize", "bucket")
TOL = dict(rtol=2e-5, atol=2e-6)  # fp32 fused vs the fp64 reference


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "0")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ reference


def ref_sparse_kd(logits, labels, ids, logprobs, *, temperature=1.0, tail="renormalize", reduction="mean"):
    """``T^2 KD`` per token from full logits ``[..., V]`` in their dtype, reduced like the losses.

    Renormalize: ``sum_K p~ (log p~ - log q)``, ``p~ = softmax`` of the used log-probabilities.
    Bucket: ``sum_K p (log p - log q) + p_tail (log p_tail - log q_tail)``, ``p_tail = max(1 - sum p, 0)``,
    ``q_tail = 1 - sum_K q`` (0 when the ids cover the vocabulary). Unused slots: id -1.
    """
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)
    ids = ids.reshape(-1, ids.shape[-1]).long()
    lp = logprobs.reshape(ids.shape).to(z.dtype)
    valid = labels.reshape(-1) != -100
    used = (ids >= 0) & valid.unsqueeze(-1)
    log_q = torch.log_softmax(z / temperature, dim=-1).gather(-1, ids.clamp(min=0))
    if tail == "renormalize":
        log_p = torch.log_softmax(lp.masked_fill(~used, float("-inf")), dim=-1)
        p = torch.where(used, log_p.exp(), 0.0)
        kd = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    else:
        p = torch.where(used, lp.exp(), 0.0)
        head = torch.where(p > 0, p * (lp - log_q), 0.0).sum(-1)
        q_tail = 1 - torch.where(used, log_q.exp(), 0.0).sum(-1)
        p_tail = (1 - p.sum(-1)).clamp(min=0)
        has_tail = used.sum(-1) < vocab
        tail_kd = torch.where((p_tail > 0) & has_tail, p_tail * (p_tail.log() - q_tail.log()), 0.0)
        kd = head + tail_kd
    per_token = torch.where(valid, kd * temperature**2, 0.0)
    if reduction == "none":
        return per_token.reshape(labels.shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)


def make_case(lead, hidden, vocab, k, *, seed=0, bias=False, ignore="some", temperature=1.0, unused=True):
    """Student ``hidden [*lead, H]``, ``weight [V, H]``, bias; labels; the teacher's top-k ids and
    log-probabilities at ``temperature`` (some tokens with trailing unused slots)."""
    g = gen(seed)
    h = torch.randn(*lead, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = make_labels(lead, vocab, ignore, g)
    teacher = torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * 2.5
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(k, dim=-1)
    if unused:
        short = torch.rand(lead, generator=g) < 0.4  # these tokens keep only their first k // 2 entries
        slots = torch.arange(k) >= k // 2
        drop = short.unsqueeze(-1) & slots
        ids = ids.masked_fill(drop, -1)
        lp = lp.masked_fill(drop, 3.0)  # an unused slot's value is never read (even if positive)
    return h, w, b, labels, ids, lp.float(), teacher


def run_both(h, w, b, labels, ids, lp, *, dtype=torch.float32, seed=5, **kw):
    """The fused loss and the fp64 reference with their gradients (same per-token grad_output);
    ``temperature`` and ``tail`` go into the loss's SparseKDOptions."""

    def leaves(dt):
        return [None if t is None else t.detach().to(dt).clone().requires_grad_() for t in (h, w, b)]

    lf, lr = leaves(dtype), leaves(torch.float64)
    term = {k: kw.pop(k) for k in ("temperature", "tail") if k in kw}
    out = linear_sparse_kd_loss(lf[0], lf[1], labels, ids, lp, bias=lf[2], options=SparseKDOptions(**term), **kw)
    ref_kw = {**term, **{k: v for k, v in kw.items() if k == "reduction"}}
    ref = ref_sparse_kd(F.linear(lr[0], lr[1], lr[2]), labels, ids, lp.double(), **ref_kw)
    go = None
    if out.dim():
        go = torch.rand(out.shape, generator=gen(seed), dtype=torch.float64) * 2 - 0.5
    out.backward(None if go is None else go.to(out.dtype))
    ref.backward(go)
    return out, ref, lf, lr


# --------------------------------------------------------------------------------- values, gradients


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (2.0, True)])
@pytest.mark.parametrize("ignore", ["none", "some"])
def test_matches_full_logits_reference(eager, tail, reduction, temperature, bias, ignore):
    h, w, b, labels, ids, lp, _ = make_case((3, 7), 16, 53, 6, bias=bias, ignore=ignore, temperature=temperature)
    out, ref, lf, lr = run_both(
        h, w, b, labels, ids, lp, temperature=temperature, tail=tail, reduction=reduction, chunk_size=8
    )
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.detach(), **TOL)
    for got, want in zip(lf, lr):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("algorithm", ["grad_in_forward", "recompute"])
def test_flat_tokens_int32_ids_and_algorithms(eager, tail, algorithm):
    h, w, b, labels, ids, lp, _ = make_case((29,), 8, 31, 5, seed=3, bias=True)
    out, ref, lf, lr = run_both(
        h, w, b, labels, ids.int(), lp.half(), tail=tail, execution=ExecutionOptions(algorithm), chunk_size=7,
        reduction="sum",
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref.detach(), **TOL)
    for got, want in zip(lf, lr):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_is_zero_with_zero_gradients(eager, tail, reduction):
    h, w, b, labels, ids, lp, _ = make_case((2, 5), 8, 20, 4, bias=True, ignore="all")
    lp[0, 0, 0] = float("nan")  # an ignored token's cached values are never read
    out, ref, lf, _ = run_both(h, w, b, labels, ids, lp, tail=tail, reduction=reduction)
    assert torch.equal(out.detach(), torch.zeros_like(out))
    for t in lf:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("tail", TAILS)
def test_bf16_no_worse_than_eager_bf16(eager, tail):
    """bf16 inputs: the fused loss's errors against the fp64 truth stay within eager bf16 PyTorch's
    (logits made in bf16, the loss math in fp32, autograd into bf16 leaves) plus a small margin."""
    h, w, b, labels, ids, lp, _ = make_case((4, 9), 32, 67, 8, seed=7, bias=True, temperature=2.0)
    out, ref, lf, lr = run_both(
        h, w, b, labels, ids, lp, dtype=torch.bfloat16, temperature=2.0, tail=tail, chunk_size=16
    )
    le = [t.detach().to(torch.bfloat16).clone().requires_grad_() for t in (h, w, b)]
    eager_out = ref_sparse_kd(F.linear(*le).float(), labels, ids, lp, temperature=2.0, tail=tail)
    eager_out.backward()
    assert [t.grad.dtype for t in lf] == [torch.bfloat16] * 3

    def err(a, r):
        return (a.double() - r).abs().max().item()

    assert err(out.detach(), ref.detach()) <= 2 * err(eager_out.detach(), ref.detach()) + 1e-3
    for got, base, want in zip(lf, le, lr):
        assert err(got.grad, want.grad) <= 2 * err(base.grad, want.grad) + 1e-4


@pytest.mark.parametrize("tail", TAILS)
def test_sampled_cache(eager, tail):
    """A sampled cache: k draws from the teacher, repeats collapsed into one id with log(count / k)."""
    h, w, b, labels, _, _, teacher = make_case((5, 6), 8, 41, 4, seed=11)
    k = 16
    probs = torch.softmax(teacher.reshape(-1, 41), -1)
    draws = torch.multinomial(probs, k, replacement=True, generator=gen(12))
    ids = torch.full((probs.shape[0], k), -1, dtype=torch.long)
    lp = torch.zeros(probs.shape[0], k)
    for row, d in enumerate(draws):
        uniq, counts = d.unique(return_counts=True)
        ids[row, : len(uniq)] = uniq
        lp[row, : len(uniq)] = (counts.double() / k).log().float()
    ids, lp = ids.reshape(5, 6, k), lp.reshape(5, 6, k)
    assert (ids == -1).any(), "the draws should repeat ids (unused slots then remain)"
    out, ref, lf, lr = run_both(h, w, b, labels, ids, lp, tail=tail, chunk_size=8)
    torch.testing.assert_close(out.double(), ref.detach(), **TOL)
    for got, want in zip(lf[:2], lr[:2]):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
def test_full_support_equals_dense_forward_kl(eager, temperature, tail):
    """k = V with the teacher's whole log_softmax: both tails equal linear_kd_loss's true forward KL
    on the teacher's logits (the bucket's tail is empty)."""
    vocab, hdim = 37, 12
    h, w, _, labels, _, _, _ = make_case((3, 5), hdim, vocab, 2, seed=21)
    g = gen(22)
    th, tw = torch.randn(3, 5, hdim, generator=g), torch.randn(vocab, hdim, generator=g) * 0.6
    teacher_lp = torch.log_softmax(F.linear(th, tw) / temperature, -1)
    ids = torch.randperm(vocab, generator=g).expand(3, 5, vocab).contiguous()  # any order of the V ids
    lp = teacher_lp.gather(-1, ids)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    options = SparseKDOptions(temperature, tail)
    sparse = linear_sparse_kd_loss(hs, ws, labels, ids, lp, chunk_size=4, options=options)
    sparse.backward()
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    dense = linear_kd_loss(hd, wd, th, tw, labels, chunk_size=4, options=KDOptions(temperature=temperature))
    dense.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad, hd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad, wd.grad, rtol=1e-4, atol=1e-6)


def test_bucket_tail_is_exact_when_the_student_tail_is_tiny(eager):
    """``q_tail`` is summed over the columns outside K, not taken as ``1 - sum_K q``: with the
    student's mass almost all on K (q_tail ~ 4e-10, below fp32's resolution of 1) the tail term
    and its gradient ``q_j p_tail / q_tail`` off K are still right in fp32."""
    vocab, k = 50, 4
    h = torch.eye(8)[:6]  # token i's logits are row i of w.T
    w = torch.zeros(vocab, 8)
    w[:k, :] = 24.0  # the first k ids get logit 24, the rest 0: q_tail = 46 e^-24 / (4 + 46 e^-24)
    ids = torch.arange(k).expand(6, k).contiguous()
    lp = torch.full((6, k), 0.2).log()  # p_tail = 0.2
    labels = torch.zeros(6, dtype=torch.long)
    out, ref, lf, lr = run_both(h, w, None, labels, ids, lp, tail="bucket")
    assert ref > 3.5  # the tail term 0.2 log(0.2 / 4e-10) dominates
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(lf[1].grad.double(), lr[1].grad, rtol=1e-4, atol=1e-7)


def test_non_finite_teacher_value_at_a_counted_token(eager):
    for tail in TAILS:
        h, w, _, labels, ids, lp, _ = make_case((9,), 8, 20, 4, seed=2, ignore="none", unused=False)
        lp[3, 1] = float("nan")
        options = SparseKDOptions(tail=tail)
        out = linear_sparse_kd_loss(h, w, labels, ids, lp, reduction="none", options=options)
        assert out[3].isnan() and out[torch.arange(9) != 3].isfinite().all()
        lp[3, 1] = float("-inf")  # probability 0: a finite value
        assert linear_sparse_kd_loss(h, w, labels, ids, lp, options=options).isfinite()


def test_drop_ignored_tokens_and_num_tokens(eager):
    h, w, b, labels, ids, lp, _ = make_case((4, 6), 8, 30, 5, seed=4, bias=True)
    base = linear_sparse_kd_loss(h, w, labels, ids, lp, bias=b, reduction="sum")
    dropped = linear_sparse_kd_loss(
        h, w, labels, ids, lp, bias=b, reduction="sum", execution=ExecutionOptions(drop_ignored_tokens=True)
    )
    torch.testing.assert_close(dropped, base)
    per_token = linear_sparse_kd_loss(
        h, w, labels, ids, lp, bias=b, reduction="none", execution=ExecutionOptions(drop_ignored_tokens=True)
    )
    torch.testing.assert_close(per_token.sum(), base)
    torch.testing.assert_close(linear_sparse_kd_loss(h, w, labels, ids, lp, bias=b, num_tokens=100), base / 100)


@pytest.mark.parametrize("compile_mode", ["0", pytest.param("1", marks=pytest.mark.slow)])  # compiling: ~1 min
def test_compiled_and_eager_chunk_math(monkeypatch, compile_mode):
    """Both tails in one distillation call and alone, compiled (padded last chunk) and eager."""
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", compile_mode)
    monkeypatch.setattr(compiled, "_BROKEN", [])
    h, w, b, labels, ids, lp, _ = make_case((37,), 8, 40, 5, seed=9, bias=True)
    for tail in TAILS:
        out, ref, lf, lr = run_both(h, w, b, labels, ids, lp, tail=tail, chunk_size=16, temperature=2.0)
        torch.testing.assert_close(out.double(), ref.detach(), **TOL)
        for got, want in zip(lf, lr):
            torch.testing.assert_close(got.grad.double(), want.grad, **TOL)
    assert not compiled._BROKEN


# ---------------------------------------------------------------------------------- composition


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distillation_is_weighted_ce_plus_sparse_kd(eager, tail, temperature, reduction):
    h, w, b, labels, ids, lp, _ = make_case((3, 7), 16, 45, 6, seed=13, bias=True, temperature=temperature)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    options = tl.SparseDistillationOptions(0.3, SparseKDOptions(temperature, tail))
    out = linear_sparse_distillation_loss(
        *leaves[:2], labels, ids, lp, bias=leaves[2], reduction=reduction, chunk_size=8, options=options
    )
    lr = [t.double().requires_grad_() for t in (h, w, b)]
    z = F.linear(*lr)
    ce = F.cross_entropy(z.reshape(-1, 45), labels.reshape(-1), reduction="none").reshape(labels.shape)
    ce = torch.where(labels != -100, ce, 0.0)
    kd = ref_sparse_kd(z, labels, ids, lp.double(), temperature=temperature, tail=tail, reduction="none")
    per_token = 0.7 * ce + 0.3 * kd
    ref = per_token if reduction == "none" else per_token.sum() / (labels != -100).sum()
    go = torch.rand(ref.shape, generator=gen(3), dtype=torch.float64) if reduction == "none" else None
    out.loss.backward(None if go is None else go.float())
    ref.backward(go)
    torch.testing.assert_close(out.loss.double(), ref.detach(), **TOL)
    expected_kd = kd if reduction == "none" else kd.sum() / (labels != -100).sum()
    torch.testing.assert_close(out.kd.double(), expected_kd.detach(), **TOL)
    assert int(out.num_tokens) == int((labels != -100).sum())
    for got, want in zip(leaves, lr):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=45, dim=16):
        super().__init__()
        g = gen(40)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.output = torch.nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, tokens):
        return self.output(torch.tanh(self.embed(tokens)))


def test_module_for_recipes(eager):
    """``SparseDistillationLoss``: the recipes' protocol (projection from the model, no teacher
    model, sum and count with parts, ``scale``) and the same values as the functional loss."""
    from tune_losses.training.protocol import TeacherOutputLoss, TrainingLoss

    _, _, _, labels, ids, lp, _ = make_case((2, 9), 16, 45, 5, seed=41)
    tokens = torch.randint(0, 45, (2, 9), generator=gen(42))
    model = _TinyLM()
    full = model(tokens)
    loss_fn = SparseDistillationLoss(kd_ratio=0.4, temperature=2.0, tail="bucket", chunk_size=4)
    assert not isinstance(loss_fn, TeacherOutputLoss)  # the loop loads no teacher for it
    with pytest.raises(ValueError, match="set_model_output"):
        loss_fn(torch.randn(2, 9, 16), ids, lp, labels)
    loss_fn.set_model_output(model)
    hidden = model(tokens)
    assert hidden.shape == (2, 9, 16)
    loss = loss_fn(hidden, ids, lp, labels)
    z = full.double()
    ce = torch.where(labels != -100, F.cross_entropy(z.transpose(1, 2), labels, reduction="none"), 0.0)
    kd = ref_sparse_kd(z, labels, ids, lp.double(), temperature=2.0, tail="bucket", reduction="sum")
    ref = (0.6 * ce.sum() + 0.4 * kd) / (labels != -100).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    scale = torch.tensor(0.25)
    s = TrainingLoss(loss_fn)(hidden, ids, lp, labels=labels, scale=scale)
    assert set(s.parts) == {"class_loss", "kd_loss"} and int(s.num_tokens) == int((labels != -100).sum())
    torch.testing.assert_close(s.total, loss * s.num_tokens * scale)
    torch.testing.assert_close(s.parts["kd_loss"].double(), 0.25 * kd, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        TypeError, match=r"expected the tensors \(hidden, teacher_ids, teacher_logprobs, labels\), got 3"
    ):
        loss_fn(hidden, ids, labels)
    assert loss_fn.temperature == 2.0 and loss_fn.kd_ratio == 0.4 and loss_fn.options.kd.tail == "bucket"
    with pytest.raises(ValueError, match="tail"):
        SparseDistillationLoss(tail="rest")
    with pytest.raises(ValueError, match="kd_ratio"):
        SparseDistillationLoss(kd_ratio=-0.1)


# -------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    h, w, _, labels, ids, lp, _ = make_case((2, 5), 8, 20, 4, ignore="none", unused=False)
    cases = [
        ("teacher_ids", dict(ids=ids.float())),
        ("teacher_ids", dict(ids=ids[..., :1].expand(2, 5, 4).contiguous())),  # repeated ids
        ("teacher_ids", dict(ids=ids.masked_fill(ids == ids[0, 0, 0], 20))),
        ("teacher_ids", dict(ids=ids.masked_fill(ids == ids[0, 0, 0], -2))),
        ("teacher_ids", dict(ids=ids[:, :4])),
        ("teacher_ids", dict(ids=ids[..., 0])),
        ("teacher_logprobs", dict(lp=lp[..., :3])),
        ("teacher_logprobs", dict(lp=lp.long())),
        ("teacher_logprobs", dict(lp=lp.exp() + 0.1)),  # probabilities, not log-probabilities
        ("reduction", dict(reduction="avg")),
        ("chunk_size", dict(chunk_size=0)),
        ("execution", dict(execution="recompute")),  # the object, not one of its fields
        ("options", dict(options=tl.SparseDistillationOptions())),  # the distillation's object, not the KD's
    ]
    for name, change in cases:
        kw = {k: v for k, v in change.items() if k not in ("ids", "lp")}
        with pytest.raises(ValueError, match=name):
            linear_sparse_kd_loss(h, w, labels, change.get("ids", ids), change.get("lp", lp), **kw)
    fields = [("tail", "top"), ("temperature", 0.0), ("ignore_index", -100.0), ("validate", "yes")]
    for name, bad in fields:
        with pytest.raises(ValueError, match=name):
            SparseKDOptions(**{name: bad})
    with pytest.raises(ValueError, match="kd_ratio"):
        tl.SparseDistillationOptions(kd_ratio=1.5)
    with pytest.raises(TypeError, match="kd: expected a SparseKDOptions, got KDOptions"):
        tl.SparseDistillationOptions(kd=KDOptions())
    with pytest.raises(ValueError, match="ce.ignore_index: expected -1"):
        tl.SparseDistillationOptions(kd=SparseKDOptions(ignore_index=-1), ce=tl.CEOptions(ignore_index=-100))
    with pytest.raises(TypeError, match="options: expected a SparseDistillationOptions"):
        linear_sparse_distillation_loss(h, w, labels, ids, lp, options=SparseKDOptions())
    # A tiny positive log-probability (rounding) passes; validate=False skips the value checks.
    linear_sparse_kd_loss(h, w, labels, ids, lp.masked_fill(lp == lp.max(), 1e-4))
    linear_sparse_kd_loss(h, w, labels, ids, lp.exp(), options=SparseKDOptions(validate=False))


def test_old_flat_keywords_warn_and_give_the_same_values_and_gradients(eager):
    """The flat keywords of before the options objects (the term's ``temperature``, ``tail``,
    ``ignore_index``, ``validate``, the mix's ``kd_ratio``, ``label_smoothing``, and ``algorithm``,
    ``drop_ignored_tokens``, the vocabulary-parallel ones) still work: the same values and gradients
    bit for bit, a DeprecationWarning naming the new form, pointing at the caller."""
    h, w, b, labels, ids, lp, _ = make_case((3, 5), 8, 30, 5, seed=41, bias=True, temperature=2.0)
    labels = labels.masked_fill(labels == -100, -1)
    term = dict(temperature=2.0, tail="bucket", ignore_index=-1, validate=False)
    run = dict(algorithm="recompute", drop_ignored_tokens=True, vocab_parallel=False)
    objects = dict(
        execution=ExecutionOptions("recompute", drop_ignored_tokens=True),
        parallel=VocabParallelOptions(vocab_parallel=False),
    )
    kd = SparseKDOptions(**term)
    forms = {
        linear_sparse_kd_loss: (dict(options=kd), term, "options=SparseKDOptions(temperature=, tail="),
        linear_sparse_distillation_loss: (
            dict(options=tl.SparseDistillationOptions(0.3, kd, tl.CEOptions(-1, 0.1, validate=False))),
            dict(kd_ratio=0.3, label_smoothing=0.1, **term),
            "options=SparseDistillationOptions(kd_ratio=..., kd=SparseKDOptions(...), ce=CEOptions(...))",
        ),
    }
    for fn, (new_kw, flat_kw, new_form) in forms.items():
        results = []
        for form, kw in (("objects", {**new_kw, **objects}), ("flat", {**flat_kw, **run})):
            leaves = [t.clone().requires_grad_() for t in (h, w, b)]
            call = lambda kw=kw, leaves=leaves: fn(leaves[0], leaves[1], labels, ids, lp, bias=leaves[2], **kw)  # noqa: E731
            if form == "flat":
                with pytest.warns(DeprecationWarning) as rec:
                    out = call()
                messages = " ".join(str(r.message) for r in rec)
                assert len(rec) == 3, messages  # one per options object
                assert "pass execution=ExecutionOptions(algorithm=, drop_ignored_tokens=...)" in messages
                assert "pass parallel=VocabParallelOptions(vocab_parallel=...)" in messages
                assert f"pass {new_form}" in messages, messages
                assert all(r.filename == __file__ for r in rec), "the warning points at the caller"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # the object form warns nothing
                    out = call()
            loss = out if torch.is_tensor(out) else out.loss
            loss.backward()
            parts = () if torch.is_tensor(out) else (out.ce, out.kd, out.num_tokens)
            results.append((loss.detach(), *parts, *[t.grad for t in leaves]))
        for new, old in zip(*results):
            torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.raises(TypeError, match="algorithm= and execution= both given"):
        linear_sparse_kd_loss(h, w, labels, ids, lp, algorithm="recompute", execution=ExecutionOptions())
    with pytest.raises(TypeError, match="tail= and options= both given"):
        linear_sparse_kd_loss(h, w, labels, ids, lp, tail="bucket", options=kd)
    with pytest.raises(TypeError, match="kd_ratio= and options= both given"):
        linear_sparse_distillation_loss(h, w, labels, ids, lp, kd_ratio=0.2, options=tl.SparseDistillationOptions())
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        linear_sparse_kd_loss(h, w, labels, ids, lp, algoritm="recompute")


def test_signatures_are_the_tensors_the_common_arguments_and_the_objects():
    """The dense functions' form: tensors, ``bias``, the call's ``reduction`` / ``chunk_size`` /
    ``num_tokens`` / ``scale``, then ``options``, ``parallel``, ``execution`` (13 parameters); the
    old flat keywords go through ``**deprecated``."""
    tensors = ["hidden", "weight", "labels", "teacher_ids", "teacher_logprobs"]
    rest = ["bias", "reduction", "chunk_size", "num_tokens", "scale", "options", "parallel", "execution"]
    for fn, options in (
        (linear_sparse_kd_loss, SparseKDOptions),
        (linear_sparse_distillation_loss, tl.SparseDistillationOptions),
    ):
        params = inspect.signature(fn).parameters
        assert list(params) == tensors + rest + ["deprecated"], list(params)
        assert params["deprecated"].kind is inspect.Parameter.VAR_KEYWORD
        assert params["options"].annotation == f"Optional[{options.__name__}]"
        assert len(params) - 1 <= 13


# ------------------------------------------------------------------------------------------ memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is on (freed when their last
    tensor dies): the loss's own working memory, inputs excluded."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def _release(self, key):
        self.refs[key][0] -= 1
        if self.refs[key][0] == 0:
            self.live -= self.refs.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves

        def storage(t):
            return t.untyped_storage().data_ptr()

        # An output on an argument's storage (a view, an in-place op) allocates nothing new.
        given = {storage(t) for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = storage(t)
                if key not in self.refs and key in given:
                    continue
                if key not in self.refs:
                    self.refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += self.refs[key][1]
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


@pytest.mark.parametrize("tail", TAILS)
def test_peak_memory_far_below_full_logits(eager, tail):
    """N=2048, H=256, V=32768, k=64, fp32: forward + backward stay well under a quarter of the
    fp32 [N, V] logits (256 MiB), dX and dW included."""
    n, hdim, vocab, k = 2048, 256, 32768, 64
    g = gen(0)
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=g) / 16).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(8)]).repeat(n // 8, 1)
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.1
    mode = LiveBytes()
    with mode:
        loss = linear_sparse_kd_loss(h, w, labels, ids, lp, options=SparseKDOptions(tail=tail))
        loss.backward()
    logits_bytes = n * vocab * 4
    assert mode.peak < logits_bytes / 4, f"peak {mode.peak / 2**20:.0f} MiB"
    assert mode.peak > (vocab * hdim * 4), "the probe must see dW at least"


# ------------------------------------------------------------------------------ vocabulary-parallel


def _vocab_parallel_ranks(rank: int, world: int):
    """Each rank holds its Shard(0) rows of the weight (and bias), as a local shard with
    ``process_group`` and as a DTensor on a "tp" mesh; compared with the single-process loss on the
    full weight: values, dX, this rank's dW / db rows, both tails, the composition."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    h, w, b, labels, ids, lp, _ = make_case((2, 9), 8, 41, 6, seed=31, bias=True, temperature=2.0)
    rows = slice(*[min(41, i * 21) for i in (rank, rank + 1)])  # torch Shard(0): 21 + 20 rows
    report = []
    for tail in TAILS:
        for composed in (False, True):
            full = [t.clone().requires_grad_() for t in (h, w, b)]
            local = [h.clone().requires_grad_(), w[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()]

            def call(x, ww, bb, **kw):
                kd = SparseKDOptions(temperature=2.0, tail=tail)
                common = dict(bias=bb, chunk_size=8, **kw)
                if composed:
                    options = tl.SparseDistillationOptions(0.4, kd)
                    return linear_sparse_distillation_loss(x, ww, labels, ids, lp, options=options, **common).loss
                return linear_sparse_kd_loss(x, ww, labels, ids, lp, options=kd, **common)

            single = call(*full)
            single.backward()
            parallel = call(*local, parallel=VocabParallelOptions(process_group=dist.group.WORLD))
            parallel.backward()
            torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(local[0].grad, full[0].grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(local[1].grad, full[1].grad[rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(local[2].grad, full[2].grad[rows], rtol=1e-5, atol=1e-6)
            report.append((tail, composed, float(parallel)))
    # A DTensor weight Shard(0) on a "tp" mesh (tensor parallelism): the same vocabulary-parallel path.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    full = [t.clone().requires_grad_() for t in (h, w, b)]
    d_w = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    d_b = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    hd = h.clone().requires_grad_()
    kw = dict(options=SparseKDOptions(temperature=2.0, tail="bucket"), chunk_size=8, reduction="sum")
    single = linear_sparse_kd_loss(full[0], full[1], labels, ids, lp, bias=full[2], **kw)
    single.backward()
    parallel = linear_sparse_kd_loss(hd, d_w, labels, ids, lp, bias=d_b, **kw)
    parallel.backward()
    torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hd.grad, full[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_w.grad.to_local(), full[1].grad[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_b.grad.to_local(), full[2].grad[rows], rtol=1e-5, atol=1e-6)
    report.append(("dtensor", float(parallel)))
    # Ids outside the global vocabulary are refused on every rank alike.
    try:
        bad = ids.masked_fill(ids == ids[0, 0, 0], 41)
        linear_sparse_kd_loss(
            h, w[rows], labels, bad, lp, parallel=VocabParallelOptions(process_group=dist.group.WORLD)
        )
    except ValueError as e:
        report.append(str(e).split(":")[0])
    return report


@pytest.mark.distributed
def test_vocab_parallel_local_shards_on_two_ranks():
    results = run_ranks(_vocab_parallel_ranks, 2, timeout=240)
    assert results[0] == results[1]
    assert results[0][-1] == "teacher_ids" and len(results[0]) == 6


def test_benchmark_methods_run_at_a_tiny_size(eager):
    """``python -m benchmarks.run --tasks sparse_kd``'s methods (the compiled ones aside) build and
    step; the sparse methods agree with the full-logits one."""
    from benchmarks.cases import METHODS, Size, build, clear_grads, make_inputs

    inputs = make_inputs("sparse_kd", Size(64, 16, 512))
    values = {}
    for method in METHODS["sparse_kd"]:
        if method in ("compile", "ours_compiled"):
            continue
        loss = build("sparse_kd", method)(inputs)
        loss.backward()
        assert inputs["hidden"].grad is not None
        values[method] = float(loss.detach())
        clear_grads(inputs)
    torch.testing.assert_close(values["ours"], values["plain"], rtol=1e-5, atol=1e-6)


def test_auto_mode_keeps_the_sparse_math_eager(monkeypatch):
    """``TUNE_LOSSES_COMPILE=auto``: the sparse term's eager math (in place in the chunk's buffer) is
    the default; ``1`` still compiles it (benchmarks/results/sparse_kd_cpu.md)."""
    from tune_losses.divergences import VocabReducer
    from tune_losses.sparse_teacher import SparseKDTerm
    from tune_losses.terms import CrossEntropyTerm

    monkeypatch.setattr(compiled, "_BROKEN", [])
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "auto")
    terms = (CrossEntropyTerm(), SparseKDTerm())
    assert compiled.compiled_math(terms, VocabReducer(50), torch.device("cpu")) is None
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "1")
    assert compiled.compiled_math(terms, VocabReducer(50), torch.device("cpu")) is not None
