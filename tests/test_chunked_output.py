"""The torchtune-API chunked-output losses (``tune_losses.chunked_output``).

* values and gradients against the independent fp64 reference (``tests/reference.py``) for any
  chunking (``tensor_split``, ``.chunk``, one tensor, empty chunks), ignored tokens none / some /
  all, fp32 and bf16 (bf16 no worse than eager bf16 PyTorch), every divergence and option;
* parity with torchtune 0.6.1's own classes, and the torchtune defects we fix (NaN when every
  label is ignored, ``ForwardKLLoss`` logging cross-entropy);
* ``sum_and_count``, memory behaviour of the per-chunk checkpoint, input errors.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

try:
    from tests.reference import make_labels, ref_ce, ref_kd, teacher_entropy
except ImportError:  # pytest's rootdir-relative import (tests/ on sys.path, no package)
    from reference import make_labels, ref_ce, ref_kd, teacher_entropy

import torchtune.modules.loss as tt  # torchtune 0.6.1, for parity and its documented defects

import tune_losses.chunked_output as co

B, V = 2, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is fastest, above all on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, g, dtype=torch.float32, scale=3.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _split(x: torch.Tensor, n: int, how: str):
    """Chunks of ``x`` along the token dim as leaf tensors (what an output projection hands over)."""
    if how == "single":
        return x.detach().clone().requires_grad_(x.requires_grad)
    if how == "tensor_split":
        parts = torch.tensor_split(x, n, dim=1)
    elif how == "chunk":
        parts = x.chunk(n, dim=1)
    else:
        raise AssertionError(how)
    return [p.detach().clone().requires_grad_(x.requires_grad) for p in parts]


def _leaves(chunks):
    return [chunks] if isinstance(chunks, torch.Tensor) else list(chunks)


def _grad_full(loss: torch.Tensor, chunks) -> torch.Tensor:
    """Gradient of ``loss`` with respect to every chunk, concatenated back to ``[B, S, V]``."""
    leaves = _leaves(chunks)
    grads = torch.autograd.grad(loss, leaves)
    return torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]


def _ref_with_grad(fn, x: torch.Tensor, *args, **kwargs):
    """fp64 reference value and its gradient with respect to ``x``."""
    x64 = x.detach().double().requires_grad_()
    value = fn(x64, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, x64)
    return value.detach(), grad


def _assert_close(actual, expected, rtol, atol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# chunking layouts: (S, num_output_chunks, how). S=13 is not divisible by 4: tensor_split gives
# [4, 3, 3, 3], .chunk gives [4, 4, 4, 1]; S=6 .chunk(4) gives 3 chunks [2, 2, 2]; S=3
# tensor_split(4) gives an empty last chunk [1, 1, 1, 0].
LAYOUTS = [
    (13, 4, "tensor_split"),
    (13, 4, "chunk"),
    (6, 4, "chunk"),
    (3, 4, "tensor_split"),
    (13, 4, "single"),
]
LAYOUT_IDS = [f"S{s}-n{n}-{how}" for s, n, how in LAYOUTS]


def test_layouts_are_what_they_claim():
    x = torch.zeros(1, 13, 1)
    assert [c.shape[1] for c in _split(x, 4, "tensor_split")] == [4, 3, 3, 3]
    assert [c.shape[1] for c in _split(x, 4, "chunk")] == [4, 4, 4, 1]
    assert [c.shape[1] for c in _split(torch.zeros(1, 6, 1), 4, "chunk")] == [2, 2, 2]
    assert [c.shape[1] for c in _split(torch.zeros(1, 3, 1), 4, "tensor_split")] == [1, 1, 1, 0]


# ------------------------------------------------------------------------ cross-entropy vs reference


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_ce_matches_reference_fp32(layout, ignore):
    S, n, how = layout
    g = _gen(1)
    x = _logits((B, S, V), g).requires_grad_()
    labels = make_labels((B, S), V, ignore, g)
    chunks = _split(x, n, how)

    loss = co.CEWithChunkedOutputLoss(num_output_chunks=n)(chunks, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    grad = _grad_full(loss, chunks)

    ref, ref_grad = _ref_with_grad(ref_ce, x, labels)
    _assert_close(loss, ref, 1e-5, 1e-6, "CE value")
    _assert_close(grad, ref_grad, 1e-4, 1e-7, "CE grad")


CE_OPTIONS = [
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=4.0),
    dict(label_smoothing=0.2, z_loss=1e-3, softcap=5.0),
    dict(label_smoothing=1.0),
]


@pytest.mark.parametrize("ignore", ["none", "some"])
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ce_options_match_reference(opts, ignore):
    g = _gen(2)
    S, n = 13, 4
    x = _logits((B, S, V), g, scale=6.0).requires_grad_()  # large enough for softcap to matter
    labels = make_labels((B, S), V, ignore, g)
    chunks = _split(x, n, "tensor_split")

    loss = co.CEWithChunkedOutputLoss(n, **opts)(chunks, labels)
    grad = _grad_full(loss, chunks)
    ref, ref_grad = _ref_with_grad(ref_ce, x, labels, **opts)
    _assert_close(loss, ref, 1e-5, 1e-6, f"CE value {opts}")
    _assert_close(grad, ref_grad, 1e-4, 1e-7, f"CE grad {opts}")
    # the option changes the loss (the comparison is not vacuous)
    assert not torch.allclose(ref, ref_ce(x.detach().double(), labels))


def test_ce_custom_ignore_index_and_flat_inputs():
    g = _gen(3)
    N = 11
    x = _logits((N, V), g).requires_grad_()
    labels = make_labels((N,), V, "some", g, ignore_index=-1)
    loss = co.CEWithChunkedOutputLoss(1, ignore_index=-1)(x, labels)  # [N, V] with [N]
    (grad,) = torch.autograd.grad(loss, x)
    ref, ref_grad = _ref_with_grad(ref_ce, x, labels, ignore_index=-1)
    _assert_close(loss, ref, 1e-5, 1e-6, "value")
    _assert_close(grad, ref_grad, 1e-4, 1e-7, "grad")


def _eager_bf16_ce(x_bf16, labels):
    """Eager bf16 PyTorch: F.cross_entropy straight on bf16 logits (bf16 math and output)."""
    x = x_bf16.detach().clone().requires_grad_()
    loss = F.cross_entropy(x.view(-1, x.shape[-1]), labels.view(-1), ignore_index=-100)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm())


@pytest.mark.parametrize("how", ["tensor_split", "chunk", "single"])
def test_ce_bf16_no_worse_than_eager(how):
    g = _gen(4)
    S, n, Vb = 13, 4, 64
    x = _logits((B, S, Vb), g, dtype=torch.bfloat16).requires_grad_()
    labels = make_labels((B, S), Vb, "some", g)
    chunks = _split(x, n, how)

    loss = co.CEWithChunkedOutputLoss(n)(chunks, labels)
    assert loss.dtype == torch.float32
    grad = _grad_full(loss, chunks)
    assert grad.dtype == torch.bfloat16

    # truth: fp64 on exactly the bf16 inputs
    ref, ref_grad = _ref_with_grad(ref_ce, x, labels)
    eager, eager_grad = _eager_bf16_ce(x, labels)
    _assert_close(loss, ref, 2e-2, 1e-2, "bf16 CE value (loose)")
    _assert_close(grad, ref_grad, 2e-2, 1e-3, "bf16 CE grad (loose)")
    assert _err(loss, ref) <= _err(eager, ref) + 1e-5 * abs(float(ref)) + 1e-6
    assert _err(grad, ref_grad) <= 1.05 * _err(eager_grad, ref_grad) + 1e-6


@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)])
def test_ce_bf16_options_no_worse_than_eager(opts):
    g = _gen(5)
    S, n, Vb = 13, 4, 64
    x = _logits((B, S, Vb), g, dtype=torch.bfloat16, scale=6.0).requires_grad_()
    labels = make_labels((B, S), Vb, "some", g)
    chunks = _split(x, n, "tensor_split")
    loss = co.CEWithChunkedOutputLoss(n, **opts)(chunks, labels)
    grad = _grad_full(loss, chunks)

    ref, ref_grad = _ref_with_grad(ref_ce, x, labels, **opts)
    # eager bf16: the same formula in bf16 ops
    xe = x.detach().clone().requires_grad_()
    z = xe if "softcap" not in opts else opts["softcap"] * torch.tanh(xe / opts["softcap"])
    z = z.view(-1, Vb)
    eager = F.cross_entropy(z, labels.view(-1), label_smoothing=opts["label_smoothing"])
    if opts.get("z_loss"):
        valid = labels.view(-1) != -100
        eager = eager + opts["z_loss"] * torch.logsumexp(z, -1)[valid].square().mean()
    (eager_grad,) = torch.autograd.grad(eager, xe)
    _assert_close(loss, ref, 2e-2, 1e-2, "bf16 value (loose)")
    assert _err(loss, ref) <= _err(eager, ref) + 1e-5 * abs(float(ref)) + 1e-6
    assert _err(grad, ref_grad) <= 1.05 * _err(eager_grad, ref_grad) + 1e-6


# ------------------------------------------------------------------------- distillation vs reference

# (class factory, reference kwargs)
KD_CASES = {
    "fkl_torchtune": (
        lambda n, **kw: co.ForwardKLWithChunkedOutputLoss(n, **kw),
        dict(divergence="forward_kl", true_kl=False),
    ),
    "fkl_true": (
        lambda n, **kw: co.ForwardKLWithChunkedOutputLoss(n, true_kl=True, **kw),
        dict(divergence="forward_kl"),
    ),
    "rkl": (lambda n, **kw: co.ReverseKLWithChunkedOutputLoss(n, **kw), dict(divergence="reverse_kl")),
    "sym": (
        lambda n, **kw: co.SymmetricKLWithChunkedOutputLoss(n, 0.3, **kw),
        dict(divergence="symmetric_kl", sym_kd_ratio=0.3, true_kl=False),
    ),
    "sym_true": (
        lambda n, **kw: co.SymmetricKLWithChunkedOutputLoss(n, 0.7, true_kl=True, **kw),
        dict(divergence="symmetric_kl", sym_kd_ratio=0.7),
    ),
    "jsd0": (lambda n, **kw: co.JSDWithChunkedOutputLoss(n, 0.0, **kw), dict(divergence="jsd", beta=0.0)),
    "jsd.5": (lambda n, **kw: co.JSDWithChunkedOutputLoss(n, 0.5, **kw), dict(divergence="jsd", beta=0.5)),
    "jsd.9": (lambda n, **kw: co.JSDWithChunkedOutputLoss(n, 0.9, **kw), dict(divergence="jsd", beta=0.9)),
    "jsd1": (lambda n, **kw: co.JSDWithChunkedOutputLoss(n, 1.0, **kw), dict(divergence="jsd", beta=1.0)),
    "tvd": (lambda n, **kw: co.TVDWithChunkedOutputLoss(n, **kw), dict(divergence="tvd")),
}


def _kd_inputs(S, seed, dtype=torch.float32, ignore="some", vocab=V):
    g = _gen(seed)
    student = _logits((B, S, vocab), g, dtype).requires_grad_()
    teacher = _logits((B, S, vocab), g, dtype)
    labels = make_labels((B, S), vocab, ignore, g)
    return student, teacher, labels


def _check_kd(loss_fn, ref_kwargs, student, teacher, labels, n, how, rtol=1e-5, grad_rtol=1e-4):
    s_chunks = _split(student, n, how)
    t_chunks = _split(teacher, n, how)
    loss = loss_fn(s_chunks, t_chunks, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    grad = _grad_full(loss, s_chunks)
    ref, ref_grad = _ref_with_grad(lambda s: ref_kd(s, teacher.double(), labels, **ref_kwargs), student)
    _assert_close(loss, ref, rtol, 1e-6, "KD value")
    _assert_close(grad, ref_grad, grad_rtol, 1e-7, "KD grad")
    return loss, ref


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("case", list(KD_CASES))
def test_kd_matches_reference_fp32(case, layout, ignore):
    S, n, how = layout
    make, ref_kwargs = KD_CASES[case]
    student, teacher, labels = _kd_inputs(S, 6, ignore=ignore)
    _check_kd(make(n), ref_kwargs, student, teacher, labels, n, how)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("case", list(KD_CASES))
def test_kd_temperature_matches_reference(case, scale):
    make, ref_kwargs = KD_CASES[case]
    student, teacher, labels = _kd_inputs(13, 7)
    loss_fn = make(4, temperature=2.5, scale_by_temperature_squared=scale)
    loss, ref = _check_kd(
        loss_fn,
        dict(ref_kwargs, temperature=2.5, scale_by_temperature_squared=scale),
        student,
        teacher,
        labels,
        4,
        "tensor_split",
    )
    plain = ref_kd(student.detach().double(), teacher.double(), labels, **ref_kwargs)
    assert not torch.allclose(ref, plain)  # temperature is not a no-op


def test_jsd_limits_and_symmetric_endpoints():
    """beta 0 / 1 are forward / reverse KL; sym_kd_ratio 1 / 0 are forward / reverse KL."""
    student, teacher, labels = _kd_inputs(13, 8)
    s, t = _split(student, 4, "tensor_split"), _split(teacher, 4, "tensor_split")
    fkl = co.ForwardKLWithChunkedOutputLoss(4, true_kl=True)(s, t, labels)
    rkl = co.ReverseKLWithChunkedOutputLoss(4)(s, t, labels)
    torch.testing.assert_close(co.JSDWithChunkedOutputLoss(4, beta=0.0)(s, t, labels), fkl)
    torch.testing.assert_close(co.JSDWithChunkedOutputLoss(4, beta=1.0)(s, t, labels), rkl)
    torch.testing.assert_close(co.SymmetricKLWithChunkedOutputLoss(4, 1.0, true_kl=True)(s, t, labels), fkl)
    torch.testing.assert_close(co.SymmetricKLWithChunkedOutputLoss(4, 0.0)(s, t, labels), rkl)
    # teacher = student: every true divergence is 0 at its minimum, with a 0 gradient
    same = [x.detach() for x in s]
    for make in (
        lambda: co.ForwardKLWithChunkedOutputLoss(4, true_kl=True),
        lambda: co.ReverseKLWithChunkedOutputLoss(4),
        lambda: co.SymmetricKLWithChunkedOutputLoss(4, true_kl=True),
        lambda: co.JSDWithChunkedOutputLoss(4),
        lambda: co.TVDWithChunkedOutputLoss(4),
    ):
        loss = make()(s, same, labels)
        grad = _grad_full(loss, s)
        assert abs(loss.item()) < 1e-6
        assert grad.abs().max().item() < 1e-6


UNCHUNKED = {
    "fkl": (lambda **kw: co.ForwardKLLoss(**kw), dict(divergence="forward_kl", true_kl=False)),
    "fkl_true": (lambda **kw: co.ForwardKLLoss(true_kl=True, **kw), dict(divergence="forward_kl")),
    "rkl": (lambda **kw: co.ReverseKLLoss(**kw), dict(divergence="reverse_kl")),
    "sym": (
        lambda **kw: co.SymmetricKLLoss(0.4, **kw),
        dict(divergence="symmetric_kl", sym_kd_ratio=0.4, true_kl=False),
    ),
    "jsd": (lambda **kw: co.JSDLoss(0.3, **kw), dict(divergence="jsd", beta=0.3)),
    "tvd": (lambda **kw: co.TVDLoss(**kw), dict(divergence="tvd")),
}


@pytest.mark.parametrize("shape", ["flat", "bsv", "flat_logits_2d_labels"])
@pytest.mark.parametrize("case", list(UNCHUNKED))
def test_unchunked_kd_matches_reference(case, shape):
    make, ref_kwargs = UNCHUNKED[case]
    student, teacher, labels = _kd_inputs(7, 9)
    s, t, lab = student, teacher, labels
    if shape in ("flat", "flat_logits_2d_labels"):
        # torchtune documents student/teacher logits [B*S, V] with labels [B, S] (it flattens them)
        s = student.reshape(-1, V)
        t = teacher.reshape(-1, V)
        lab = labels.reshape(-1) if shape == "flat" else labels
    loss_fn = make(ignore_index=-100)
    loss = loss_fn(s, t, lab)
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = _ref_with_grad(lambda x: ref_kd(x, teacher.double(), labels, **ref_kwargs), student)
    _assert_close(loss, ref, 1e-5, 1e-6, "value")
    _assert_close(grad, ref_grad, 1e-4, 1e-7, "grad")
    total = loss_fn(s, t, lab, normalize=False)
    _assert_close(
        total,
        ref_kd(student.detach().double(), teacher.double(), labels, reduction="sum", **ref_kwargs),
        1e-5,
        1e-5,
        "sum",
    )


def test_masked_vocab_entries_give_finite_values_and_gradients():
    """-inf logits on both sides (a vocabulary a model masks out) drop out: no NaN anywhere."""
    student, teacher, labels = _kd_inputs(13, 10)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[3, 17, 30]] = True
    student = student.detach().masked_fill(mask, float("-inf")).requires_grad_()
    teacher = teacher.masked_fill(mask, float("-inf"))
    for case, (make, ref_kwargs) in KD_CASES.items():
        s_chunks = _split(student, 4, "tensor_split")
        loss = make(4)(s_chunks, _split(teacher, 4, "tensor_split"), labels)
        grad = _grad_full(loss, s_chunks)
        assert torch.isfinite(loss), case
        assert torch.isfinite(grad).all(), case
        assert (grad[..., mask] == 0).all(), case
        # equals the divergence over the unmasked vocabulary
        keep = ~mask
        ref = ref_kd(student.detach()[..., keep].double(), teacher[..., keep].double(), labels, **ref_kwargs)
        _assert_close(loss, ref, 1e-5, 1e-6, case)


@pytest.mark.parametrize("case", ["fkl_torchtune", "rkl", "sym", "jsd.5", "tvd"])
def test_kd_bf16_no_worse_than_eager(case):
    make, ref_kwargs = KD_CASES[case]
    Vb = 64
    student, teacher, labels = _kd_inputs(13, 11, dtype=torch.bfloat16, vocab=Vb)
    s_chunks, t_chunks = _split(student, 4, "chunk"), _split(teacher, 4, "chunk")
    loss = make(4)(s_chunks, t_chunks, labels)
    grad = _grad_full(loss, s_chunks)
    assert grad.dtype == torch.bfloat16

    ref, ref_grad = _ref_with_grad(lambda x: ref_kd(x, teacher.double(), labels, **ref_kwargs), student)
    # eager bf16: log_softmax and the divergence in bf16 ops
    se = student.detach().clone().requires_grad_()
    log_q, log_p = F.log_softmax(se, -1), F.log_softmax(teacher, -1)
    q, p = log_q.exp(), log_p.exp()
    div = ref_kwargs["divergence"]
    if div == "forward_kl":
        per = -(p * log_q).sum(-1)
    elif div == "reverse_kl":
        per = (q * (log_q - log_p)).sum(-1)
    elif div == "symmetric_kl":
        r = ref_kwargs["sym_kd_ratio"]
        per = r * -(p * log_q).sum(-1) + (1 - r) * (q * (log_q - log_p)).sum(-1)
    elif div == "jsd":
        beta = ref_kwargs["beta"]
        log_m = (beta * p + (1 - beta) * q).log()
        per = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    else:
        per = 0.5 * (p - q).abs().sum(-1)
    valid = labels != -100
    eager = per[valid].sum() / valid.sum()
    (eager_grad,) = torch.autograd.grad(eager, se)

    _assert_close(loss, ref, 2e-2, 1e-2, "bf16 value (loose)")
    assert _err(loss, ref) <= _err(eager, ref) + 1e-5 * abs(float(ref)) + 1e-6
    assert _err(grad, ref_grad) <= 1.05 * _err(eager_grad, ref_grad) + 1e-6


def test_kd_mixed_dtypes_bf16_teacher_fp32_student():
    student, teacher, labels = _kd_inputs(13, 12)
    teacher = teacher.to(torch.bfloat16)
    _check_kd(
        co.ForwardKLWithChunkedOutputLoss(4, true_kl=True),
        dict(divergence="forward_kl"),
        student,
        teacher,
        labels,
        4,
        "tensor_split",
    )


# --------------------------------------------------------------------------- parity with torchtune


def _tt_chunks(x, n):
    return list(x.chunk(n, dim=1))


def _grads_close(ours, ours_in, theirs, theirs_in):
    # fp32 round-off of two different formulas: elementwise 1e-5, or 1e-6 of the largest entry
    # (both are ~3e-7 from the fp64 truth in norm; a real bug is off by O(1)).
    for a, b in zip(torch.autograd.grad(ours, ours_in), torch.autograd.grad(theirs, theirs_in)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("ignore", ["none", "some"])
def test_ce_parity_with_torchtune(ignore):
    g = _gen(13)
    S, n = 16, 4
    x = _logits((B, S, V), g)
    labels = make_labels((B, S), V, ignore, g)
    ours_in = [c.clone().requires_grad_() for c in _tt_chunks(x, n)]
    theirs_in = [c.clone().requires_grad_() for c in _tt_chunks(x, n)]
    ours = co.CEWithChunkedOutputLoss(n)(ours_in, labels)
    theirs = tt.CEWithChunkedOutputLoss(n)(theirs_in, labels)
    assert torch.isfinite(theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    _grads_close(ours, ours_in, theirs, theirs_in)


KD_PARITY = {
    "fkl": (lambda n: co.ForwardKLWithChunkedOutputLoss(n), lambda n: tt.ForwardKLWithChunkedOutputLoss(n)),
    "rkl": (lambda n: co.ReverseKLWithChunkedOutputLoss(n), lambda n: tt.ReverseKLWithChunkedOutputLoss(n)),
    "sym": (
        lambda n: co.SymmetricKLWithChunkedOutputLoss(n, 0.3),
        lambda n: tt.SymmetricKLWithChunkedOutputLoss(n, 0.3),
    ),
}
KD_PARITY_UNCHUNKED = {
    "fkl": (lambda: co.ForwardKLLoss(), lambda: tt.ForwardKLLoss()),
    "rkl": (lambda: co.ReverseKLLoss(), lambda: tt.ReverseKLLoss()),
    "sym": (lambda: co.SymmetricKLLoss(0.3), lambda: tt.SymmetricKLLoss(0.3)),
}


@pytest.mark.parametrize("ignore", ["none", "some"])
@pytest.mark.parametrize("case", list(KD_PARITY))
def test_kd_chunked_parity_with_torchtune(case, ignore):
    make_ours, make_theirs = KD_PARITY[case]
    S, n = 16, 4
    student, teacher, labels = _kd_inputs(S, 14, ignore=ignore)
    t_chunks = _tt_chunks(teacher, n)
    ours_in = [c.detach().clone().requires_grad_() for c in _tt_chunks(student, n)]
    theirs_in = [c.detach().clone().requires_grad_() for c in _tt_chunks(student, n)]
    ours = make_ours(n)(ours_in, t_chunks, labels)
    theirs = make_theirs(n)(theirs_in, t_chunks, labels)
    assert torch.isfinite(theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    _grads_close(ours, ours_in, theirs, theirs_in)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("case", list(KD_PARITY_UNCHUNKED))
def test_kd_unchunked_parity_with_torchtune(case, normalize):
    make_ours, make_theirs = KD_PARITY_UNCHUNKED[case]
    student, teacher, labels = _kd_inputs(16, 15)
    s_ours = student.detach().reshape(-1, V).clone().requires_grad_()
    s_theirs = student.detach().reshape(-1, V).clone().requires_grad_()
    t, lab = teacher.reshape(-1, V), labels.reshape(-1)
    ours = make_ours()(s_ours, t, lab, normalize=normalize)
    theirs = make_theirs()(s_theirs, t, lab, normalize=normalize)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    _grads_close(ours, [s_ours], theirs, [s_theirs])


def test_true_kl_is_torchtune_minus_teacher_entropy_same_gradient():
    S, n = 16, 4
    student, teacher, labels = _kd_inputs(S, 16)
    t_chunks = _tt_chunks(teacher, n)
    ours_in = [c.detach().clone().requires_grad_() for c in _tt_chunks(student, n)]
    theirs_in = [c.detach().clone().requires_grad_() for c in _tt_chunks(student, n)]
    ours = co.ForwardKLWithChunkedOutputLoss(n, true_kl=True)(ours_in, t_chunks, labels)
    theirs = tt.ForwardKLWithChunkedOutputLoss(n)(theirs_in, t_chunks, labels)
    valid = labels.reshape(-1) != -100
    entropy = teacher_entropy(teacher)[valid].mean()
    torch.testing.assert_close(ours.double(), theirs.double() - entropy, rtol=1e-5, atol=1e-6)
    assert theirs.item() > ours.item() > 0  # torchtune's logged value never reaches the KL
    _grads_close(ours, ours_in, theirs, theirs_in)


# ------------------------------------------------------------------------------ all labels ignored

ALL_CLASSES = {
    "ce": lambda: co.CEWithChunkedOutputLoss(4),
    "fkl": lambda: co.ForwardKLWithChunkedOutputLoss(4),
    "rkl": lambda: co.ReverseKLWithChunkedOutputLoss(4),
    "sym": lambda: co.SymmetricKLWithChunkedOutputLoss(4),
    "jsd": lambda: co.JSDWithChunkedOutputLoss(4),
    "tvd": lambda: co.TVDWithChunkedOutputLoss(4),
    "fkl1": lambda: co.ForwardKLLoss(),
    "rkl1": lambda: co.ReverseKLLoss(),
    "sym1": lambda: co.SymmetricKLLoss(),
    "jsd1": lambda: co.JSDLoss(),
    "tvd1": lambda: co.TVDLoss(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ALL_CLASSES))
def test_all_labels_ignored_gives_zero_loss_and_zero_grads(name, dtype):
    student, teacher, labels = _kd_inputs(16, 17, dtype=dtype, ignore="all")
    chunked = not name.endswith("1")
    s_in = _split(student, 4, "chunk") if chunked else student.detach().clone().requires_grad_()
    t_in = _split(teacher, 4, "chunk") if chunked else teacher
    loss_fn = ALL_CLASSES[name]()
    loss = loss_fn(s_in, labels) if name == "ce" else loss_fn(s_in, t_in, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.grad_fn is not None
    loss.backward()
    for leaf in _leaves(s_in):
        assert leaf.grad is not None
        assert not torch.isnan(leaf.grad).any()
        assert (leaf.grad == 0).all()


def test_torchtune_gives_nan_when_all_labels_ignored():
    """The defect we fix (design.md section 4.1), documented: torchtune 0.6.1 divides 0 by 0."""
    student, teacher, labels = _kd_inputs(16, 18, ignore="all")
    chunks = _tt_chunks(student, 4)
    assert torch.isnan(tt.CEWithChunkedOutputLoss(4)(chunks, labels))
    for cls in (tt.ReverseKLWithChunkedOutputLoss, tt.SymmetricKLWithChunkedOutputLoss):
        s_in = [c.detach().clone().requires_grad_() for c in chunks]
        loss = cls(4)(s_in, _tt_chunks(teacher, 4), labels)
        assert torch.isnan(loss)
        loss.backward()
        assert any(torch.isnan(c.grad).any() for c in s_in)
    # ours: 0 for the same inputs
    assert co.CEWithChunkedOutputLoss(4)(chunks, labels).item() == 0.0
    assert co.ReverseKLWithChunkedOutputLoss(4)(chunks, _tt_chunks(teacher, 4), labels).item() == 0.0


def test_torchtune_mispairs_labels_when_chunks_are_tensor_split():
    """Defect 4.2 documented: torchtune re-chunks labels with .chunk; we split them like the logits."""
    S, n = 13, 4
    g = _gen(19)
    x = _logits((B, S, V), g)
    labels = make_labels((B, S), V, "none", g)
    chunks = list(torch.tensor_split(x, n, dim=1))  # [4, 3, 3, 3] vs labels .chunk -> [4, 4, 4, 1]
    with pytest.raises(Exception):
        tt.CEWithChunkedOutputLoss(n)(chunks, labels)
    torch.testing.assert_close(
        co.CEWithChunkedOutputLoss(n)(chunks, labels).double(), ref_ce(x, labels), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------------- sum_and_count


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_sum_and_count_agrees_with_forward(ignore):
    student, teacher, labels = _kd_inputs(13, 20, ignore=ignore)
    n_valid = int((labels != -100).sum())
    s, t = _split(student, 4, "tensor_split"), _split(teacher, 4, "tensor_split")
    losses = [
        (co.CEWithChunkedOutputLoss(4), (s, labels), ref_ce(student.detach(), labels, reduction="sum")),
        (
            co.ReverseKLWithChunkedOutputLoss(4),
            (s, t, labels),
            ref_kd(student.detach(), teacher, labels, divergence="reverse_kl", reduction="sum"),
        ),
        (
            co.JSDLoss(0.5),
            (student, teacher, labels),
            ref_kd(student.detach(), teacher, labels, divergence="jsd", reduction="sum"),
        ),
    ]
    for loss_fn, args, ref_sum in losses:
        result = loss_fn.sum_and_count(*args)
        total, count = result.total, result.num_tokens
        assert total.dim() == 0 and total.dtype == torch.float32
        assert count.dim() == 0 and count.dtype == torch.int64 and int(count) == n_valid
        _assert_close(total, ref_sum, 1e-5, 1e-5, type(loss_fn).__name__)
        mean = loss_fn(*args)
        if n_valid:
            torch.testing.assert_close(total / count, mean, rtol=1e-6, atol=0)
        else:
            assert total.item() == 0.0 and mean.item() == 0.0
        if not isinstance(loss_fn, co.CEWithChunkedOutputLoss):
            torch.testing.assert_close(loss_fn(*args, normalize=False), total)


def test_sum_over_micro_batches_divided_by_global_count_equals_one_big_batch():
    """The (sum, count) contract: two micro-batches normalized by the step's count = one batch."""
    g = _gen(21)
    x = _logits((4, 13, V), g).requires_grad_()
    labels = make_labels((4, 13), V, "some", g)
    loss_fn = co.CEWithChunkedOutputLoss(4)
    parts = [loss_fn.sum_and_count(_split(x[i : i + 2], 4, "tensor_split"), labels[i : i + 2]) for i in (0, 2)]
    global_count = sum(p.num_tokens for p in parts)
    stepped = sum(p.total for p in parts) / global_count
    torch.testing.assert_close(stepped.double(), ref_ce(x.detach(), labels), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- memory behaviour


class _SavedBytes:
    """Bytes of floating tensors autograd saves for backward while the context is active."""

    def __init__(self):
        self.float_bytes = 0
        self.largest_fp32 = 0

    def __enter__(self):
        def pack(t):
            if t.is_floating_point():
                self.float_bytes += t.numel() * t.element_size()
                if t.dtype == torch.float32:
                    self.largest_fp32 = max(self.largest_fp32, t.numel())
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_gradient_through_an_output_projection_in_eager_mode():
    """Chunks that are non-leaf outputs of a projection (as in a model) get the right gradient."""
    g = _gen(22)
    S, H, n = 13, 8, 4
    hidden = torch.randn(B, S, H, generator=g)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    labels = make_labels((B, S), V, "some", g)
    chunks = [h @ weight.t() for h in torch.tensor_split(hidden, n, dim=1)]
    assert all(c.requires_grad and c.grad_fn is not None for c in chunks)
    loss = co.CEWithChunkedOutputLoss(n)(chunks, labels)
    (gw,) = torch.autograd.grad(loss, weight)

    w64 = weight.detach().double().requires_grad_()
    ref = ref_ce(hidden.double() @ w64.t(), labels)
    (ref_gw,) = torch.autograd.grad(ref, w64)
    _assert_close(loss, ref, 1e-5, 1e-6, "value")
    _assert_close(gw, ref_gw, 1e-4, 1e-6, "dW")


@pytest.mark.parametrize("name", ["ce", "fkl", "rkl", "jsd", "tvd"])
def test_checkpoint_keeps_no_fp32_chunk_for_backward(name):
    """Per-chunk checkpoint: nothing of size [n, V] in fp32 is saved for backward; torchtune's CE saves it."""
    S, n, Vb = 16, 4, 256
    student, teacher, labels = _kd_inputs(S, 23, dtype=torch.bfloat16, vocab=Vb)
    s_chunks, t_chunks = _split(student, n, "chunk"), _split(teacher, n, "chunk")
    chunk_elems = B * (S // n) * Vb
    with _SavedBytes() as saved:
        if name == "ce":
            loss = co.CEWithChunkedOutputLoss(n)(s_chunks, labels)
        else:
            loss = ALL_CLASSES[name]()(s_chunks, t_chunks, labels)
    # what is saved: the bf16 input chunks themselves (student, and teacher for KD), plus scalars
    input_bytes = sum(c.numel() * c.element_size() for c in s_chunks)
    if name != "ce":
        input_bytes += sum(c.numel() * c.element_size() for c in t_chunks)
    assert saved.largest_fp32 < chunk_elems
    assert saved.float_bytes <= input_bytes + 256
    grads = _grad_full(loss, s_chunks)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0

    if name == "ce":  # the method detects what it should: torchtune keeps fp32 work per chunk
        with _SavedBytes() as theirs:
            tt.CEWithChunkedOutputLoss(n)(s_chunks, labels)
        assert theirs.largest_fp32 >= chunk_elems


def test_checkpoint_with_only_the_student_requiring_grad():
    """Teacher without grad (the KD case) works through the checkpoint; a teacher with grad works too."""
    student, teacher, labels = _kd_inputs(13, 24)
    assert not teacher.requires_grad
    s_chunks = _split(student, 4, "tensor_split")
    with torch.no_grad():
        t_chunks = [t * 1.0 for t in _split(teacher, 4, "tensor_split")]
    loss = co.ReverseKLWithChunkedOutputLoss(4)(s_chunks, t_chunks, labels)
    assert loss.requires_grad
    grad = _grad_full(loss, s_chunks)
    ref, ref_grad = _ref_with_grad(lambda x: ref_kd(x, teacher.double(), labels, divergence="reverse_kl"), student)
    _assert_close(grad, ref_grad, 1e-4, 1e-7, "student grad")

    # teacher requiring grad as well: its gradient is the reference's too
    t_leaf = [t.clone().requires_grad_() for t in t_chunks]
    s_leaf = _split(student, 4, "tensor_split")
    loss = co.ReverseKLWithChunkedOutputLoss(4)(s_leaf, t_leaf, labels)
    gt = torch.cat(torch.autograd.grad(loss, t_leaf), dim=1)
    t64 = teacher.double().requires_grad_()
    (ref_gt,) = torch.autograd.grad(ref_kd(student.detach().double(), t64, labels, divergence="reverse_kl"), t64)
    _assert_close(gt, ref_gt, 1e-4, 1e-7, "teacher grad")


def test_no_grad_and_inputs_without_grad_give_plain_values():
    student, teacher, labels = _kd_inputs(13, 25)
    s = _split(student, 4, "tensor_split")
    t = _split(teacher, 4, "tensor_split")
    with torch.no_grad():
        a = co.ForwardKLWithChunkedOutputLoss(4)(s, t, labels)
        c = co.CEWithChunkedOutputLoss(4)(s, labels)
    assert a.grad_fn is None and c.grad_fn is None
    b = co.ForwardKLWithChunkedOutputLoss(4)([x.detach() for x in s], t, labels)
    assert b.grad_fn is None
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, co.ForwardKLWithChunkedOutputLoss(4)(s, t, labels).detach())


# --------------------------------------------------------------------------------------- bad input


def _raises(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_ce_label_range_errors():
    g = _gen(26)
    x = _logits((B, 8, V), g)
    chunks = _split(x, 4, "tensor_split")
    ce = co.CEWithChunkedOutputLoss(4)
    for bad in (V, V + 5, -5, -1):
        labels = make_labels((B, 8), V, "some", g)
        labels[0, 3] = bad
        _raises(r"labels", ce, chunks, labels)
    # a custom ignore_index is not out of range
    labels = make_labels((B, 8), V, "some", g, ignore_index=-1)
    co.CEWithChunkedOutputLoss(4, ignore_index=-1)(chunks, labels)


def test_validate_false_skips_the_range_check(monkeypatch):
    calls = []
    monkeypatch.setattr(co, "check_label_range", lambda *a: calls.append(a))
    g = _gen(27)
    x = _logits((B, 8, V), g)
    labels = make_labels((B, 8), V, "some", g)
    co.CEWithChunkedOutputLoss(4, validate=False)(_split(x, 4, "tensor_split"), labels)
    assert calls == []
    co.CEWithChunkedOutputLoss(4)(_split(x, 4, "tensor_split"), labels)
    assert len(calls) == 1


def test_ce_input_errors_name_the_argument():
    g = _gen(28)
    x = _logits((B, 8, V), g)
    labels = make_labels((B, 8), V, "some", g)
    chunks = _split(x, 4, "tensor_split")
    ce = co.CEWithChunkedOutputLoss(4)
    _raises(r"labels.*dtype", ce, chunks, labels.float())
    _raises(r"labels.*dtype", ce, chunks, labels != -100)
    _raises(r"logits\[0\].*batch", ce, chunks, labels[:1])
    _raises(r"logits.*7", ce, chunks, labels[:, :7])  # chunk sizes add up to 8, labels have 7
    _raises(r"logits.*empty", ce, [], labels)
    _raises(r"logits\[2\].*vocab", ce, chunks[:2] + [chunks[2][..., :-1]] + chunks[3:], labels)
    _raises(r"logits\[0\].*floating", ce, [c.long() for c in chunks], labels)
    _raises(r"logits\[1\].*3-D", ce, [chunks[0], chunks[1][0]] + chunks[2:], labels)
    _raises(r"labels.*shape", ce, chunks, labels[None])
    _raises(r"logits", ce, "not a tensor", labels)


def test_kd_input_errors_name_the_argument():
    student, teacher, labels = _kd_inputs(8, 29)
    s = _split(student, 4, "tensor_split")
    t = _split(teacher, 4, "tensor_split")
    kd = co.ReverseKLWithChunkedOutputLoss(4)
    _raises(r"teacher_logits.*4 chunks", kd, s, t[:3], labels)
    _raises(r"teacher_logits\[1\].*shape", kd, s, [t[0], t[1][:, :1]] + t[2:], labels)
    _raises(r"teacher_logits\[0\].*vocab|teacher_logits\[0\].*shape", kd, s, [x[..., :-1] for x in t], labels)
    _raises(r"student_logits.*empty", kd, [], [], labels)
    _raises(r"student_logits\[0\].*batch", kd, s, t, labels[:1])
    _raises(r"student_logits.*7", kd, s, t, labels[:, :7])
    _raises(r"teacher_logits\[0\].*floating", kd, s, [x.long() for x in t], labels)
    _raises(r"labels.*dtype", kd, s, t, labels.double())
    _raises(r"teacher_logits", kd, s, teacher[:, :, :-1], labels)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: co.CEWithChunkedOutputLoss(0), "num_output_chunks"),
        (lambda: co.CEWithChunkedOutputLoss(4, label_smoothing=1.5), "label_smoothing"),
        (lambda: co.CEWithChunkedOutputLoss(4, z_loss=-1.0), "z_loss"),
        (lambda: co.CEWithChunkedOutputLoss(4, softcap=0.0), "softcap"),
        (lambda: co.ForwardKLWithChunkedOutputLoss(4, temperature=0.0), "temperature"),
        (lambda: co.JSDWithChunkedOutputLoss(4, beta=1.5), "beta"),
        (lambda: co.SymmetricKLWithChunkedOutputLoss(4, sym_kd_ratio=-0.1), "sym_kd_ratio"),
        (lambda: co.SymmetricKLLoss(2.0), "sym_kd_ratio"),
    ],
)
def test_bad_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", ["ce", "forward_kl"])
def test_chunked_output_under_torch_compile_matches_eager(name):
    """torchtune's recipes compile the loss: under torch.compile (one graph, fullgraph=True) the
    chunked-output losses give eager's values and gradients (the label check runs on device)."""

    g = torch.Generator().manual_seed(7)
    z, zt = torch.randn(2, 9, 31, generator=g), torch.randn(2, 9, 31, generator=g)
    labels = make_labels((2, 9), 31, "some", torch.Generator().manual_seed(8))
    if name == "ce":
        loss_fn = co.CEWithChunkedOutputLoss(2)

        def step(zz):
            return loss_fn(list(zz.tensor_split(2, 1)), labels)

    else:
        loss_fn = co.ForwardKLWithChunkedOutputLoss(2)

        def step(zz):
            return loss_fn(list(zz.tensor_split(2, 1)), list(zt.tensor_split(2, 1)), labels)

    x = z.clone().requires_grad_()
    eager = step(x)
    eager.backward()
    xc = z.clone().requires_grad_()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(xc)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(xc.grad, x.grad)
