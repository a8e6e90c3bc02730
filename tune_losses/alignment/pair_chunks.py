"""Preference losses with their gradients made in forward, one chunk of whole pairs at a time, on the engine.

The per-token path (:func:`tune_losses.linear_log_probs`) makes a chunk's logits in forward and again in
backward: 4 ``[n, H] x [H, V]`` matmul-equivalents per token for the policy (logits, logits again, dX,
dW). A preference loss needs, at one token, only the sequence log-probabilities of that token's pair.
So when a chunk holds whole pairs (chosen row i and rejected row i + B, their valid tokens only), the
chunk can finish its part of the loss and of the gradient at once. This module runs that on the
engine's one chunk loop (:func:`tune_losses.fused.engine.run_terms`, grad-in-forward):

* the valid tokens are gathered pair by pair and the engine gets explicit chunk bounds (whole pairs,
  :func:`pair_chunk_layout`); the reference model, when given as hidden states, is the engine's
  second ("teacher") side, so its logits are made per chunk too, without gradient;
* :class:`PreferencePairTerm` reads the pair layout through ``Chunk.inputs`` and, per chunk: the
  policy's per-token log-probabilities and ``onehot - softmax`` in one buffer
  (:func:`tune_losses.divergences.log_prob_chunk`), the reference's log-probabilities, the chunk's
  sequence log-probabilities (sum or mean), its pair losses
  (:func:`tune_losses.alignment.formulas.counted_pair_losses`) and their derivatives with respect to
  each sequence log-probability (autograd on ``[pairs]`` tensors), then per token the logit gradient;
* the engine turns that into dX, dW, db (3 matmul-equivalents for the policy, +1 for the reference,
  over valid tokens only) and hands them over in backward, once.

It applies to plain tensors (and FSDP2 weights, gathered once per call), with a gradient wanted and
every pair within the chunk budget (:func:`pair_chunk_layout` returns None otherwise); callers keep the
per-token path for everything else (vocabulary-parallel weights, long pairs, ``algorithm="recompute"``).
``chunk_size`` means tokens per chunk, as everywhere (:mod:`tune_losses.chunking`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from tune_losses.alignment.formulas import counted_pair_losses, counted_pairs
from tune_losses.alignment.options import PreferenceOptions
from tune_losses.chunking import chunk_policy, max_pair_chunk
from tune_losses.divergences import VocabReducer, log_prob_chunk
from tune_losses.fused.engine import LossPlan, compute_dtype, run_terms
from tune_losses.fused.placement import TP_MESH_DIM_NAMES, materialize_weight
from tune_losses.terms import Term
from tune_losses.validation import LABEL_DTYPES, is_dtensor


def default_row_budget(
    vocab_size: int, device: torch.device, hidden_size: Optional[int] = None, reference: bool = False
) -> int:
    """The most valid tokens a chunk of whole pairs holds when the caller gives no ``chunk_size``:
    :func:`tune_losses.chunking.max_pair_chunk` of the chunk policy's tokens
    (:func:`tune_losses.chunking.chunk_policy`, two logit sets with a reference model). Whole pairs
    amortize the per-chunk work of the pair formula; the measurements: benchmarks/results/."""
    policy = chunk_policy(1 << 62, vocab_size, device, 2 if reference else 1, hidden_size)
    return max_pair_chunk(policy)


def pair_chunk_limits(chunk_size: Optional[int], vocab_size: int, device: torch.device) -> Tuple[int, int]:
    """``(tokens per chunk, the most valid tokens one pair may hold)`` of the chunks of whole pairs.

    ``chunk_size`` means tokens per chunk, as everywhere: a chunk holds as many whole pairs as fit,
    at least one, so a pair longer than ``chunk_size`` has a chunk of its own, up to
    :func:`tune_losses.chunking.max_pair_chunk` tokens (a longer pair: the per-token path). None:
    :func:`default_row_budget` for both.
    """
    if chunk_size is None:
        budget = default_row_budget(vocab_size, device)
        return budget, budget
    return chunk_size, max_pair_chunk(chunk_size)


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


def pair_chunk_layout(
    labels: torch.Tensor, ignore_index: int, chunk_size: int, max_pair: Optional[int] = None
) -> Optional[PairLayout]:
    """Pack consecutive pairs of ``labels`` ``[2B, S]`` into chunks of valid tokens.

    A chunk takes whole pairs (never split) while it holds at most ``chunk_size`` tokens, and at
    least one pair. Returns None when one pair alone holds more than ``max_pair`` valid tokens
    (default :func:`tune_losses.chunking.max_pair_chunk` of ``chunk_size``).
    """
    rows_n, seq = labels.shape
    batch = rows_n // 2
    mask = labels != ignore_index
    lengths = mask.sum(dim=-1)
    # The chunk boundaries are Python integers (they slice tensors and bound the loop), so the [2B]
    # valid-token counts are read to the host once per call: this path's only host sync.
    counts = lengths.tolist()
    pair_sizes = [counts[p] + counts[batch + p] for p in range(batch)]
    if max(pair_sizes, default=0) > (max_pair_chunk(chunk_size) if max_pair is None else max_pair):
        return None
    chunks, first_pair, first_token, size = [], 0, 0, 0
    for p, n in enumerate(pair_sizes):
        if size and size + n > chunk_size:
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


def _plain(t) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def _gathered_dtensor(t) -> bool:
    """A DTensor sharded over data-parallel mesh dimensions only (FSDP2, HSDP): gathered once per call.
    A vocabulary-parallel one (a ``tp`` / ``tensor`` mesh dimension) is not: the per-token path has
    the vocabulary reducer."""
    return is_dtensor(t) and not any(n in TP_MESH_DIM_NAMES for n in (t.device_mesh.mesh_dim_names or ()))


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


PAIR, SIDE, ROW_SCALE, COUNTED, REF_SEQ = "pair", "side", "row_scale", "counted", "ref_seq"


@dataclass(frozen=True)
class PreferencePairTerm(Term):
    """The preference loss of the whole pairs in a chunk, and its NLL term, as one engine term.

    Per-token side inputs (``Chunk.inputs``): ``pair`` (int64, the pair of the token's row), ``side``
    (0 chosen, 1 rejected), ``row_scale`` (1 / the row's valid tokens for mean log-probabilities, else
    1), ``counted`` (1 where the pair counts: both rows have a valid token), ``scales`` ``[n, 2]``
    (``pair_scale``, ``nll_scale``), and ``ref_seq`` (the reference's sequence log-probability of the
    row) when the reference is not a model on the engine's second side.

    Outputs per token: ``total`` (``pair_scale`` x the pair's loss at its first token + ``nll_scale``
    x ``-log p`` at chosen tokens: the loss, whose sum is the call's), then, values only, ``pair``
    (the pair losses at their first tokens), ``nll`` (``-log p`` at chosen tokens), ``logp`` and
    ``ref_logp`` (per-token log-probabilities of the policy and the reference model, 0 without one).
    """

    opts: PreferenceOptions
    name: str = "total"
    needs_teacher: bool = False  # True when the reference is a model (its logits: the chunk's teacher)
    weight: float = 1.0
    compilable = False  # autograd on the chunk's [pairs] tensors (the formula's derivatives)

    @property
    def outputs(self) -> Tuple[str, ...]:
        return ("total", "pair", "nll", "logp", "ref_logp")

    def compute(self, chunk, weights, consume_student, consume_teacher):
        if weights is not None and any(w is not None for w in weights[1:]):
            raise NotImplementedError("PreferencePairTerm: only its first output (the loss) has a gradient")
        inp = chunk.inputs
        n = chunk.labels.shape[0]
        dtype = chunk.student.dtype
        pair, chosen = inp[PAIR], inp[SIDE] == 0
        # Pair slots of this chunk: 0 .. k-1 (k <= n), and slot n takes what belongs to no slot. All on
        # device: the chunk's first pair is a tensor, never read on the host.
        slot = pair - pair[0]
        slot_c = torch.where(chosen, slot, n)
        slot_r = torch.where(chosen, n, slot)
        scale = inp[ROW_SCALE].to(dtype)

        def per_slot(values, index):  # sum of per-token values into [n + 1] slots
            return torch.zeros(n + 1, dtype=dtype, device=values.device).index_add_(0, index, values)

        def row_value(values, index):  # one value per row, the same at each of its tokens
            return torch.zeros(n + 1, dtype=dtype, device=values.device).scatter_(0, index, values)

        ref_lp = torch.zeros(n, dtype=dtype, device=chunk.labels.device)
        if chunk.teacher is not None:
            red = VocabReducer(chunk.teacher.shape[-1])
            (ref_lp,), _ = log_prob_chunk(chunk.teacher, chunk.labels, chunk.valid, 1.0, red, consume=consume_teacher)
            ref_c, ref_r = per_slot(ref_lp * scale, slot_c), per_slot(ref_lp * scale, slot_r)
        else:
            ref_tok = inp[REF_SEQ].to(dtype)
            ref_c, ref_r = row_value(ref_tok, slot_c), row_value(ref_tok, slot_r)
        need_grad = weights is not None and weights[0] is not None
        ones = torch.ones(n, dtype=dtype, device=chunk.labels.device) if need_grad else None
        # weight 1 on log p[y]: the gradient buffer holds onehot - softmax, scaled per token below.
        (lp,), g = log_prob_chunk(
            chunk.student, chunk.labels, chunk.valid, 1.0, chunk.reducer, weights=(ones, None), consume=consume_student
        )
        seq_c, seq_r = per_slot(lp * scale, slot_c), per_slot(lp * scale, slot_r)
        counted = row_value(inp[COUNTED].to(dtype), slot).bool()
        positions = torch.arange(n, device=pair.device)
        first = torch.full((n + 1,), n, dtype=positions.dtype, device=pair.device)
        first = first.scatter_reduce_(0, slot, positions, reduce="amin")
        at_first = first.index_select(0, slot) == positions
        scales = inp["scales"].to(dtype)
        pair_scale, nll_scale = scales[:, 0], scales[:, 1]
        if need_grad:
            losses, (d_c, d_r) = _pair_losses_and_grads(seq_c, seq_r, ref_c, ref_r, counted, self.opts)
        else:
            losses = counted_pair_losses(seq_c, seq_r, ref_c, ref_r, counted, **self.opts.formula())
        pair_tok = torch.where(at_first, losses.index_select(0, slot), 0.0)
        nll_tok = torch.where(chosen, -lp, 0.0)
        total = pair_scale * pair_tok + nll_scale * nll_tok
        outs = (total, pair_tok, nll_tok, lp, ref_lp)
        if not need_grad:
            return outs, None
        w = weights[0]
        # d(sum_i w_i total_i) / d log p_i: the pair's weight (at its first token) times d loss / d seq
        # times d seq / d log p_i (row_scale), and -w_i nll_scale at chosen tokens.
        w_pair = (w * pair_scale).index_select(0, first.clamp(max=n - 1).index_select(0, slot))
        d_seq = torch.where(chosen, d_c.index_select(0, slot), d_r.index_select(0, slot))
        coef = w_pair * d_seq * scale - torch.where(chosen, w * nll_scale, 0.0)
        return outs, g.mul_(coef.unsqueeze(-1))


def _pair_losses_and_grads(chosen, rejected, ref_c, ref_r, counted, opts: PreferenceOptions):
    """Pair losses ``[k]`` and their derivatives with respect to ``chosen`` and ``rejected`` (autograd on ``[k]``)."""
    with torch.enable_grad():
        c = chosen.detach().requires_grad_()
        r = rejected.detach().requires_grad_()
        losses = counted_pair_losses(c, r, ref_c, ref_r, counted, **opts.formula())
        grads = torch.autograd.grad(losses.sum(), (c, r))
    return losses.detach(), grads


class PairChunkedPreference:
    """A preference loss over chunks of whole pairs, gradients made in forward (the engine's grad-in-forward).

    :meth:`apply` takes hidden ``[2B, S, H]``, weight ``[V, H]``, bias ``[V]`` or None (differentiable);
    the reference as ``ref_hidden`` ``[2B, S, H']`` + ``ref_weight`` ``[V', H']`` + ``ref_bias``, or as
    sequence log-probabilities ``ref_seq`` ``[2B]``, or neither (0); labels ``[2B, S]``; the
    :class:`PairLayout` and :class:`~tune_losses.alignment.options.PreferenceOptions`; ``pair_scale``,
    ``nll_scale`` (0-dim); ``dw_accumulation`` as :class:`~tune_losses.options.ExecutionOptions`.

    Returns ``(total, pair_sum, nll_sum, seq_logps [2B], ref_seq_logps [2B])`` in the compute dtype:
    ``total = pair_scale * pair_sum + nll_scale * nll_sum`` is differentiable (backward can run once),
    where ``pair_sum`` sums the counted pairs' losses and ``nll_sum`` the chosen rows' ``-log p``; the
    rest are detached.
    """

    @staticmethod
    def apply(
        x,
        w,
        b,
        ref_x,
        ref_w,
        ref_b,
        ref_seq,
        labels,
        layout: PairLayout,
        opts: PreferenceOptions,
        pair_scale,
        nll_scale,
        dw_accumulation: str = "auto",
    ):
        rows_n, seq_len = labels.shape
        batch = rows_n // 2
        dtype = compute_dtype(x.dtype)
        tokens, rows = layout.tokens, layout.rows
        num_valid = tokens.shape[0]
        # The valid tokens, pair by pair: the gather is differentiable (its backward puts dX back in place).
        xs = x.reshape(rows_n * seq_len, x.shape[-1]).index_select(0, tokens)
        lab = labels.reshape(-1).index_select(0, tokens)
        rxs = None if ref_x is None else ref_x.reshape(rows_n * seq_len, ref_x.shape[-1]).index_select(0, tokens)
        lengths = layout.lengths.to(dtype)
        per_row = 1.0 / lengths.clamp(min=1) if opts.average else torch.ones_like(lengths)
        counted_rows = counted_pairs(layout.lengths[:batch], layout.lengths[batch:]).repeat(2)
        inputs = {
            PAIR: rows % batch,
            SIDE: (rows >= batch).to(torch.int64),
            ROW_SCALE: per_row.index_select(0, rows),
            COUNTED: counted_rows.index_select(0, rows).to(dtype),
            "scales": torch.stack([pair_scale.to(dtype), nll_scale.to(dtype)]).expand(num_valid, 2),
        }
        if rxs is None:
            ref_rows = torch.zeros(rows_n, dtype=dtype, device=x.device) if ref_seq is None else ref_seq.to(dtype)
            inputs[REF_SEQ] = ref_rows.index_select(0, rows)
        term = PreferencePairTerm(opts, needs_teacher=rxs is not None)
        bounds = tuple((t0, t1) for _, _, t0, t1 in layout.chunks if t1 > t0)
        plan = LossPlan((term,), ignore_index=_NO_IGNORED, dw_accumulation=dw_accumulation, bounds=bounds)
        total, parts = run_terms(
            xs,
            w,
            b,
            lab,
            rxs,
            ref_w,
            ref_b,
            plan,
            per_token=False,
            recompute=False,
            inputs=inputs,
            per_token_parts=True,
        )
        scale = inputs[ROW_SCALE]
        seq_logps = torch.zeros(rows_n, dtype=dtype, device=x.device).index_add_(0, rows, parts["logp"] * scale)
        if rxs is None:
            ref_logps = torch.zeros(rows_n, dtype=dtype, device=x.device) if ref_seq is None else ref_seq.to(dtype)
        else:
            ref_logps = torch.zeros(rows_n, dtype=dtype, device=x.device).index_add_(0, rows, parts["ref_logp"] * scale)
        return total, parts["pair"].sum(), parts["nll"].sum(), seq_logps, ref_logps.detach()


# The gathered tokens are all valid: no label equals this (labels are >= 0 there).
_NO_IGNORED = -(1 << 62)
