"""Forward KL against a sparse (cached) teacher: k of the teacher's log-probabilities per token.

A teacher run ahead of training stores, per token, the ids ``[k]`` of a few vocabulary entries
(its top-k, or ids drawn from its distribution) and their log-probabilities ``[k]`` at temperature
T. The student's distribution ``q = softmax(z / T)`` is taken over the *whole* vocabulary; only its
values at the teacher's ids ``K`` and, for ``tail="bucket"``, the mass outside them are compared:

* ``renormalize``: ``p~`` = the teacher's entries renormalized to sum 1,
  ``KD = sum_K p~ (log p~ - log q)``; gradient w.r.t. ``s = z / T``: ``q P - p~`` on K,
  with ``P = sum_K p~`` (1, or 0 for a token with no entry);
* ``bucket``: ``p = exp(logprob)``, ``p_tail = max(1 - sum_K p, 0)`` against ``q_tail = 1 - sum_K q``:
  ``KD = sum_K p (log p - log q) + p_tail (log p_tail - log q_tail)``. With ``d log q_i / ds_j =
  delta_ij - q_j`` and ``d log q_tail / ds_j = q_j (Q_K - [j in K]) / q_tail`` (``Q_K = sum_K q``),
  the gradient is ``q_j (P_tot - p_tail / q_tail)`` off K and ``q_j P_tot - p_j`` on K, where
  ``P_tot = sum_K p + p_tail`` (1 unless the teacher's entries sum past 1).

The loss is ``T^2 KD`` (Hinton), so the gradient w.r.t. the raw logits is ``T dKD/ds``.

``q_tail`` is summed directly over the columns outside K (the student's ``exp`` with K's columns
zeroed), never as ``1 - sum_K q``: that difference loses every digit once the student puts nearly
all its mass on K, which is where the tail term's gradient ``p_tail / q_tail`` is largest. A token
whose ids cover the whole vocabulary has no tail: its ``p_tail`` (rounding noise of the cached
log-probabilities) is taken as 0 rather than compared with an empty ``q_tail = 0``.

Conventions: an id of ``-1`` is an unused slot (rows may hold fewer than k entries); a teacher
log-probability of ``-inf`` is an entry of probability 0; a token with no used entry (or an
ignored token) has KD 0 and gradient 0; a NaN log-probability at a counted token makes its value
NaN (never masked into a number). Duplicate ids within a row are refused by the public functions'
validation; unvalidated, each slot counts as an entry of its own and the result is unspecified.

Vocabulary-parallel (:class:`tune_losses.divergences.VocabReducer` of a process group): each rank
gathers the student's logits at the ids it owns (0 elsewhere); per chunk, one all-reduce of the
row maxima and one of ``[n, k + 1]`` (those logits and one sum of exponentials: the whole row's, or
for ``bucket`` the tail's) give every rank the exact per-token values; each rank writes its own
columns' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from tune_losses.divergences import ChunkRun, VocabReducer
from tune_losses.options import TAILS, SparseKDOptions  # noqa: F401 (TAILS: this module's name for it, kept)
from tune_losses.terms import Chunk, Term

TEACHER_IDS = "teacher_ids"
TEACHER_LOGPROBS = "teacher_logprobs"
NEG_INF = float("-inf")


def _row_max(m: torch.Tensor, red: VocabReducer) -> torch.Tensor:
    """Global row maxima ``[n]``; a row of only -inf logits gets 0 (its shifted logits stay -inf)."""
    m = red.max(m)
    return m.masked_fill(m == NEG_INF, 0.0)


def _teacher_renormalized(lp: torch.Tensor, used: torch.Tensor):
    """``(p~ [n, k], log p~ [n, k], P [n])``: the used entries' softmax (0 / -inf elsewhere) and its
    total, 1 for a token with an entry of positive probability, 0 for one without."""
    lpu = lp.masked_fill(~used, NEG_INF)
    top = lpu.amax(-1, keepdim=True)
    top = top.masked_fill(top == NEG_INF, 0.0)
    e = (lpu - top).exp()
    total = e.sum(-1, keepdim=True)
    # An empty row (0, not NaN) keeps p~ = 0 there; a NaN log-probability keeps total NaN.
    total = torch.where(total == 0, 1.0, total)
    p = e / total
    return p, lpu - top - total.log(), p.sum(-1)


def sparse_kd_chunk(
    z: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    valid: torch.Tensor,
    opts: SparseKDOptions,
    run: ChunkRun,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``T^2 KD`` of a sparse teacher against ``q = softmax(z / T)``, and its gradient w.r.t. ``z``.

    Args:
        z: ``[n, V_r]`` raw student logits (compute dtype), columns ``[red.start, red.start + V_r)``.
        ids: ``[n, k]`` integer vocabulary ids in ``[0, V)``, or -1 for an unused slot.
        logprobs: ``[n, k]`` the teacher's log-probabilities of ``ids`` at temperature T.
        valid: ``[n]`` bool mask of counted tokens.
        run: the reducer ``red``, the gradient weight per token (0 at ignored tokens; None: the value
            only), whether ``z`` may be overwritten, and the chunk's shared student statistics:
            ``rows["raw"] = (max [n], sum exp(z - max) [n])`` of the raw logits over the whole
            vocabulary when another term of the chunk computed them (used at T = 1 only).

    Returns:
        ``(loss [n] (0 at ignored tokens), grad [n, V_r] or None)``.
    """
    red, weight, consume, rows = run
    student_stats = None if rows is None else rows.get("raw")
    t = opts.temperature
    bucket = opts.tail == "bucket"
    width = z.shape[-1]
    ids = ids.long()
    lp = logprobs.to(z.dtype)
    # Ignored tokens count as tokens without entries: whatever their cached values (NaN included),
    # they then give exactly 0 and a zero gradient.
    used = (ids >= 0) & valid.unsqueeze(-1)
    local = ids - red.start
    owned = used & (local >= 0) & (local < width)
    idx = torch.where(owned, local, 0).long()  # int32 ids: torch 2.7's gather takes int64 only

    if consume:
        s = z.div_(t) if t != 1.0 else z
    else:
        s = z / t if t != 1.0 else z
    shared = student_stats if (student_stats is not None and t == 1.0) else None
    m = _row_max(s.amax(-1), red) if shared is None else shared[0]
    s_k = torch.where(owned, s.gather(-1, idx), 0.0)  # [n, k]: the student's logits at this rank's ids
    e = s.sub_(m.unsqueeze(-1)) if consume else s - m.unsqueeze(-1)
    e = e.exp_() if consume else e.exp()
    stats = [s_k]
    if bucket:
        # Zero K's columns (prod with 0; unowned and unused slots multiply column 0 by 1), then the
        # tail's sum is a sum of positive terms (see the module docstring).
        hit = torch.where(owned, 0.0, 1.0).to(e.dtype)
        e = e.scatter_reduce_(-1, idx, hit, "prod") if consume else e.scatter_reduce(-1, idx, hit, "prod")
        stats.append(e.sum(-1, keepdim=True))
    elif shared is None:
        stats.append(e.sum(-1, keepdim=True))
    r = red.sum(torch.cat(stats, -1))
    log_q = r[:, : ids.shape[-1]] - m.unsqueeze(-1)  # [n, k]: z_K / T - max, then minus log S below

    if bucket:
        sum_tail = r[:, -1]
        e_k = torch.where(used, log_q.exp(), 0.0)
        sum_all = sum_tail + e_k.sum(-1)
        log_sum = sum_all.log()
        log_q = log_q - log_sum.unsqueeze(-1)
        p = torch.where(used, lp.exp(), 0.0)
        head = torch.where(p == 0, 0.0, p * (lp - log_q)).sum(-1)
        # 1 - sum p in fp64 ([n, k], cheap): in fp32 it loses the digits of a small teacher tail.
        p_k = torch.where(used, lp.double().exp(), 0.0).sum(-1)
        has_tail = valid & (used.sum(-1) < red.vocab)
        p_tail = torch.where(has_tail, (1 - p_k).clamp(min=0.0), 0.0).to(lp.dtype)
        p_k = p_k.to(lp.dtype)
        log_q_tail = sum_tail.log() - log_sum
        tail = torch.where(p_tail == 0, 0.0, p_tail * (p_tail.log() - log_q_tail))
        kd = head + tail
        p_total = p_k + p_tail
        # p_tail / q_tail, 0 without a tail (not 0 * inf where the student's tail is empty too).
        ratio = torch.where(p_tail == 0, 0.0, p_tail * sum_all / sum_tail)
        dense_row, on_k = (p_total - ratio) / sum_all, e_k / sum_all.unsqueeze(-1) * p_total.unsqueeze(-1) - p
    else:
        sum_all = r[:, -1] if shared is None else shared[1]
        log_q = log_q - sum_all.log().unsqueeze(-1)
        p, log_p, p_total = _teacher_renormalized(lp, used)
        kd = torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)
        dense_row, on_k = p_total / sum_all, -p

    loss = torch.where(valid, kd * (t * t), 0.0)
    if weight is None:
        return loss, None
    # d(T^2 KD)/dz = T dKD/ds; the token's weight and the softmax's 1 / S are one per-row factor.
    w = weight * t
    g = e.mul_((w * dense_row).unsqueeze(-1)) if consume else e * (w * dense_row).unsqueeze(-1)
    amount = torch.where(owned, on_k * w.unsqueeze(-1), 0.0)
    g = g.scatter_add_(-1, idx, amount) if consume else g.scatter_add(-1, idx, amount)
    return loss, g


@dataclass(frozen=True)
class SparseKDTerm(Term):
    """Forward KL against a cached teacher, read per chunk from ``chunk.inputs``:
    ``"teacher_ids"`` ``[n, k]`` and ``"teacher_logprobs"`` ``[n, k]`` (see :func:`sparse_kd_chunk`)."""

    opts: SparseKDOptions = SparseKDOptions()
    weight: float = 1.0
    name: str = "kd"
    # TUNE_LOSSES_COMPILE=auto runs this term eagerly: its eager math works in place in the chunk's
    # logits buffer, while Inductor keeps the gradient before the scatter of the K entries in buffers
    # of its own. Measured (benchmarks/results/sparse_kd_cpu.md, N=2048 H=256 V=32768 k=64 fp32 CPU):
    # peak 50.6 MiB eager vs 82.1 MiB compiled (a quarter of the fp32 logits is 64 MiB), for a step
    # 15% faster compiled under a load average of 17 on 2 cores.
    eager_in_auto: ClassVar[bool] = True

    def compute(self, chunk: Chunk, weights, consume_student, consume_teacher):
        run = chunk.student_run(weights, consume_student)
        ids, logprobs = chunk.inputs[TEACHER_IDS], chunk.inputs[TEACHER_LOGPROBS]
        value, g = sparse_kd_chunk(chunk.student, ids, logprobs, chunk.valid, self.opts, run)
        return (value,), g
