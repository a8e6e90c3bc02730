"""The chunk loop behind every fused linear loss.

Hidden states ``[N, H]`` are cut into token chunks; each chunk's logits ``[n, V]`` are made, used and
freed before the next, so no ``[N, V]`` tensor exists in forward or backward. Two autograd
functions share one loop (:func:`chunk_pass`):

* :class:`GradInForward` (reductions ``sum`` / ``mean``): the backward's gradients are computed in
  the forward pass, so logits are made once. Between forward and backward it keeps exactly dX
  ``[N, H]`` and dW ``[V, H]`` (the floor: the gradients themselves) and no per-token state.
  Backward multiplies them by ``grad_output``.
* :class:`Recompute` (reduction ``none``, or on request): forward keeps nothing but its inputs;
  backward runs the loop again with the per-token ``grad_output`` as token weights.

Per token, the loss is ``ce_weight * CE + kd_weight * KD``, each term optional (distillation gets
both in one pass over each chunk of student logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from tune_losses.chunking import token_chunk_bounds
from tune_losses.divergences import cross_entropy_with_grad, kd_divergence_with_grad
from tune_losses.options import CEOptions, KDOptions

# Elements of one fp32 chunk of logits ([n, V]); the chunk size is this divided by V (a power of 2),
# but never fewer than _MIN_CHUNK_TOKENS tokens. Measured with `python -m benchmarks.sweep_chunks`
# (fwd+bwd, CPU fp32, 2 threads, median of 5 interleaved rounds; peak = RSS above the inputs):
#   CE N=2048 H=256 V=32768, chunk tokens 32/64/128/256/512: peak 38/42/50/66/98 MiB (plain 768,
#     torch's chunked linear_cross_entropy 68), time 1.32/0.93/0.82/0.85/0.83x plain. 2^22 (128
#     tokens here) is as fast as any and keeps a wide margin under torch's chunked peak.
#   KD forward KL, same size, 32/64/128/256: peak 50/66/98/162 MiB (torchtune's chunked 1152), time
#     1.09/0.92/0.83/0.87x torchtune's on a quiet machine (3.6/1.5/1.09/0.94x under a load average
#     of 3): 128 tokens, not the 64 that 2^22 / (2 V) gives; 256 would leave no margin to 0.15x.
#   CE N=1024 H=512 V=128256, 32/64/128/256: peak 268/284/315/378 MiB (plain 1503), time
#     1.85/1.26/1.05/1.20x plain: 128 tokens, not the 32 that 2^22 / V gives.
# Fewer than ~128 rows make every matmul and reduction of a chunk slow on CPU (the logits matmul
# [n, H] @ [H, V] runs 1.5x slower at 128 rows and 2.2x at 64 than at 2048), hence the minimum; a
# [128, V] buffer is no larger than dW [V, H] whenever H >= 128. CUDA: larger chunks (unmeasured here).
_TARGET_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
_MIN_CHUNK_TOKENS = 128


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device, num_logit_sets: int = 1) -> int:
    """Tokens per chunk: a power of two near ``target_elements / (V * num_logit_sets)``, within
    [``_MIN_CHUNK_TOKENS``, N].

    ``num_logit_sets`` is 2 for distillation (student and teacher chunks alive together).
    """
    target = _TARGET_CHUNK_ELEMENTS.get(device.type, _TARGET_CHUNK_ELEMENTS["cuda"])
    n = max(target // max(vocab_size * num_logit_sets, 1), 1)
    n = 1 << (n.bit_length() - 1)
    return max(1, min(max(n, _MIN_CHUNK_TOKENS), num_tokens))


@dataclass(frozen=True)
class FusedSpec:
    """What one fused call computes; non-tensor, so it travels through autograd as a constant.

    Attributes:
        ce: cross-entropy options, or None for no CE term.
        kd: divergence options, or None for no KD term (then no teacher inputs).
        ce_weight, kd_weight: per-token weights of the two terms.
        chunk_size: tokens per chunk (None: :func:`default_chunk_size`).
        ignore_index: labels equal to it contribute nothing.
    """

    ce: Optional[CEOptions]
    kd: Optional[KDOptions]
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    chunk_size: Optional[int] = None
    ignore_index: int = -100


def _logits(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of one chunk: ``x @ w.T + b`` in the input dtype (as eager PyTorch), then upcast."""
    z = torch.nn.functional.linear(x, w, b)
    return z if z.dtype == torch.float32 else z.float()


def accumulate_chunk_grads(
    g: torch.Tensor,
    xc: torch.Tensor,
    w: torch.Tensor,
    rows: slice,
    dx: Optional[torch.Tensor],
    dw: Optional[torch.Tensor],
    db: Optional[torch.Tensor],
    token_weight: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
) -> None:
    """Turn one chunk's fp32 logit gradient ``g`` ``[n, V]`` (overwritten) into the parameter gradients.

    ``dx[rows] = g @ w`` (in x's dtype), ``dw += g.T @ xc`` and ``db += g.sum(0)`` (fp32
    accumulators); a None buffer is skipped. ``token_weight`` (``[N]``, indexed by ``rows``) and
    ``grad_scale`` (0-dim) multiply ``g`` first.
    """
    if token_weight is not None:
        g.mul_(token_weight[rows].unsqueeze(-1))
    if grad_scale is not None:
        # Fix (precision): scale in fp32 *before* the low-precision cast, as eager autograd does
        # (grad of mean = g / N, then one rounding). Scaling the bf16 dX afterwards rounded twice
        # and made dX ~1.2x less accurate than eager bf16 PyTorch (tests/test_fused.py).
        g.mul_(grad_scale)
    g_lp = g if g.dtype == xc.dtype else g.to(xc.dtype)
    if dx is not None:
        torch.mm(g_lp, w, out=dx[rows])
    if dw is not None:
        if g_lp.dtype == torch.float32 and xc.dtype == torch.float32:
            dw.addmm_(g_lp.t(), xc)
        elif xc.device.type == "cpu":
            # Fix (precision): a low-precision product per chunk is rounded to bf16 before the
            # fp32 accumulation, so with many chunks dW was up to ~1.4x less accurate than eager
            # (one rounding). CPU has no mixed-dtype matmul (mm out_dtype is CUDA-only), so take
            # the chunk's product in fp32 (a chunk-sized upcast; on CPUs without native bf16 this
            # is also the faster matmul).
            dw.addmm_(g.t(), xc.float())
        else:  # low precision: matmul in the input dtype, accumulate in fp32
            dw.add_(g_lp.t() @ xc)
    if db is not None:
        db.add_(g.sum(0))


class LocalChunkMath:
    """Per-chunk math when this process holds every vocabulary row of the weight.

    :func:`chunk_pass` asks it for the vocabulary size (for the chunk rule), each chunk's CE and KD
    values with their logit gradients, and a last word on dX. The vocabulary-parallel losses give
    the loop another such object (:class:`tune_losses.fused.vocab_parallel.VocabParallelPass`)
    whose math all-reduces across the ranks holding the other rows: the loop itself is shared.
    """

    def vocab_size(self, w: torch.Tensor) -> int:
        return w.shape[0]

    def ce(self, z, labels, valid, opts: CEOptions, need_grad: bool):
        return cross_entropy_with_grad(z, labels, opts)

    def kd(self, zs, zt, opts: KDOptions, need_grad: bool):
        return kd_divergence_with_grad(zs, zt, opts, need_grad)

    def finish_dx(self, dx: torch.Tensor) -> None:
        """Nothing to do: a whole-vocabulary dX is complete."""


LOCAL_MATH = LocalChunkMath()


def chunk_pass(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    labels: torch.Tensor,
    tx: Optional[torch.Tensor],
    tw: Optional[torch.Tensor],
    tb: Optional[torch.Tensor],
    spec: FusedSpec,
    token_weight: Optional[torch.Tensor],
    need: Tuple[bool, bool, bool],
    grad_scale: Optional[torch.Tensor] = None,
    math: LocalChunkMath = LOCAL_MATH,
):
    """One pass over all token chunks.

    Args:
        x: ``[N, H]`` student hidden states; w ``[V, H]``; b ``[V]`` or None.
        labels: ``[N]``.
        tx, tw, tb: teacher hidden ``[N, Ht]``, weight ``[V, Ht]``, bias, or None without KD.
        token_weight: ``[N]`` fp32 gradient weight per token (``grad_output`` of ``reduction="none"``),
            or None for weight 1.
        need: which of (dx, dw, db) to compute.
        grad_scale: 0-dim fp32 factor applied to every gradient while still in fp32 (the
            ``1 / num_tokens`` of ``reduction="mean"``), or None.
        math: the per-chunk math (:class:`LocalChunkMath`, or a vocabulary-parallel one).

    Returns:
        ``(ce [N] fp32 or None, kd [N] fp32 or None, dx, dw, db)``; per-token values are 0 at
        ignored tokens; a gradient is None when not needed. dw / db are fp32 accumulators.
    """
    num_tokens = x.shape[0]
    vocab = w.shape[0]
    valid = labels != spec.ignore_index
    sets = 2 if spec.kd is not None else 1
    size = spec.chunk_size or default_chunk_size(num_tokens, math.vocab_size(w), x.device, sets)
    ce_all = torch.zeros(num_tokens, dtype=torch.float32, device=x.device) if spec.ce else None
    kd_all = torch.zeros(num_tokens, dtype=torch.float32, device=x.device) if spec.kd else None
    need_dx, need_dw, need_db = need
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=w.device) if need_db else None
    any_grad = need_dx or need_dw or need_db

    for start, end in token_chunk_bounds(num_tokens, size):
        xc, lab, ok = x[start:end], labels[start:end], valid[start:end]
        g = None
        if spec.ce is not None:
            ce, g_ce = math.ce(_logits(xc, w, b), lab, ok, spec.ce, any_grad)
            ce_all[start:end] = ce
            if any_grad:
                g = g_ce.mul_(spec.ce_weight) if spec.ce_weight != 1.0 else g_ce
            del g_ce
        if spec.kd is not None:
            with torch.no_grad():
                zt = _logits(tx[start:end], tw, tb)
            kd, g_kd = math.kd(_logits(xc, w, b), zt, spec.kd, any_grad)
            del zt
            kd_all[start:end] = torch.where(ok, kd, 0.0)
            if any_grad:
                g_kd.mul_(ok.unsqueeze(-1) * spec.kd_weight)
                g = g_kd if g is None else g.add_(g_kd)
            del g_kd
        if not any_grad:
            continue
        accumulate_chunk_grads(g, xc, w, slice(start, end), dx, dw, db, token_weight, grad_scale)
        del g
    if need_dx:
        math.finish_dx(dx)
    return ce_all, kd_all, dx, dw, db


def _combine(spec: FusedSpec, ce: Optional[torch.Tensor], kd: Optional[torch.Tensor]) -> torch.Tensor:
    """``ce_weight * ce + kd_weight * kd`` per token, always a new tensor (the parts are returned too)."""
    total = None
    if ce is not None:
        total = ce * spec.ce_weight
    if kd is not None:
        total = kd * spec.kd_weight if total is None else total.add_(kd, alpha=spec.kd_weight)
    return total


def _needs(ctx, x, w, b) -> Tuple[bool, bool, bool]:
    return (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])


def _zero_part(x: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return t if t is not None else torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)


class GradInForward(torch.autograd.Function):
    """Sum-reduced fused loss whose gradients are computed during forward.

    Outputs ``(total_sum, ce_sum, kd_sum)``, 0-dim fp32, each times ``scale`` when given; only
    ``total_sum`` is differentiable (the parts are for logging). Backward scales the stored dX, dW,
    db by ``grad_output``; it can run once (the stored gradients are handed over, not copied).

    ``scale`` (0-dim fp32 or None): ``1 / num_tokens`` for ``reduction="mean"``, folded into the
    gradients in fp32 during forward so that low-precision dX is rounded once, as in eager PyTorch.

    ``pass_fn``: the chunk loop, :func:`chunk_pass` by default; the vocabulary-parallel losses pass
    their own loop with the same signature and results
    (:class:`tune_losses.fused.vocab_parallel.VocabParallelPass`).
    """

    @staticmethod
    def forward(ctx, x, w, b, labels, tx, tw, tb, spec: FusedSpec, scale=None, pass_fn=None):
        need = _needs(ctx, x, w, b)
        ce, kd, dx, dw, db = (pass_fn or chunk_pass)(x, w, b, labels, tx, tw, tb, spec, None, need, scale)
        ctx.grads = (dx, dw, db)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        ce_sum, kd_sum = _zero_part(x, ce).sum(), _zero_part(x, kd).sum()
        total = _combine(spec, ce, kd).sum()
        if scale is not None:
            total, ce_sum, kd_sum = total * scale, ce_sum * scale, kd_sum * scale
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return total, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        if ctx.grads is None:
            raise RuntimeError("fused loss: backward ran twice; retain_graph is not supported by algorithm='grad_in_forward'")
        dx, dw, db = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        # grad_total is a 0-dim tensor: scaling on device, no host sync.
        if dx is not None:
            dx = dx.mul_(grad_total.to(dx.dtype))
        if dw is not None:
            dw = dw.mul_(grad_total).to(w_dtype)
        if db is not None:
            db = db.mul_(grad_total).to(b_dtype)
        return dx, dw, db, None, None, None, None, None, None, None


class Recompute(torch.autograd.Function):
    """Per-token fused loss; backward recomputes each chunk with ``grad_output`` as token weights.

    Outputs ``(total [N], ce [N], kd [N])`` fp32; only ``total`` is differentiable. ``pass_fn`` as
    :class:`GradInForward`'s.
    """

    @staticmethod
    def forward(ctx, x, w, b, labels, tx, tw, tb, spec: FusedSpec, pass_fn=None):
        pass_fn = pass_fn or chunk_pass
        ce, kd, *_ = pass_fn(x, w, b, labels, tx, tw, tb, spec, None, (False, False, False))
        ctx.save_for_backward(x, w, b, labels, tx, tw, tb)
        ctx.spec = spec
        ctx.pass_fn = pass_fn
        total = _combine(spec, ce, kd)
        ce, kd = _zero_part(x, ce), _zero_part(x, kd)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        x, w, b, labels, tx, tw, tb = ctx.saved_tensors
        need = _needs(ctx, x, w, b)
        *_, dx, dw, db = ctx.pass_fn(x, w, b, labels, tx, tw, tb, ctx.spec, grad_total.float(), need)
        dw = None if dw is None else dw.to(w.dtype)
        db = None if db is None else db.to(b.dtype)
        return dx, dw, db, None, None, None, None, None, None
