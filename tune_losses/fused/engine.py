"""The chunk loop behind every fused linear loss.

Hidden states ``[N, H]`` are cut into token chunks; each chunk's student logits ``[n, V]`` are made
once (and the teacher's once, when a term needs them) into a buffer that every chunk of the call
reuses, handed to every loss term (:mod:`tune_losses.terms`), and overwritten by their gradient, so
no ``[N, V]`` tensor exists in forward or backward and a chunk allocates no ``[n, V]`` memory. The
terms' weighted logit gradients are summed into one ``[n, V]`` gradient per
chunk, which becomes dX (``g @ W``), dW (``g.T @ x``) and db: a distillation call makes four
``2 N H V`` matmuls over forward and backward (student logits, teacher logits, dX, dW), a
cross-entropy call three. With ``dw_accumulation="blocked"`` the loop gives the values and each
term's per-token statistics, and dX / dW / db come from the vocabulary-blocked backward after it
(:mod:`tune_losses.fused.dw_accumulation`); this is the only loop over token chunks either way.

Two autograd functions share the loop (:func:`chunk_pass`):

* :class:`GradInForward` (reductions ``sum`` / ``mean``): the gradients are computed in the forward
  pass, so logits are made once. Between forward and backward it keeps exactly dX ``[N, H]`` and
  dW ``[V, H]`` (the gradients themselves) and no per-token state. Backward multiplies them by
  ``grad_output`` and can run once.
* :class:`Recompute` (reduction ``none``, ``algorithm="recompute"``, no-grad calls): forward keeps
  nothing but its inputs; backward runs the loop again with each output's per-token ``grad_output``
  as token weights. Every output is differentiable (e.g. log-probabilities and entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tune_losses.chunking import chunk_policy, token_chunk_bounds
from tune_losses.divergences import VocabReducer
from tune_losses.fused.capabilities import addmm_fp32 as _addmm_fp32
from tune_losses.fused.chunk_ops import Operands, OutputWeight, compute_dtype, logits, token_weight, zero_ignored
from tune_losses.fused.compiled import compiled_math, run_compiled, terms_on_chunk
from tune_losses.fused.dw_accumulation import RowStats, blocked_backward, first_pass_chunk, resolve
from tune_losses.kernels.triton_select import triton_chunk_math
from tune_losses.options import IGNORE_INDEX
from tune_losses.terms import Term

default_chunk_size = chunk_policy  # the name other modules import

# (outputs by name [N] each, dx [N, H], dw [V_r, H], db [V_r]); a gradient is None when not made.
ChunkPassResult = Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class LossPlan:
    """What one fused call computes; non-tensor, so it travels through autograd as a constant.

    Attributes:
        terms: the loss terms; the loss is ``sum_t t.weight * t's first output`` per token.
        ignore_index: labels equal to it contribute nothing.
        chunk_size: tokens per chunk (None: :func:`tune_losses.chunking.chunk_policy`).
        reducer: reductions over the vocabulary: None for the whole vocabulary on this process, or
            a vocabulary-parallel one (:class:`tune_losses.fused.vocab_parallel.GroupReducer`).
        dw_accumulation: ``auto`` / ``fp32`` / ``blocked`` / ``chunk``
            (:mod:`tune_losses.fused.dw_accumulation`).
        bounds: explicit ``(start, end)`` token bounds of the chunks, consecutive from 0 to N (e.g.
            whole preference pairs per chunk, :mod:`tune_losses.alignment.pair_chunks`), or None
            for chunks of ``chunk_size`` tokens.
    """

    terms: Tuple[Term, ...]
    ignore_index: int = IGNORE_INDEX
    chunk_size: Optional[int] = None
    reducer: Optional[VocabReducer] = None
    dw_accumulation: str = "auto"
    bounds: Optional[Tuple[Tuple[int, int], ...]] = None

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    @property
    def output_names(self) -> List[str]:
        return [name for t in self.terms for name in t.outputs]

    def loss_weights(self) -> List[List[Optional[float]]]:
        """Per term, per output: the weight of that output in the summed loss."""
        return [[t.weight] + [None] * (len(t.outputs) - 1) for t in self.terms]


def accumulate_chunk_grads(
    g: torch.Tensor,
    xc: torch.Tensor,
    w: torch.Tensor,
    rows: slice,
    dx: Optional[torch.Tensor],
    dw: Optional[torch.Tensor],
    db: Optional[torch.Tensor],
) -> None:
    """Turn one chunk's logit gradient ``g`` ``[n, V]`` (compute or input dtype) into the parameter gradients.

    ``dx[rows] = g @ w`` (in x's dtype), ``dw += g.T @ xc`` and ``db += g.sum(0)`` (accumulators in
    the compute dtype); a None buffer is skipped. Every scale is already in ``g``: a low-precision
    dX is rounded once, as eager autograd's.
    """
    g_lp = g if g.dtype == xc.dtype else g.to(xc.dtype)
    if dx is not None:
        torch.mm(g_lp, w, out=dx[rows])
    if dw is not None:
        if dw.dtype == g_lp.dtype:  # one dtype throughout, or dw_accumulation="chunk" (rounded per chunk)
            dw.addmm_(g_lp.t(), xc)
        elif xc.device.type == "cpu":
            # A low-precision product per chunk would be rounded before the fp32 accumulation (with
            # many chunks, dW less accurate than eager's single rounding). CPU has no mixed-dtype
            # matmul (mm out_dtype is CUDA-only), so take the chunk's product in fp32: a chunk-sized
            # upcast; on CPUs without native bf16 it is also the faster matmul.
            dw.addmm_(g.to(dw.dtype).t(), xc.to(dw.dtype))
        else:
            _addmm_fp32(dw, g_lp.t(), xc)
    if db is not None:
        db.add_(g.sum(0, dtype=db.dtype))


def _chunk_weight(
    w: OutputWeight, rows: slice, ok: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """A term output's gradient weight for one chunk ``[n]`` (``w`` a float or an ``[N]`` tensor)."""
    return token_weight(w[rows] if isinstance(w, torch.Tensor) else w, ok, dtype, scale)


@torch.no_grad()  # the gradients here are closed forms; a backward run with create_graph=True builds no graph
def chunk_pass(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    labels: torch.Tensor,
    tx: Optional[torch.Tensor],
    tw: Optional[torch.Tensor],
    tb: Optional[torch.Tensor],
    plan: LossPlan,
    weights: Optional[Sequence[Optional[Sequence[OutputWeight]]]] = None,
    need: Tuple[bool, bool, bool] = (False, False, False),
    grad_scale: Optional[torch.Tensor] = None,
    inputs: Optional[Dict[str, torch.Tensor]] = None,
) -> ChunkPassResult:
    """One pass over all token chunks: every term's values and, when weighted, the gradients.

    The gradients come from the chunk loop itself, except with ``dw_accumulation`` resolved to
    ``"blocked"``: the loop then gives the values and each term's per-token statistics over the
    vocabulary (:class:`~tune_losses.fused.dw_accumulation.RowStats`), and the vocabulary-blocked
    backward (:func:`~tune_losses.fused.dw_accumulation.blocked_backward`) makes dX, dW, db from
    them after it, with no ``[V, H]`` accumulator.

    Args:
        x: ``[N, H]`` student hidden states; w ``[V_r, H]``; b ``[V_r]`` or None.
        labels: ``[N]``.
        tx, tw, tb: teacher hidden ``[N, Ht]``, weight ``[V_r, Ht]``, bias, or None.
        weights: per term, per output: the output's gradient weight (a float, an ``[N]`` tensor
            such as ``grad_output``, or None); None for values only.
        need: which of (dx, dw, db) to compute.
        grad_scale: 0-dim fp32 factor applied to every gradient while still in the compute dtype
            (the ``1 / num_tokens`` of a mean), or None.
        inputs: per-token side inputs by name, ``[N, ...]`` each (no gradient): each chunk's terms
            read their rows as ``Chunk.inputs`` (a cached teacher's ids, a policy's advantages, ...).

    Returns:
        ``(outputs, dx, dw, db)``: ``outputs`` maps each output name to its ``[N]`` values (compute
        dtype, 0 at ignored tokens); a gradient is None when not needed; db is in the compute dtype,
        dw too, or in the weight's dtype with ``dw_accumulation`` ``chunk`` / ``blocked``.
    """
    red = plan.reducer or VocabReducer(w.shape[0])
    if plan.needs_teacher and (tx is None or tw is None):
        raise ValueError("teacher_hidden, teacher_weight: a divergence term needs the teacher's tensors, got None")
    ops = Operands(x, w, b, labels, tx, tw, tb)
    if weights is None or not any(need):
        return _token_chunks(ops, plan, red, None, need, "fp32", grad_scale, inputs)
    accumulation = resolve(plan.dw_accumulation, plan.terms, red, x.dtype, x.device)
    if accumulation != "blocked":
        return _token_chunks(ops, plan, red, weights, need, accumulation, grad_scale, inputs)
    stats = RowStats(plan.terms, x.shape[0])
    outputs, *_ = _token_chunks(ops, plan, red, None, need, "fp32", None, inputs, stats)
    # The loop's chunk buffers died with it: the blocked backward's block temporaries are not on top of them.
    grads = blocked_backward(ops, plan.terms, plan.ignore_index, red, stats, outputs, weights, need, grad_scale)
    return (outputs, *grads)


def _chunk_bounds(
    plan: LossPlan, num_tokens: int, red: VocabReducer, x: torch.Tensor, first_pass: bool
) -> Tuple[List[Tuple[int, int]], int]:
    """``(bounds, size)``: the chunks' ``(start, end)`` token bounds and the most tokens in one.

    ``plan.bounds`` when given, else chunks of ``plan.chunk_size`` (or the chunk policy's) tokens; the
    blocked backward's first pass (``first_pass``) takes its own, often smaller, chunks of
    :func:`~tune_losses.fused.dw_accumulation.first_pass_chunk` tokens (its terms are column-local
    and per token, so they need no pair-aware bounds).
    """
    if plan.bounds is not None:
        bounds = list(plan.bounds)
        size = max((end - start for start, end in bounds), default=1)
    else:
        sides = 2 if plan.needs_teacher else 1
        size = plan.chunk_size or chunk_policy(num_tokens, red.vocab, x.device, sides, x.shape[1])
        bounds = token_chunk_bounds(num_tokens, size)
    if first_pass:
        size = first_pass_chunk(num_tokens, red.vocab, x.shape[1], x.device, size)
        bounds = token_chunk_bounds(num_tokens, size)
    return bounds, size


def _token_chunks(
    ops: Operands,
    plan: LossPlan,
    red: VocabReducer,
    weights: Optional[Sequence[Optional[Sequence[OutputWeight]]]],
    need: Tuple[bool, bool, bool],
    accumulation: str,
    grad_scale: Optional[torch.Tensor],
    inputs: Optional[Dict[str, torch.Tensor]],
    stats: Optional[RowStats] = None,
) -> ChunkPassResult:
    """THE loop over token chunks (:func:`chunk_pass`'s arguments; ``weights`` None for values only).

    ``accumulation``: ``"fp32"`` or ``"chunk"`` (dW's accumulator dtype). ``stats``: the first pass
    of the blocked backward: each term's per-token statistics are collected from the chunk's raw
    logits before the terms read (and overwrite) them, and the eager math runs (the Triton kernels
    take the logits in the input dtype, and with no gradient there is nothing for a compiled chunk
    function to fuse).
    """
    x, w, b, labels, tx, tw, tb = ops
    num_tokens = x.shape[0]
    dtype = compute_dtype(x.dtype)
    valid = labels != plan.ignore_index
    teacher = plan.needs_teacher
    bounds, size = _chunk_bounds(plan, num_tokens, red, x, stats is not None)
    need_dx, need_dw, need_db = need
    outputs = {name: torch.zeros(num_tokens, dtype=dtype, device=x.device) for name in plan.output_names}
    dx = torch.empty_like(x) if weights is not None and need_dx else None
    dw_dtype = w.dtype if accumulation == "chunk" else dtype
    dw = torch.zeros(w.shape, dtype=dw_dtype, device=w.device) if weights is not None and need_dw else None
    db = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if weights is not None and need_db else None
    # A Triton kernel for the term set (CUDA), on logits in the input dtype (no fp32 [n, V] buffer);
    # else compiled chunk math (where available): every chunk padded to the same rows, one compilation.
    tri = (
        None if stats is not None else triton_chunk_math(plan.terms, plan.reducer, x.device, x.dtype, plan.ignore_index)
    )
    math = None if tri is not None or stats is not None else compiled_math(plan.terms, red, x.device)
    # A call whose tokens fit in one chunk pads them to a power of two (at least 8), so batches of
    # varying length compile a handful of shapes, not one per length.
    rows_fixed = size if size < num_tokens else 1 << max(3, (num_tokens - 1).bit_length())
    # The chunk's logits go into buffers made once per call (the matmuls write into them, the
    # compiled math writes the gradient over the student's): no [n, V] allocation per chunk.
    buf_rows = rows_fixed if math is not None else min(size, num_tokens)
    zbuf = torch.empty(buf_rows, w.shape[0], dtype=x.dtype if tri is not None else dtype, device=x.device)
    ztbuf = None
    if teacher:
        assert tx is not None and tw is not None  # chunk_pass checked
        ztbuf = torch.empty(buf_rows, tw.shape[0], dtype=zbuf.dtype, device=x.device)

    for start, end in bounds:
        rows = slice(start, end)
        n = end - start
        ok, lab = valid[rows], labels[rows]
        chunk_inputs = {k: v[rows] for k, v in inputs.items()} if inputs else {}
        # Ignored tokens' hidden rows are zeroed ([n, H], cheap; see zero_ignored).
        xc = zero_ignored(x[rows], ok)
        zt = None
        if ztbuf is not None and tx is not None and tw is not None:
            zt = logits(zero_ignored(tx[rows], ok), tw, tb, out=ztbuf[:n])
        z = logits(xc, w, b, out=zbuf[:n])
        if stats is not None:
            stats.add(rows, z, zt)
        chunk_weights: List[Optional[List[Optional[torch.Tensor]]]] = [None] * len(plan.terms)
        if weights is not None:
            for i, ws in enumerate(weights):
                if ws is not None and any(v is not None for v in ws):
                    chunk_weights[i] = [_chunk_weight(v, rows, ok, dtype, grad_scale) for v in ws]
        result = None if tri is None else tri(z, zt, lab, chunk_weights, chunk_inputs)
        if math is not None:
            result = _run_padded(math, n, zbuf, ztbuf, lab, ok, chunk_weights, plan.ignore_index, chunk_inputs)
            if result is None:
                math = None
        if result is None:
            result = terms_on_chunk(plan.terms, red, z, zt, lab, ok, chunk_weights, True, chunk_inputs)
        values, g = result
        del result, z, zt
        for name, v in zip(plan.output_names, values):
            outputs[name][rows] = v
        if g is not None:
            accumulate_chunk_grads(g, xc, w, rows, dx, dw, db)
        elif dx is not None:  # no term has a gradient weight here: the gradients stay 0
            dx[rows] = 0
        del g
    if dx is not None:
        red.finish_dx(dx)
    return outputs, dx, dw, db


def _run_padded(math, n: int, zbuf, ztbuf, labels, valid, weights, ignore_index: int, inputs=None):
    """Run compiled chunk math on whole buffers ``[rows, V]`` whose first ``n`` rows are this chunk.

    Every chunk then has the same shape (one compilation); the rows past ``n`` (stale) are padding:
    labels ``ignore_index``, weight 0, results cut off (every operation is row-wise, so they reach
    no other row).
    """
    pad = zbuf.shape[0] - n
    if pad:

        def rows_of(t, value=0):
            return None if t is None else torch.nn.functional.pad(t, (0, pad), value=value)

        def leading_rows_of(t):  # [n, ...] -> [rows, ...], zeros below
            return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])

        labels, valid = rows_of(labels, ignore_index), rows_of(valid, False)
        weights = [None if ws is None else [rows_of(w) for w in ws] for ws in weights]
        inputs = {k: leading_rows_of(v) for k, v in (inputs or {}).items()}
    result = run_compiled(math, zbuf, ztbuf, labels, valid, weights, inputs)
    if result is None or not pad:
        return result
    values, g = result
    return [v[:n] for v in values], (None if g is None else g[:n])


def _summed_names(plan: LossPlan) -> List[str]:
    """Output names in :class:`GradInForward`'s order: each term's first output, then the rest."""
    firsts = [t.outputs[0] for t in plan.terms]
    return firsts + [name for name in plan.output_names if name not in firsts]


def _needs(ctx, b) -> Tuple[bool, bool, bool]:
    return (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])


BACKWARD_ONCE = (
    "fused loss: backward ran twice. algorithm='grad_in_forward' computes its gradients during forward "
    "and hands them over in the first backward, so a second backward (retain_graph=True, "
    "torch.autograd.gradcheck, double backward) has nothing left to give; use algorithm='recompute', "
    "which keeps its inputs and recomputes the gradients in every backward."
)


class GradInForward(torch.autograd.Function):
    """Sum-reduced fused loss whose gradients are computed during forward.

    Outputs ``(total, *parts)``: 0-dim, the weighted sum and each output's sum (the terms' first
    outputs, then the others), each times ``scale`` when given; only ``total`` is differentiable
    (the parts are for logging).
    Backward scales the stored dX, dW, db by ``grad_output``; it can run once (the stored gradients
    are handed over, not copied).

    ``scale`` (0-dim fp32 or None): ``1 / num_tokens`` of a mean, folded into the gradients in fp32
    during forward so that a low-precision dX is rounded once, as in eager PyTorch.

    The inputs are saved (no copy) so that backward can check their version counters: a weight or
    hidden state modified in place after forward raises as eager autograd does, instead of
    returning the gradient of the old values.
    """

    @staticmethod
    def forward(ctx, x, w, b, labels, tx, tw, tb, plan: LossPlan, scale=None, inputs=None, per_token_parts=False):
        need = _needs(ctx, b)
        outputs, dx, dw, db = chunk_pass(
            x, w, b, labels, tx, tw, tb, plan, plan.loss_weights(), need, scale, inputs=inputs
        )
        ctx.grads = (dx, dw, db)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        ctx.save_for_backward(x, w, b)
        # Every output's sum (first outputs in term order, then the others in plan order): the
        # first outputs make the loss, the others are statistics a term reports (a policy loss's
        # clip fractions), summed here because their per-token values are not kept.
        parts = [outputs[name].sum() for name in _summed_names(plan)]
        total = parts[0] * plan.terms[0].weight
        for p, t in zip(parts[1:], plan.terms[1:]):
            total = total + p * t.weight
        if scale is not None:
            scale = scale.to(total.dtype)
            total, parts = total * scale, [p * scale for p in parts]
        if per_token_parts:  # every output per token (unscaled), for terms whose outputs are not sums
            parts = [outputs[name] for name in plan.output_names]
        ctx.mark_non_differentiable(*parts)
        return (total, *parts)

    @staticmethod
    def backward(ctx, grad_total, *_grad_parts):
        if ctx.grads is None:
            raise RuntimeError(BACKWARD_ONCE)
        ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place since forward
        dx, dw, db = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        # grad_total is a 0-dim tensor: scaling on device, no host sync.
        if dx is not None:
            dx = dx.mul_(grad_total.to(dx.dtype))
        if dw is not None:
            dw = dw.mul_(grad_total.to(dw.dtype)).to(w_dtype)
        if db is not None:
            db = db.mul_(grad_total.to(db.dtype)).to(b_dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None


class Recompute(torch.autograd.Function):
    """Per-token fused loss: every output of every term ``[N]`` (in ``plan.output_names`` order),
    each differentiable; backward recomputes each chunk with the outputs' ``grad_output`` as token
    weights."""

    @staticmethod
    def forward(ctx, x, w, b, labels, tx, tw, tb, plan: LossPlan, inputs=None):
        outputs, *_ = chunk_pass(x, w, b, labels, tx, tw, tb, plan, inputs=inputs)
        ctx.save_for_backward(x, w, b, labels, tx, tw, tb)
        ctx.plan = plan
        ctx.inputs = inputs
        return tuple(outputs[name] for name in plan.output_names)

    @staticmethod
    def backward(ctx, *grads):
        x, w, b, labels, tx, tw, tb = ctx.saved_tensors
        plan = ctx.plan
        it = iter(grads)
        weights = [[next(it) for _ in t.outputs] for t in plan.terms]
        _, dx, dw, db = chunk_pass(x, w, b, labels, tx, tw, tb, plan, weights, _needs(ctx, b), inputs=ctx.inputs)
        dw = None if dw is None else dw.to(w.dtype)
        db = None if db is None else db.to(b.dtype)
        return dx, dw, db, None, None, None, None, None, None


def run_terms(
    x,
    w,
    b,
    labels,
    tx,
    tw,
    tb,
    plan: LossPlan,
    *,
    per_token: bool,
    recompute: bool,
    scale: Optional[torch.Tensor] = None,
    inputs: Optional[Dict[str, torch.Tensor]] = None,
    per_token_parts: bool = False,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Run a plan through the right autograd function.

    Args:
        per_token: True gives per-token results ``[N]``; False their sums.
        recompute: use :class:`Recompute` (always for per-token results and when no gradient is
            wanted), else :class:`GradInForward`.
        scale: 0-dim factor of the sums (the mean's ``1 / tokens``), None for 1.
        inputs: per-token side inputs by name, ``[N, ...]`` each, read by the terms per chunk.
        per_token_parts: with a summed loss, give ``parts`` as every output by name per token
            (detached, unscaled) instead of the first outputs' sums.

    Returns:
        ``(loss, parts)``: ``loss`` the weighted sum of the terms' first outputs (per token or
        summed); ``parts`` every output by name per token, or summed (each term's first output
        under the term's name, the others under their own).
    """
    grad_wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
    if not per_token and not recompute and grad_wanted:
        total, *rest = GradInForward.apply(x, w, b, labels, tx, tw, tb, plan, scale, inputs, per_token_parts)
        if per_token_parts:
            return total, dict(zip(plan.output_names, rest))
        names = [t.name for t in plan.terms] + _summed_names(plan)[len(plan.terms) :]
        return total, dict(zip(names, rest))
    values = Recompute.apply(x, w, b, labels, tx, tw, tb, plan, inputs)
    parts = dict(zip(plan.output_names, values))
    total = None
    for t in plan.terms:
        v = parts[t.outputs[0]]
        v = v * t.weight if t.weight != 1.0 else v
        total = v if total is None else total + v
    if per_token:
        return total, parts
    factor = 1.0 if scale is None else scale.to(total.dtype)
    if per_token_parts:
        return total.sum() * factor, {k: v.detach() for k, v in parts.items()}
    sums = {t.name: parts[t.outputs[0]].detach().sum() * factor for t in plan.terms}
    sums.update({name: parts[name].detach().sum() * factor for name in _summed_names(plan)[len(plan.terms) :]})
    return total.sum() * factor, sums
