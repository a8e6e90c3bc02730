"""Worker of tests/test_vocab_parallel.py: run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Every case runs on both ranks with the vocabulary sharded over them and is compared, on each rank,
with the single-rank fused loss on the full weight and with the fp64 full-logits reference
(tests/reference.py): the loss and the gradients of the hidden states, of this rank's weight rows
and bias rows. Rank 0 prints one line per case, ``ok <case>`` or ``FAIL <case>: <why>`` (a failure on
either rank is reported); the exit status is 1 when any case failed.

    torchrun --nproc_per_node 2 tests/vocab_parallel_worker.py [suite ...]

Suites: ``pg`` (local shard + process group), ``dtensor`` (DTensor on a "tp" mesh, 2-D meshes,
FSDP2 + tensor parallel model), ``memory`` (largest tensor any op produces), ``ignored`` (ranks whose
tokens are all ignored); ``mesh2x2`` (4 ranks: FSDP2 over dp=2 and tensor parallel over tp=2).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_common import DIVERGENCE_CASES, MEMORY_FAMILIES, largest_during, memory_probe_loss, tiny_llama2  # noqa: E402
from reference import make_labels, object_form, ref_ce, ref_kd, ref_log_probs  # noqa: E402

from tune_losses import linear_cross_entropy, linear_distillation_loss, linear_kd_loss, linear_log_probs  # noqa: E402
from tune_losses.accounting import count_step_tokens  # noqa: E402
from tune_losses.options import CEOptions, DistillationOptions, ExecutionOptions, KDOptions, VocabParallelOptions

RANK = WORLD = 0
B, S, H, V = 2, 13, 16, 257  # V odd: shards of 129 and 128 rows
TOL_SINGLE = dict(rtol=1e-5, atol=1e-6)  # against the single-rank fused loss, both fp32
TOL_REF = dict(rtol=2e-5, atol=2e-6)  # against the fp64 reference (as tests/test_fused.py)
RESULTS: List[str] = []


def gen(seed):
    return torch.Generator().manual_seed(seed)


def shard_rows(vocab: int = V, world: Optional[int] = None, rank: Optional[int] = None) -> slice:
    """torch's Shard(0): ceil(V / world) rows each, larger shards first."""
    world, rank = world or WORLD, RANK if rank is None else rank
    per = -(-vocab // world)
    return slice(min(vocab, rank * per), min(vocab, (rank + 1) * per))


def inputs(seed, vocab=V, hidden=H, bias=True, lead=(B, S), ignore="some"):
    g = gen(seed)
    h = torch.randn(*lead, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = make_labels(lead, vocab, ignore, g)
    return h, w, b, labels


def leaves(*ts, grad=None):
    """Fresh leaf copies; those at ``grad``'s False positions (a teacher's inputs) need no gradient."""
    return [None if t is None else t.detach().clone().requires_grad_(grad is None or grad[i]) for i, t in enumerate(ts)]


def close(name, got, expected, tol):
    if got is None or expected is None:
        if (got is None) != (expected is None):
            raise AssertionError(f"{name}: presence differs (got {got is not None}, expected {expected is not None})")
        return
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    torch.testing.assert_close(got.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


def backward(out, grad_output):
    if out.dim() == 0:
        out.backward()
    else:
        out.backward(grad_output)


def check(
    parallel: Callable,
    single: Callable,
    reference: Callable,
    tensors,
    *,
    sharded=(1, 2),
    grad_output_seed=7,
    tol_single=TOL_SINGLE,
):
    """Run one case: ``parallel(*local leaves)`` vs ``single(*full leaves)`` vs ``reference(*fp64 leaves)``.

    ``tensors``: full inputs; indices in ``sharded`` are vocabulary-sharded (this rank's rows given to
    ``parallel``).
    """
    rows = shard_rows(tensors[1].shape[0])
    local = [None if t is None else (t[rows] if i in sharded else t) for i, t in enumerate(tensors)]
    grad = [i < 3 for i in range(len(tensors))]  # hidden, weight, bias; never the teacher's
    lp, ls = leaves(*local, grad=grad), leaves(*tensors, grad=grad)
    lr = leaves(*[None if t is None else t.double() for t in tensors], grad=grad)
    out_p = parallel(*lp)
    out_s = single(*ls)
    out_r = reference(*lr)
    go = None
    if out_s.dim() > 0:
        go = torch.rand(out_s.shape, generator=gen(grad_output_seed)) * 2 - 0.5
    backward(out_p, go)
    backward(out_s, go)
    backward(out_r, None if go is None else go.double())
    close("loss vs single", out_p.detach(), out_s.detach(), tol_single)
    close("loss vs fp64", out_p.detach(), out_r.detach(), TOL_REF)
    for i, (a, s, r) in enumerate(zip(lp, ls, lr)):
        if a is None:
            continue
        gs = None if s.grad is None else (s.grad[rows] if i in sharded else s.grad)
        gr = None if r.grad is None else (r.grad[rows] if i in sharded else r.grad)
        close(f"grad {i} vs single", a.grad, gs, tol_single)
        close(f"grad {i} vs fp64", a.grad, gr, TOL_REF)


def case(name: str, fn: Callable, *args, **kwargs):
    """Run a case on every rank; agree on the verdict (one all-reduce); rank 0 reports it."""
    err = ""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, not raised: every rank must reach the next case
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
        if os.environ.get("VP_DEBUG"):
            traceback.print_exc()
    flags = torch.tensor([0 if not err else 1 << RANK])
    dist.all_reduce(flags)
    msgs = [None] * WORLD
    dist.all_gather_object(msgs, err)
    failed = [f"rank {r}: {m}" for r, m in enumerate(msgs) if m]
    line = f"ok {name}" if not failed else f"FAIL {name}: {'; '.join(failed)}"
    RESULTS.append(line)
    if RANK == 0:
        print(line, flush=True)


# --------------------------------------------------------------------------- local shard + group


def suite_pg():
    group = dist.group.WORLD
    for algorithm in ("grad_in_forward", "recompute"):
        for reduction in ("mean", "sum", "none"):
            for ignore in ("none", "some"):
                for chunk in (5, None):
                    h, w, b, labels = inputs(1, ignore=ignore)
                    kw = dict(reduction=reduction, chunk_size=chunk, algorithm=algorithm)
                    case(
                        f"pg ce {algorithm} {reduction} ignore={ignore} chunk={chunk}",
                        check,
                        lambda hh, ww, bb, kw=kw, labels=labels: linear_cross_entropy(
                            hh, ww, labels, bias=bb, **object_form("ce", process_group=group, **kw)
                        ),
                        lambda hh, ww, bb, kw=kw, labels=labels: linear_cross_entropy(
                            hh, ww, labels, bias=bb, **object_form("ce", **kw)
                        ),
                        lambda hh, ww, bb, reduction=reduction, labels=labels: ref_ce(
                            F.linear(hh, ww, bb), labels, reduction=reduction
                        ),
                        (h, w, b),
                    )
    for opts in (
        {"label_smoothing": 0.1},
        {"z_loss": 1e-3},
        {"softcap": 3.0},
        {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
    ):
        for reduction in ("mean", "none"):
            h, w, b, labels = inputs(2)
            case(
                f"pg ce options {opts} {reduction}",
                check,
                lambda hh, ww, bb, opts=opts, reduction=reduction, labels=labels: linear_cross_entropy(
                    hh,
                    ww,
                    labels,
                    bias=bb,
                    reduction=reduction,
                    chunk_size=7,
                    **object_form("ce", process_group=group, **opts),
                ),
                lambda hh, ww, bb, opts=opts, reduction=reduction, labels=labels: linear_cross_entropy(
                    hh, ww, labels, bias=bb, reduction=reduction, chunk_size=7, **object_form("ce", **opts)
                ),
                lambda hh, ww, bb, opts=opts, reduction=reduction, labels=labels: ref_ce(
                    F.linear(hh, ww, bb), labels, reduction=reduction, **opts
                ),
                (h, w, b),
            )
    # Explicit offsets (no all-gather of the shard sizes).
    h, w, b, labels = inputs(3)
    rows = shard_rows()
    case(
        "pg ce explicit vocab_start / vocab_size",
        check,
        lambda hh, ww, bb: linear_cross_entropy(
            hh,
            ww,
            labels,
            bias=bb,
            chunk_size=6,
            parallel=VocabParallelOptions(process_group=group, vocab_start=rows.start, vocab_size=V),
        ),
        lambda hh, ww, bb: linear_cross_entropy(hh, ww, labels, bias=bb, chunk_size=6),
        lambda hh, ww, bb: ref_ce(F.linear(hh, ww, bb), labels),
        (h, w, b),
    )
    # An even vocabulary, no bias.
    h, w, _, labels = inputs(4, vocab=256, bias=False)
    case(
        "pg ce V=256 no bias",
        check,
        lambda hh, ww, bb: linear_cross_entropy(
            hh, ww, labels, chunk_size=8, parallel=VocabParallelOptions(process_group=group)
        ),
        lambda hh, ww, bb: linear_cross_entropy(hh, ww, labels, chunk_size=8),
        lambda hh, ww, bb: ref_ce(F.linear(hh, ww), labels),
        (h, w, None),
    )

    # Log-probabilities and entropy (one combined output, so both gradients meet grad_output).
    for temperature, ignore in ((1.0, "some"), (0.7, "none"), (1.0, "all")):
        h, w, b, labels = inputs(5, ignore=ignore)
        kw = dict(temperature=temperature, return_entropy=True, chunk_size=5)

        def both(lp_ent):
            return lp_ent[0] + 0.7 * lp_ent[1]

        case(
            f"pg log_probs + entropy T={temperature} ignore={ignore}",
            check,
            lambda hh, ww, bb, kw=kw, labels=labels: both(
                linear_log_probs(hh, ww, labels, bias=bb, **object_form("log_probs", process_group=group, **kw))
            ),
            lambda hh, ww, bb, kw=kw, labels=labels: both(
                linear_log_probs(hh, ww, labels, bias=bb, **object_form("log_probs", **kw))
            ),
            lambda hh, ww, bb, temperature=temperature, labels=labels: both(
                ref_log_probs(F.linear(hh, ww, bb), labels, temperature=temperature)
            ),
            (h, w, b),
        )

    # KD: every divergence, with temperature; student and teacher sharded alike.
    for div, extra in DIVERGENCE_CASES:
        for temperature in (1.0, 2.0):
            for reduction in ("mean", "none"):
                algorithm = "grad_in_forward" if reduction == "mean" else "recompute"
                h, w, b, labels = inputs(10)
                th, tw, tb, _ = inputs(11, hidden=12)
                # the loss's options (the reference's too), then how the fused loss runs
                opts = dict(divergence=div, temperature=temperature, reduction=reduction, **extra)
                run = dict(chunk_size=6, algorithm=algorithm)
                case(
                    f"pg kd {div} {extra} T={temperature} {reduction}",
                    check,
                    lambda hh, ww, bb, thh, tww, tbb, kw=object_form("kd", process_group=group, **run, **opts), labels=labels: (
                        linear_kd_loss(hh, ww, thh, tww, labels, student_bias=bb, teacher_bias=tbb, **kw)
                    ),
                    lambda hh, ww, bb, thh, tww, tbb, kw=object_form("kd", **run, **opts), labels=labels: (
                        linear_kd_loss(hh, ww, thh, tww, labels, student_bias=bb, teacher_bias=tbb, **kw)
                    ),
                    lambda hh, ww, bb, thh, tww, tbb, opts=opts, labels=labels: ref_kd(
                        F.linear(hh, ww, bb), F.linear(thh, tww, tbb), labels, **opts
                    ),
                    (h, w, b, th, tw, tb),
                    sharded=(1, 2, 4, 5),
                )
    # torchtune's forward-KL value (-sum p log q) and no T^2 scaling.
    h, w, b, labels = inputs(12)
    th, tw, tb, _ = inputs(13)
    for reduction in ("sum", "none"):
        opts = dict(
            divergence="jsd", temperature=1.5, beta=0.3, scale_by_temperature_squared=False, reduction=reduction
        )
        case(
            f"pg kd jsd no T^2 scaling {reduction}",
            check,
            lambda hh, ww, bb, thh, tww, tbb, kw=object_form("kd", process_group=group, chunk_size=4, **opts): (
                linear_kd_loss(hh, ww, thh, tww, labels, **kw)
            ),
            lambda hh, ww, bb, thh, tww, tbb, kw=object_form("kd", chunk_size=4, **opts): linear_kd_loss(
                hh, ww, thh, tww, labels, **kw
            ),
            lambda hh, ww, bb, thh, tww, tbb, opts=opts: ref_kd(F.linear(hh, ww), F.linear(thh, tww), labels, **opts),
            (h, w, None, th, tw, None),
            sharded=(1, 4),
        )

    # Distillation: CE + KD in one pass.
    for div, extra in [("forward_kl", {}), ("jsd", {"beta": 0.4}), ("reverse_kl", {})]:
        for reduction in ("mean", "sum", "none"):
            h, w, b, labels = inputs(20)
            th, tw, tb, _ = inputs(21)
            kw = dict(
                kd_ratio=0.3,
                divergence=div,
                temperature=2.0,
                label_smoothing=0.1,
                reduction=reduction,
                chunk_size=5,
                **extra,
            )

            def ref(hh, ww, bb, thh, tww, tbb, kw=kw, labels=labels, extra=extra):
                ce = ref_ce(F.linear(hh, ww, bb), labels, label_smoothing=0.1, reduction=kw["reduction"])
                kd = ref_kd(
                    F.linear(hh, ww, bb),
                    F.linear(thh, tww, tbb),
                    labels,
                    divergence=kw["divergence"],
                    temperature=2.0,
                    reduction=kw["reduction"],
                    **extra,
                )
                return 0.7 * ce + 0.3 * kd

            case(
                f"pg distillation {div} {reduction}",
                check,
                lambda hh, ww, bb, thh, tww, tbb, kw=object_form("distillation", process_group=group, **kw), labels=labels: (
                    linear_distillation_loss(hh, ww, thh, tww, labels, student_bias=bb, teacher_bias=tbb, **kw).loss
                ),
                lambda hh, ww, bb, thh, tww, tbb, kw=kw, labels=labels: (
                    linear_distillation_loss(
                        hh, ww, thh, tww, labels, student_bias=bb, teacher_bias=tbb, **object_form("distillation", **kw)
                    ).loss
                ),
                ref,
                (h, w, b, th, tw, tb),
                sharded=(1, 2, 4, 5),
            )

    # Every token ignored: loss 0, gradients 0, every collective still runs (no hang).
    def all_ignored(fn_kind, reduction, algorithm):
        h, w, b, labels = inputs(30, ignore="all")
        th, tw, _, _ = inputs(31)
        rows = shard_rows()
        hh, ww, bb = leaves(h, w[rows], b[rows])
        if fn_kind == "ce":
            out = linear_cross_entropy(
                hh,
                ww,
                labels,
                bias=bb,
                reduction=reduction,
                chunk_size=4,
                options=CEOptions(label_smoothing=0.1, z_loss=1e-3),
                parallel=VocabParallelOptions(process_group=group),
                execution=ExecutionOptions(algorithm=algorithm),
            )
        else:
            out = linear_distillation_loss(
                hh,
                ww,
                th,
                tw[rows],
                labels,
                student_bias=bb,
                reduction=reduction,
                chunk_size=4,
                options=DistillationOptions(kd=KDOptions(divergence="jsd")),
                parallel=VocabParallelOptions(process_group=group),
                execution=ExecutionOptions(algorithm=algorithm),
            ).loss
        backward(out, torch.ones_like(out) if out.dim() else None)
        assert torch.equal(out.detach(), torch.zeros_like(out)), f"loss {out}"
        for name, t in (("hidden", hh), ("weight", ww), ("bias", bb)):
            assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), f"{name} grad not zero"

    for kind in ("ce", "distillation"):
        for reduction, algorithm in (("mean", "grad_in_forward"), ("sum", "recompute"), ("none", "auto")):
            case(f"pg all ignored {kind} {reduction}", all_ignored, kind, reduction, algorithm)

    # A NaN / inf hidden state at a counted token makes the loss non-finite on every rank (one rank's
    # logits are enough: the per-token sums carry it to all).
    def non_finite(value, side):
        h, w, b, labels = inputs(32)
        th, tw, _, _ = inputs(33)
        row = int((labels.reshape(-1) != -100).nonzero()[1])
        poisoned = (h if side == "student" else th).clone()
        poisoned.view(-1, H)[row, 3] = value
        h, th = (poisoned, th) if side == "student" else (h, poisoned)
        rows = shard_rows()
        outs = [
            linear_cross_entropy(
                h, w[rows], labels, bias=b[rows], chunk_size=4, parallel=VocabParallelOptions(process_group=group)
            )
        ]
        for div, extra in DIVERGENCE_CASES:
            outs.append(
                linear_kd_loss(
                    h,
                    w[rows],
                    th,
                    tw[rows],
                    labels,
                    student_bias=b[rows],
                    chunk_size=4,
                    **object_form("kd", divergence=div, process_group=group, **extra),
                )
            )
        if side == "teacher":
            outs = outs[1:]
        assert not any(torch.isfinite(o) for o in outs), [float(o) for o in outs]

    for value in (float("nan"), float("inf")):
        for side in ("student", "teacher"):
            case(f"pg non-finite {value} {side} hidden", non_finite, value, side)

    # No grad mode: values only.
    def no_grad_values():
        h, w, b, labels = inputs(40)
        rows = shard_rows()
        with torch.no_grad():
            got = linear_cross_entropy(
                h, w[rows], labels, bias=b[rows], chunk_size=5, parallel=VocabParallelOptions(process_group=group)
            )
            expected = linear_cross_entropy(h, w, labels, bias=b, chunk_size=5)
        close("loss", got, expected, TOL_SINGLE)

    case("pg no_grad", no_grad_values)

    # Errors raised on every rank alike (no rank left waiting in a collective).
    def errors():
        h, w, b, labels = inputs(41)
        rows = shard_rows()
        bad = labels.clone()
        bad[0, 0] = V  # out of range of the *global* vocabulary
        for call, match in [
            (
                lambda: linear_cross_entropy(h, w[rows], bad, parallel=VocabParallelOptions(process_group=group)),
                "labels",
            ),
            (
                lambda: linear_kd_loss(
                    h, w[rows], h, w[: 3 + RANK], labels, parallel=VocabParallelOptions(process_group=group)
                ),
                "teacher_weight",
            ),
            (
                lambda: linear_cross_entropy(
                    h, w[rows], labels, parallel=VocabParallelOptions(process_group=group, vocab_parallel=False)
                ),
                "vocab_parallel",
            ),
            (
                lambda: linear_cross_entropy(h, w, labels, parallel=VocabParallelOptions(vocab_parallel=True)),
                "vocab_parallel",
            ),
            (lambda: linear_cross_entropy(h, w, labels, parallel=VocabParallelOptions(vocab_start=0)), "vocab_start"),
            (
                lambda: linear_cross_entropy(
                    h, w[rows], labels, parallel=VocabParallelOptions(process_group=group, vocab_start=rows.start + 1)
                ),
                "vocab_start",
            ),
        ]:
            try:
                call()
            except ValueError as e:
                assert match in str(e), f"{match!r} not in {e}"
            else:
                raise AssertionError(f"no ValueError mentioning {match}")
        # Labels valid globally but outside this rank's rows are fine (checked against the global V).
        linear_cross_entropy(h, w[rows], labels, parallel=VocabParallelOptions(process_group=group))

    case("pg errors", errors)


# ------------------------------------------------------------------------------------- DTensor


def suite_dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))

    def dt_case(kind, reduction, algorithm="auto", bias=True, vocab=V, vocab_parallel=None, mesh=mesh, placements=None):
        placements = placements or [Shard(0)] * mesh.ndim
        h, w, b, labels = inputs(50, vocab=vocab, bias=bias)
        th, tw, tb, _ = inputs(51, vocab=vocab)
        go = torch.rand(labels.shape, generator=gen(52)) * 2 - 0.5 if reduction == "none" else None
        d_w = distribute_tensor(w, mesh, placements).requires_grad_(True)
        d_b = distribute_tensor(b, mesh, placements).requires_grad_(True) if bias else None
        d_tw = distribute_tensor(tw, mesh, placements)
        d_tb = distribute_tensor(tb, mesh, placements)
        hh = h.clone().requires_grad_(True)

        def call(hx, wx, bx, twx, tbx, **extra):
            if kind == "ce":
                return linear_cross_entropy(
                    hx,
                    wx,
                    labels,
                    bias=bx,
                    reduction=reduction,
                    chunk_size=6,
                    **object_form("ce", algorithm=algorithm, label_smoothing=0.1, z_loss=1e-3, **extra),
                )
            loss, opts = {
                "kd": (linear_kd_loss, dict(divergence="jsd", beta=0.3, temperature=2.0)),
                "distillation": (linear_distillation_loss, dict(kd_ratio=0.4, divergence="reverse_kl")),
            }[kind]
            out = loss(
                hx,
                wx,
                h,
                twx,
                labels,
                student_bias=bx,
                teacher_bias=tbx,
                reduction=reduction,
                chunk_size=6,
                **object_form(kind, algorithm=algorithm, **opts, **extra),
            )
            return out.loss if kind == "distillation" else out

        out = call(hh, d_w, d_b, d_tw, d_tb, vocab_parallel=vocab_parallel)
        backward(out, go)
        assert isinstance(d_w.grad, DTensor), type(d_w.grad)
        assert tuple(d_w.grad.placements) == tuple(d_w.placements), d_w.grad.placements
        s_h, s_w, s_b = leaves(h, w, b)
        expected = call(s_h, s_w, s_b, tw, tb)
        backward(expected, go)
        close("loss", out.detach(), expected.detach(), TOL_SINGLE)
        close("grad hidden", hh.grad, s_h.grad, TOL_SINGLE)
        close("grad weight", d_w.grad.full_tensor(), s_w.grad, TOL_SINGLE)
        if bias:
            assert isinstance(d_b.grad, DTensor) and tuple(d_b.grad.placements) == tuple(d_b.placements)
            close("grad bias", d_b.grad.full_tensor(), s_b.grad, TOL_SINGLE)

    for kind in ("ce", "kd", "distillation"):
        for reduction in ("mean", "none"):
            case(f"dtensor tp {kind} {reduction}", dt_case, kind, reduction)
    case("dtensor tp ce sum recompute V=256 no bias", dt_case, "ce", "sum", "recompute", bias=False, vocab=256)
    case("dtensor tp vocab_parallel=True", dt_case, "ce", "mean", vocab_parallel=True)
    case("dtensor tp vocab_parallel=False (gathered once)", dt_case, "ce", "mean", vocab_parallel=False)

    # The path is really vocabulary-parallel: no rank ever sees more than its rows.
    def never_gathers():
        from tune_losses.fused import placement

        seen = []
        original = placement.materialize_weight

        def spy(t, *a, **k):
            if isinstance(t, DTensor):
                seen.append(tuple(t.shape))
            return original(t, *a, **k)

        placement.materialize_weight = spy
        try:
            dt_case("kd", "mean")
        finally:
            placement.materialize_weight = original
        assert not seen, f"materialize_weight gathered {seen}"

    case("dtensor tp: weights never gathered", never_gathers)

    # 2-D meshes (dp, tp): tp sharded, dp gathered with FSDP semantics (mean gradient over dp).
    mesh_1x2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    case("dtensor 2-D mesh (dp=1, tp=2) Shard/Shard", dt_case, "ce", "mean", mesh=mesh_1x2)
    case(
        "dtensor 2-D mesh (dp=1, tp=2) Replicate/Shard",
        dt_case,
        "distillation",
        "mean",
        mesh=mesh_1x2,
        placements=[Replicate(), Shard(0)],
    )

    def dp_gathered(ignore_on_rank1: bool):
        # dp=2, tp=1: each dp rank has its own tokens; the weight's gradient is the mean over dp ranks
        # of the per-rank gradients (FSDP2's reduction), as in materialize_weight.
        mesh_2x1 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
        h_all, w, b, labels_all = inputs(60, lead=(WORLD, B, S))
        if ignore_on_rank1:
            labels_all[1] = -100
        d_w = distribute_tensor(w, mesh_2x1, [Shard(0), Shard(0)]).requires_grad_(True)
        hh = h_all[RANK].clone().requires_grad_(True)
        out = linear_cross_entropy(hh, d_w, labels_all[RANK], chunk_size=5)
        out.backward()
        s_w = w.clone().requires_grad_(True)
        ref_losses, ref_h = [], None
        for r in range(WORLD):
            s_h = h_all[r].clone().requires_grad_(True)
            loss_r = linear_cross_entropy(s_h, s_w, labels_all[r], chunk_size=5)
            (loss_r / WORLD).backward()
            ref_losses.append(loss_r.detach())
            if r == RANK:
                ref_h = s_h.grad * WORLD
        close("loss", out.detach(), ref_losses[RANK], TOL_SINGLE)
        close("grad hidden", hh.grad, ref_h, TOL_SINGLE)
        close("grad weight", d_w.grad.full_tensor(), s_w.grad, TOL_SINGLE)

    case("dtensor 2-D mesh (dp=2, tp=1): dp gathered, mean grad", dp_gathered, False)
    case("dtensor 2-D mesh (dp=2, tp=1): rank 1 all ignored", dp_gathered, True)

    case("fsdp2 + tp model (dp=1, tp=2)", fsdp_tp_model)
    case("fsdp2 + tp model (dp=1, tp=2), output its own FSDP2 unit", fsdp_tp_model, 1, True)


def fsdp_tp_model(dp: int = 1, shard_output: bool = False):
    """A llama2 with its output projection ColwiseParallel over "tp" and FSDP2 over "dp" (the recipe's
    layout, mesh (dp, world / dp)): the fused loss in hidden-states mode equals the single-process run.
    Each dp rank has its own batch; FSDP2 averages gradients over dp, so the reference is the mean of
    the dp ranks' losses. ``shard_output``: the output layer is also its own FSDP2 unit (torchtune's
    ``custom_sharded_layers``), so the loss sees FSDP2's 2-D (_StridedShard, Shard) parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from tune_losses import LinearCrossEntropyLoss, LinearDistillationLoss
    from tune_losses.fused import placement

    g = gen(70)
    tokens = torch.randint(0, V, (dp, B, S), generator=g)
    labels = make_labels((dp, B, S), V, "some", g)
    mesh = init_device_mesh("cpu", (dp, WORLD // dp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")

    def grads(model):
        return {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }

    gathered = []
    original = placement.materialize_weight

    def spy(t, *a, **k):  # the vocabulary-parallel path never gathers a whole weight
        if isinstance(t, DTensor):
            gathered.append(tuple(t.shape))
        return original(t, *a, **k)

    placement.materialize_weight = spy
    try:
        for kd in (False, True):
            model, teacher = tiny_llama2(V, 0), tiny_llama2(V, 1)
            ref_model, ref_teacher = tiny_llama2(V, 0), tiny_llama2(V, 1)
            for m in (model, teacher):
                parallelize_module(m.output, mesh["tp"], ColwiseParallel())
                for layer in m.layers:
                    fully_shard(layer, mesh=mesh["dp"])
                if shard_output:
                    fully_shard(m.output, mesh=mesh["dp"])
                fully_shard(m, mesh=mesh["dp"])
            if kd:
                loss_fn = LinearDistillationLoss(kd_ratio=0.5, chunk_size=5, divergence="jsd")
                ref_fn = LinearDistillationLoss(kd_ratio=0.5, chunk_size=5, divergence="jsd")
                for fn, st, te in ((loss_fn, model, teacher), (ref_fn, ref_model, ref_teacher)):
                    fn.set_model_output(st)
                    fn.set_teacher_output(te)
            else:
                loss_fn, ref_fn = LinearCrossEntropyLoss(chunk_size=5), LinearCrossEntropyLoss(chunk_size=5)
                loss_fn.set_model_output(model)
                ref_fn.set_model_output(ref_model)
            out = model(tokens[dp_rank])
            # Not separately sharded, the output weight is the FSDP2 root's unsharded parameter after the
            # forward: a DTensor Shard(0) on the "tp" mesh. Separately sharded (and never called in
            # hidden-states mode), it is FSDP2's 2-D parameter; tp is found by its mesh dimension name.
            weight = loss_fn.projection.weight
            assert isinstance(weight, DTensor) and "tp" in weight.device_mesh.mesh_dim_names, weight
            if not shard_output:
                assert weight.device_mesh.mesh_dim_names == ("tp",), weight.device_mesh
            if kd:
                with torch.no_grad():
                    t_out = teacher(tokens[dp_rank])
                loss = loss_fn(out, t_out, labels[dp_rank])
            else:
                loss = loss_fn(out, labels[dp_rank])
            loss.backward()
            ref_losses = []
            for r in range(dp):
                if kd:
                    with torch.no_grad():
                        ref_t = ref_teacher(tokens[r])
                    ref = ref_fn(ref_model(tokens[r]), ref_t, labels[r])
                else:
                    ref = ref_fn(ref_model(tokens[r]), labels[r])
                (ref / dp).backward()
                ref_losses.append(ref.detach())
            close("loss", loss.detach(), ref_losses[dp_rank], TOL_SINGLE)
            got, expected = grads(model), grads(ref_model)
            assert set(got) == set(expected), set(got) ^ set(expected)
            for n in got:
                close(f"grad {n}", got[n], expected[n], dict(rtol=1e-5, atol=1e-5))
    finally:
        placement.materialize_weight = original
    assert not gathered, f"materialize_weight gathered {gathered}"


def suite_mesh2x2():
    """4 ranks, mesh (dp=2, tp=2): FSDP2 over dp with real data parallelism, vocabulary-parallel over tp."""
    for shard_output in (False, True):
        case(f"mesh2x2 fsdp2 + tp model shard_output={shard_output}", fsdp_tp_model, 2, shard_output)


# -------------------------------------------------------------------------------------- memory


def suite_memory():
    n, _hdim, vocab, chunk = 512, 16, 2048, 32
    rows = shard_rows(vocab)
    local_vocab = rows.stop - rows.start  # 1024
    group = dist.group.WORLD

    def probe(family):
        h, w, b, labels = inputs(80, vocab=vocab, lead=(n,))
        th, tw, _, _ = inputs(81, vocab=vocab, lead=(n,))

        placement = dict(process_group=group, vocab_start=rows.start, vocab_size=vocab)
        loss = memory_probe_loss(family, labels, th, tw[rows], chunk, **placement)
        largest, op = largest_during(loss, leaves(h, w[rows], b[rows]))
        limit = chunk * local_vocab  # one chunk of this rank's logits
        assert largest <= limit, f"{op} produced {largest} elements > one chunk {limit}"
        assert n * local_vocab > 8 * limit  # the probe would see a [N, V_r] tensor

    for family in MEMORY_FAMILIES:
        case(f"memory {family}", probe, family)


# ------------------------------------------------------------------------------------- ignored


def suite_ignored():
    """Ranks with their own tokens (data-parallel), rank 1's all ignored: the recipe's token count
    over ranks and an FSDP-style sharded weight's collectives still run on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    def one_rank_ignored(reduction_path: str):
        h_all, w, b, labels_all = inputs(90, lead=(WORLD, B, S))
        labels_all[1] = -100
        total = count_step_tokens([labels_all[RANK]])  # all-reduce: rank 1 contributes 0
        expected_total = (labels_all != -100).sum()
        assert torch.equal(total, expected_total), (total, expected_total)
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))  # FSDP-style, gathered once
        d_w = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        hh = h_all[RANK].clone().requires_grad_(True)
        loss_sum = linear_cross_entropy(
            hh,
            d_w,
            labels_all[RANK],
            reduction="sum",
            chunk_size=4,
            execution=ExecutionOptions(algorithm=reduction_path),
        )
        (loss_sum * WORLD / total.float()).backward()  # the recipe's exact normalization
        s_w = w.clone().requires_grad_(True)
        flat_h = h_all.reshape(-1, H)
        ref = linear_cross_entropy(flat_h, s_w, labels_all.reshape(-1), chunk_size=4)
        ref.backward()
        close("grad weight", d_w.grad.full_tensor(), s_w.grad, TOL_SINGLE)
        if RANK == 1:
            assert torch.equal(loss_sum.detach(), torch.zeros(())) and torch.equal(hh.grad, torch.zeros_like(hh))

    for path in ("grad_in_forward", "recompute"):
        case(f"ignored: rank 1 all ignored, dp token count + gathered weight ({path})", one_rank_ignored, path)


SUITES = {
    "pg": suite_pg,
    "dtensor": suite_dtensor,
    "memory": suite_memory,
    "ignored": suite_ignored,
    "mesh2x2": suite_mesh2x2,
}
DEFAULT_SUITES = ("pg", "dtensor", "memory", "ignored")  # 2 ranks; mesh2x2 needs 4


def main(argv):
    global RANK, WORLD
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    for name in argv or DEFAULT_SUITES:
        SUITES[name]()
    dist.barrier()
    dist.destroy_process_group()
    failed = [r for r in RESULTS if r.startswith("FAIL")]
    if RANK == 0:
        print(f"done: {len(RESULTS) - len(failed)} ok, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
