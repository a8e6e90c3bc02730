"""How dW ``[V, H]`` is accumulated over token chunks: ``dw_accumulation``, and the blocked backward.

dW sums every token's outer product; how the sum is rounded decides its precision and its memory.
Measured on CPU (``python -m benchmarks.dw_accumulation``; table in
``benchmarks/results/dw_accumulation.md``), as dW's relative error against fp64 over eager bf16
PyTorch's own:

* ``"fp32"``: an fp32 ``[V, H]`` accumulator, each chunk's product added in fp32, rounded once at
  the end: eager's precision at any chunk count; costs ``4 V H`` bytes beside dW (2 GiB at
  V=128256, H=4096).
* ``"chunk"``: dW in the input dtype, each chunk's product added and rounded (Liger-Kernel's
  default): no extra memory, but the error grows with the number of chunks (several times eager's
  at 64 chunks), so never the default.
* ``"blocked"``: the vocabulary-blocked backward (:func:`blocked_backward`): the engine's chunk loop
  computes the values and each token's statistics (logsumexp, ...: :class:`RowStats`), in chunks of
  :func:`first_pass_chunk` tokens; then for each block of
  ``Vb`` vocabulary rows one matmul over all tokens gives the block's logits ``[N, Vb]``, their
  gradient from the statistics (:mod:`tune_losses.kernels.blocked`), ``dW[block] = g.T @ X`` in
  one matmul (written once, eager's rounding) and ``g @ W[block]`` added to an fp32 ``[N, H]``
  dX accumulator. No ``[V, H]`` accumulator; one more logits matmul per logit set. Only for terms
  with column-local gradients (cross-entropy, dense-teacher divergences, log-probabilities); an
  explicit request for other terms is an error.
* ``"auto"`` (default): ``fp32`` for fp32 / fp64 inputs (the accumulator is dW's own dtype) and on
  CPU (today's numerics and speed); ``blocked`` for low-precision inputs elsewhere (CUDA, and the
  ``meta`` allocation plan) when the terms allow it, else ``fp32``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tune_losses.divergences import VocabReducer
from tune_losses.fused.capabilities import addmm_fp32
from tune_losses.fused.chunk_ops import Operands, OutputWeight, compute_dtype, logits, token_weight, zero_ignored
from tune_losses.kernels.blocked import block_grad, blocked_unsupported, row_stats
from tune_losses.options import DW_ACCUMULATIONS, check_choice
from tune_losses.terms import Term

# Elements of one block's logits [N, Vb] (the block's vocabulary rows are this over N, a power of
# two, at least _MIN_BLOCK_ROWS): at most 2^22 and V H / 128, so that a block's few fp32 [N, Vb]
# temporaries stay small beside dW (16 MiB each at N=8192 H=4096 V=128256, where dW is 1002 MiB):
# the allocation plan then stays within 1.25x of dX + dW (tests/test_memory_plan.py). Not yet
# measured for speed on a GPU.
_BLOCK_ELEMENTS = 1 << 22
_BLOCK_DW_FRACTION = 128
_MIN_BLOCK_ROWS = 128
# Elements of one first-pass chunk of logits per logit set off the CPU: at most 2^25 and V H / 16
# (values and statistics only, no gradient; dW does not exist yet, so its few fp32 [n, V] buffers
# are not on top of it).
_FIRST_PASS_ELEMENTS = 1 << 25
_FIRST_PASS_DW_FRACTION = 16
_MIN_FIRST_PASS_TOKENS = 16


def check_dw_accumulation(value) -> str:
    """``value`` must be one of :data:`DW_ACCUMULATIONS`."""
    check_choice("dw_accumulation", value, DW_ACCUMULATIONS)
    return value


def resolve(mode: str, terms: Sequence[Term], red: Optional[VocabReducer], dtype: torch.dtype, device) -> str:
    """The accumulation a call uses: ``"fp32"``, ``"chunk"`` or ``"blocked"`` (see the module docstring).

    Raises:
        ValueError: ``"blocked"`` asked for terms that have no column-local gradient.
    """
    low_precision = dtype not in (torch.float32, torch.float64)
    if mode == "auto":
        if not low_precision or torch.device(device).type == "cpu":
            return "fp32"
        return "blocked" if blocked_unsupported(terms, red) is None else "fp32"
    if mode == "blocked":
        reason = blocked_unsupported(terms, red)
        if reason is not None:
            raise ValueError(
                f"dw_accumulation: 'blocked' needs terms whose gradient at a vocabulary column depends only on "
                f"that column and per-token statistics, but {reason}; use 'fp32', 'chunk' or 'auto'"
            )
        return mode
    if mode == "chunk" and not low_precision:
        return "fp32"  # the accumulator is dW's own dtype either way
    return mode


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def first_pass_chunk(num_tokens: int, vocab: int, hidden: int, device: torch.device, size: int) -> int:
    """Tokens per chunk of the blocked backward's first pass: ``size`` (the engine's rule) on CPU;
    elsewhere at most ``min(_FIRST_PASS_ELEMENTS, V H / _FIRST_PASS_DW_FRACTION) / V`` (a power of two)."""
    if device.type == "cpu":
        return size
    elements = min(_FIRST_PASS_ELEMENTS, vocab * hidden // _FIRST_PASS_DW_FRACTION)
    n = max(_pow2_floor(elements // max(vocab, 1)), _MIN_FIRST_PASS_TOKENS)
    return max(1, min(size, n, num_tokens))


def block_rows(num_tokens: int, vocab: int, hidden: int) -> int:
    """Vocabulary rows per block: a power of two near ``min(_BLOCK_ELEMENTS, V H / _BLOCK_DW_FRACTION) / N``,
    at least ``_MIN_BLOCK_ROWS``, at most V."""
    elements = min(_BLOCK_ELEMENTS, vocab * hidden // _BLOCK_DW_FRACTION)
    n = max(_pow2_floor(elements // max(num_tokens, 1)), _MIN_BLOCK_ROWS)
    return max(1, min(n, vocab))


class RowStats:
    """Each term's per-token statistics over the whole vocabulary (:func:`row_stats`: a logsumexp,
    ...), ``{name: [N]}`` per term in the compute dtype, filled chunk by chunk by the engine's loop
    for :func:`blocked_backward`."""

    def __init__(self, terms: Sequence[Term], num_tokens: int):
        self.terms = tuple(terms)
        self.num_tokens = num_tokens
        self.per_term: List[Dict[str, torch.Tensor]] = [{} for _ in self.terms]

    def add(self, rows: slice, z: torch.Tensor, zt: Optional[torch.Tensor]) -> None:
        """Record the chunk ``rows``'s statistics from its raw logits ``[n, V]`` (compute dtype;
        neither is modified), before any term reads (and overwrites) them."""
        for stats, term in zip(self.per_term, self.terms):
            for name, v in row_stats(term, z, zt).items():
                stats.setdefault(name, v.new_empty(self.num_tokens))[rows] = v


@torch.no_grad()
def blocked_backward(
    ops: Operands,
    terms: Sequence[Term],
    ignore_index: int,
    red: VocabReducer,
    stats: RowStats,
    outputs: Dict[str, torch.Tensor],
    weights: Sequence[Optional[Sequence[OutputWeight]]],
    need: Tuple[bool, bool, bool],
    grad_scale: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dX, dW, db one block of vocabulary rows at a time, after the engine's chunk loop
    (:func:`tune_losses.fused.engine.chunk_pass`) gave the values and statistics.

    Args:
        ops: the call's tensors: x ``[N, H]``, w ``[V, H]``, b ``[V]`` or None, labels ``[N]``, the
            teacher's tx, tw, tb or None.
        terms: the loss terms (every one column-local: :func:`blocked_unsupported` is None).
        stats: each term's per-token statistics, for all N tokens.
        outputs: every output's values by name ``[N]`` (the entropy's gradient reads its own value).
        weights: per term, per output: a float, an ``[N]`` tensor or None (see ``chunk_pass``).
        need: which of (dx, dw, db) to compute.
        grad_scale: 0-dim factor of every gradient (a mean's ``1 / tokens``), or None.

    Returns:
        ``(dx, dw, db)``: dx ``[N, H]`` in x's dtype, dw ``[V, H]`` in w's dtype, db ``[V]`` in the
        compute dtype, or None where not needed.
    """
    x, w, b, labels, tx, tw, tb = ops
    num_tokens, vocab = x.shape[0], w.shape[0]
    dtype = compute_dtype(x.dtype)
    valid = labels != ignore_index
    need_dx, need_dw, need_db = need
    token_weights = [None if ws is None else [token_weight(v, valid, dtype, grad_scale) for v in ws] for ws in weights]
    if not (need_dx or need_dw or need_db) or all(ws is None for ws in token_weights):
        return (
            torch.zeros_like(x) if need_dx else None,
            torch.zeros_like(w) if need_dw else None,
            torch.zeros(vocab, dtype=dtype, device=w.device) if need_db else None,
        )
    teacher = tx is not None and tw is not None and any(t.needs_teacher for t in terms)
    # The teacher's hidden rows are not zeroed: they reach the gradient only through the student's
    # logit gradient, whose ignored rows are set to 0 below.
    xz = zero_ignored(x, valid)
    cpu = x.device.type == "cpu"
    # CPU has no mixed-dtype matmul: its products take fp32 copies (X once, W one block at a time).
    x_mm = xz.to(dtype) if cpu else xz
    dx_acc = torch.zeros(num_tokens, x.shape[1], dtype=dtype, device=x.device) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    db = torch.zeros(vocab, dtype=dtype, device=w.device) if need_db else None
    vb = block_rows(num_tokens, vocab, x.shape[1])
    for v0 in range(0, vocab, vb):
        cols = slice(v0, min(v0 + vb, vocab))
        zb = logits(xz, w[cols], None if b is None else b[cols])
        ztb = None
        if teacher and tx is not None and tw is not None:
            ztb = logits(tx, tw[cols], None if tb is None else tb[cols])
        g = None
        for i, t in enumerate(terms):
            term_weights = token_weights[i]
            if term_weights is None:
                continue
            last = i == len(terms) - 1
            g_t = block_grad(t, zb, ztb, v0, vocab, labels, valid, stats.per_term[i], term_weights, outputs, last)
            if g_t is not None:
                g = g_t if g is None else g.add_(g_t)
        del zb, ztb
        if g is None:
            g = torch.zeros(num_tokens, cols.stop - v0, dtype=dtype, device=x.device)
        g = torch.where(valid.unsqueeze(-1), g, 0.0)
        g_mm = g if cpu or g.dtype == x.dtype else g.to(x.dtype)
        if dw is not None:
            # One matmul over every token: dW's block is rounded once, as eager autograd's dW.
            if g_mm.dtype == w.dtype:
                torch.mm(g_mm.t(), x_mm, out=dw[cols])
            else:
                dw[cols] = torch.mm(g_mm.t(), x_mm)
        if dx_acc is not None:
            if g_mm.dtype == dtype:
                dx_acc.addmm_(g_mm, w[cols].to(dtype))
            else:
                addmm_fp32(dx_acc, g_mm, w[cols])
        if db is not None:
            db[cols] = g.sum(0)
        del g, g_mm
    del x_mm, xz
    dx = None
    if dx_acc is not None:
        dx = dx_acc if dx_acc.dtype == x.dtype else dx_acc.to(x.dtype)
        del dx_acc
        red.finish_dx(dx)
    return dx, dw, db
