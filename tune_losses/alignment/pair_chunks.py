"""Preference losses with their gradients made in forward, one chunk of whole pairs at a time.

The per-token path (:func:`tune_losses.linear_log_probs`) makes a chunk's logits in forward and again in
backward: 4 ``[n, H] x [H, V]`` matmul-equivalents per token for the policy (logits, logits again, dX,
dW). A preference loss needs, at one token, only the sequence log-probabilities of that token's pair.
So when a chunk holds whole pairs (chosen row i and rejected row i + B, their valid tokens only), the
chunk can finish its part of the loss and of the gradient at once:

1. the reference's logits of the chunk (no grad) -> its sequence log-probabilities;
2. the policy's logits, once -> per-token log-probabilities and ``onehot - softmax`` in one buffer
   (:func:`tune_losses.divergences.log_prob_chunk`);
3. sequence log-probabilities (sum or mean) -> the chunk's pair losses
   (:func:`tune_losses.alignment.formulas.counted_pair_losses`) and their derivatives with respect to
   each sequence log-probability (autograd on ``[pairs]`` tensors);
4. per-token weight x ``(onehot - softmax)`` = the logit gradient -> dX, dW, db
   (:func:`tune_losses.fused.engine.accumulate_chunk_grads`).

That is 3 matmul-equivalents for the policy (+1 for the reference), over valid tokens only: prompt and
padding rows never reach a matmul. Between forward and backward the autograd function keeps dX
``[2B, S, H]``, dW ``[V, H]`` and db, like :class:`tune_losses.fused.engine.GradInForward`; backward
scales them by ``grad_output`` and can run once.

It applies to plain tensors (and FSDP2 weights, gathered once per call), with a gradient wanted and
every pair within the row budget (:func:`pair_chunk_layout` returns None otherwise); callers keep the
per-token path for everything else (vocabulary-parallel weights, long pairs, ``algorithm="recompute"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from tune_losses.alignment.formulas import counted_pair_losses
from tune_losses.divergences import VocabReducer, log_prob_chunk
from tune_losses.fused.engine import GradInForward, _logits, accumulate_chunk_grads, compute_dtype
from tune_losses.fused.placement import TP_MESH_DIM_NAMES, materialize_weight
from tune_losses.validation import LABEL_DTYPES

# Logit elements of one chunk ([rows, V], fp32): the row budget is this divided by V. CPU, fp32,
# N=2048 (8 rows of 256, a prompt of 64 ignored), H=256, V=32768 (`python -m benchmarks.alignment`):
# 2^24 gives 512 rows, one pair (2 x 192 valid tokens) per chunk, peak 83 MiB (full logits 768 MiB;
# two pairs per chunk: 11% faster, 131 MiB). CUDA, H200, bf16, 4 pairs of 2 x 1024 tokens (prompt 256
# ignored), H=2048, V=128256: 2^28 gives 2093 rows (one pair): 44 ms and 2.6 GiB above the inputs
# (per-token path 68 ms, 1.9 GiB; full logits 42 ms, 11.7 GiB; median of 5).
_TARGET_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


def default_row_budget(vocab_size: int, device: torch.device) -> int:
    """Valid-token rows per chunk of pairs when the caller gives no ``chunk_size``."""
    target = _TARGET_CHUNK_ELEMENTS.get(device.type, _TARGET_CHUNK_ELEMENTS["cuda"])
    return max(target // max(vocab_size, 1), 1)


@dataclass(frozen=True)
class PairLayout:
    """Where the valid tokens of a ``[2B, S]`` batch go, pair by pair.

    Attributes:
        tokens: ``[n]`` flat indices (into ``2B * S``) of the valid tokens, ordered pair 0's chosen row,
            pair 0's rejected row, pair 1's chosen row, ...
        rows: ``[n]`` the row (``0 .. 2B - 1``) of each.
        lengths: ``[2B]`` valid tokens per row (int64).
        chunks: per chunk ``(first pair, end pair, first token, end token)`` (ends exclusive).
    """

    tokens: torch.Tensor
    rows: torch.Tensor
    lengths: torch.Tensor
    chunks: Tuple[Tuple[int, int, int, int], ...]


def pair_chunk_layout(labels: torch.Tensor, ignore_index: int, budget: int) -> Optional[PairLayout]:
    """Pack consecutive pairs of ``labels`` ``[2B, S]`` into chunks of at most ``budget`` valid tokens.

    Returns None when one pair alone holds more than ``budget`` valid tokens.
    """
    rows_n, seq = labels.shape
    batch = rows_n // 2
    mask = labels != ignore_index
    lengths = mask.sum(dim=-1)
    # The chunk boundaries are Python integers (they slice tensors and bound the loop), so the [2B]
    # valid-token counts are read to the host once per call: this path's only host sync.
    counts = lengths.tolist()
    chunks, first_pair, first_token, size = [], 0, 0, 0
    for p in range(batch):
        n = counts[p] + counts[batch + p]
        if n > budget:
            return None
        if size + n > budget:
            chunks.append((first_pair, p, first_token, first_token + size))
            first_pair, first_token, size = p, first_token + size, 0
        size += n
    if batch:
        chunks.append((first_pair, batch, first_token, first_token + size))
    device = labels.device
    order = torch.arange(rows_n, device=device).view(2, batch).t().reshape(-1)  # 0, B, 1, B + 1, ...
    position = torch.arange(rows_n * seq, device=device).view(rows_n, seq)
    # Valid positions of the pair-ordered rows, in order: invalid ones sort last and are cut off.
    key = torch.where(mask[order], position, rows_n * seq).flatten()
    picked = key.sort().values[: sum(counts)]
    rows = order[picked // seq]
    return PairLayout(tokens=rows * seq + picked % seq, rows=rows, lengths=lengths, chunks=tuple(chunks))


@dataclass(frozen=True)
class PairOptions:
    """The preference formula's options (see :func:`tune_losses.linear_preference_loss`)."""

    loss_type: str
    beta: float
    gamma: float
    label_smoothing: float
    average: bool
    discopop_tau: float = 0.05

    def formula(self) -> dict:
        return dict(
            loss_type=self.loss_type,
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
        )


def _plain(t) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def _gathered_dtensor(t) -> bool:
    """A DTensor sharded over data-parallel mesh dimensions only (FSDP2, HSDP): gathered once per call.
    A vocabulary-parallel one (a ``tp`` / ``tensor`` mesh dimension) is not: the per-token path has
    the vocabulary reducer."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor) and not any(n in TP_MESH_DIM_NAMES for n in (t.device_mesh.mesh_dim_names or ()))


def applies(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias) -> bool:
    """Whether the pair-chunked path takes these inputs: well-formed plain tensors (weights and biases
    may be FSDP2 DTensors, cast to the hidden states' dtype when gathered) on one device, with a gradient
    wanted. Anything else goes the per-token path, which also raises the errors of bad input."""
    if not all(_plain(t) for t in (hidden, labels, ref_hidden)) or labels.dtype not in LABEL_DTYPES:
        return False
    params = (weight, bias, ref_weight, ref_bias)
    if not all(_plain(t) or _gathered_dtensor(t) for t in params):
        return False
    if len({t.device for t in (hidden, labels, ref_hidden) + params if t is not None}) != 1:
        return False
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return False
    for x, w, b in ((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias)):
        if x is None:
            continue
        if not (
            x.is_floating_point()
            and w.is_floating_point()
            and x.dim() == 3
            and w.dim() == 2
            and tuple(x.shape[:2]) == tuple(labels.shape)
            and x.shape[2] == w.shape[1]
            and w.shape[0] >= 1
            and (x.dtype == w.dtype or not _plain(w))
        ):
            return False
        if b is not None and ((b.dtype != w.dtype and _plain(b)) or tuple(b.shape) != (w.shape[0],)):
            return False
    return True


def local_weights(weight, bias, dtype: torch.dtype):
    """Plain ``(weight, bias)``: an FSDP2 DTensor gathered (differentiably) and cast to ``dtype``.

    A collective when gathering: callers decide between the paths before calling this, so that every
    rank runs the same collectives."""
    return materialize_weight(weight, dtype), None if bias is None else materialize_weight(bias, dtype)


class PairChunkedPreference(torch.autograd.Function):
    """A preference loss over chunks of whole pairs, gradients made in forward.

    Inputs: hidden ``[2B, S, H]``, weight ``[V, H]``, bias ``[V]`` or None (differentiable); the
    reference as ``ref_hidden`` ``[2B, S, H']`` + ``ref_weight`` ``[V', H']`` + ``ref_bias``, or as
    sequence log-probabilities ``ref_seq`` ``[2B]``, or neither (0); labels ``[2B, S]``; the
    :class:`PairLayout` and :class:`PairOptions`; ``pair_scale``, ``nll_scale`` (0-dim).

    Outputs ``(total, pair_sum, nll_sum, seq_logps [2B], ref_seq_logps [2B])`` in the compute dtype:
    ``total = pair_scale * pair_sum + nll_scale * nll_sum`` is differentiable, where ``pair_sum`` sums
    the counted pairs' losses and ``nll_sum`` the chosen rows' ``-log p``; the rest are detached.
    """

    @staticmethod
    def forward(
        ctx, x, w, b, ref_x, ref_w, ref_b, ref_seq, labels, layout: PairLayout, opts: PairOptions, pair_scale, nll_scale
    ):
        rows_n, seq_len = labels.shape
        batch = rows_n // 2
        dtype = compute_dtype(x.dtype)
        xf = x.reshape(rows_n * seq_len, x.shape[-1])
        rxf = None if ref_x is None else ref_x.reshape(rows_n * seq_len, ref_x.shape[-1])
        flat_labels = labels.reshape(-1)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = b is not None and ctx.needs_input_grad[2]
        num_valid = layout.tokens.shape[0]
        dx_valid = x.new_empty(num_valid, x.shape[-1]) if need_dx else None
        dw = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_dw else None
        db = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_db else None
        pair_scale, nll_scale = pair_scale.to(dtype), nll_scale.to(dtype)

        lengths = layout.lengths.to(dtype)
        per_token = 1.0 / lengths.clamp(min=1) if opts.average else torch.ones_like(lengths)
        counted = (layout.lengths[:batch] > 0) & (layout.lengths[batch:] > 0)
        sums = torch.zeros(rows_n, dtype=dtype, device=x.device)
        ref_sums = torch.zeros(rows_n, dtype=dtype, device=x.device)
        # d total / d (a token's log-prob), per row: its pair's coefficient, and -nll_scale on chosen rows.
        row_coef = torch.zeros(rows_n, dtype=dtype, device=x.device)
        row_coef[:batch] = -nll_scale
        red = VocabReducer(w.shape[0])
        for p0, p1, t0, t1 in layout.chunks:
            if t1 == t0:
                continue
            idx, seq = layout.tokens[t0:t1], layout.rows[t0:t1]
            lab = flat_labels.index_select(0, idx)
            valid = torch.ones_like(lab, dtype=torch.bool)
            if rxf is not None:
                rz = _logits(rxf.index_select(0, idx), ref_w, ref_b)
                (ref_lp,), _ = log_prob_chunk(rz, lab, valid, 1.0, VocabReducer(ref_w.shape[0]), consume=True)
                del rz
                ref_sums.index_add_(0, seq, ref_lp.to(dtype))
            xc = xf.index_select(0, idx)
            # weight 1 on log p[y]: the gradient buffer holds onehot - softmax, scaled per token below.
            (lp,), g = log_prob_chunk(
                _logits(xc, w, b), lab, valid, 1.0, red, weights=(torch.ones_like(lab, dtype=dtype), None), consume=True
            )
            sums.index_add_(0, seq, lp)
            chosen, rejected = slice(p0, p1), slice(batch + p0, batch + p1)
            ref_c, ref_r = _reference(ref_seq, ref_sums, per_token, rxf is not None, chosen, rejected)
            coef_c, coef_r = _sequence_grads(
                sums[chosen] * per_token[chosen],
                sums[rejected] * per_token[rejected],
                ref_c,
                ref_r,
                counted[chosen],
                opts,
            )
            row_coef[chosen] += pair_scale * coef_c * per_token[chosen]
            row_coef[rejected] = pair_scale * coef_r * per_token[rejected]
            g.mul_(row_coef.index_select(0, seq).unsqueeze(-1))
            accumulate_chunk_grads(g, xc, w, slice(t0, t1), dx_valid, dw, db)
            del g

        seq_logps = sums * per_token
        all_rows = slice(0, rows_n)
        ref_logps = _reference(ref_seq, ref_sums, per_token, rxf is not None, all_rows, all_rows)[0]
        pair_sum = counted_pair_losses(
            seq_logps[:batch], seq_logps[batch:], ref_logps[:batch], ref_logps[batch:], counted, **opts.formula()
        ).sum()
        nll_sum = -sums[:batch].sum()
        total = pair_scale * pair_sum + nll_scale * nll_sum
        dx = None
        if need_dx:
            dx = torch.zeros_like(xf).index_copy_(0, layout.tokens, dx_valid).view_as(x)
        ctx.grads = (dx, dw, db)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        ctx.save_for_backward(x, w, b)
        ctx.mark_non_differentiable(pair_sum, nll_sum, seq_logps, ref_logps)
        return total, pair_sum, nll_sum, seq_logps, ref_logps

    @staticmethod
    def backward(ctx, grad_total, *_grad_rest):
        # The same hand-over as the engine's grad-in-forward loss (ctx.grads, ctx.dtypes, saved x, w, b):
        # dX, dW, db scaled by grad_total, once.
        dx, dw, db = GradInForward.backward(ctx, grad_total)[:3]
        return (dx, dw, db) + (None,) * 9


def _reference(ref_seq, ref_sums, per_token, from_hidden: bool, chosen: slice, rejected: slice):
    """The reference's sequence log-probabilities of the chosen and rejected rows ``(rows, rows)``."""
    if from_hidden:
        return ref_sums[chosen] * per_token[chosen], ref_sums[rejected] * per_token[rejected]
    return ref_seq[chosen], ref_seq[rejected]


def _sequence_grads(chosen, rejected, ref_c, ref_r, counted, opts: PairOptions):
    """``d pair_sum / d chosen``, ``d pair_sum / d rejected`` ``[k]`` for k pairs (autograd on ``[k]``)."""
    with torch.enable_grad():
        c = chosen.detach().requires_grad_()
        r = rejected.detach().requires_grad_()
        total = counted_pair_losses(c, r, ref_c, ref_r, counted, **opts.formula()).sum()
        return torch.autograd.grad(total, (c, r))
