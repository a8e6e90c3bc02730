"""Vocabulary-parallel fused losses: the chunk loop when the output weight is sharded over the vocabulary.

Each rank of a process group holds rows ``[start, start + V_r)`` of the output weight ``W`` (and bias)
and the *same* hidden states (tensor parallelism: the tokens are replicated over the group). Per
token chunk a rank makes only its local logits ``z_r = x_c @ W_r.T`` ``[n, V_r]`` (fp32) and the
ranks combine per-token statistics with all-reduces of ``[k, n]`` tensors:

* cross-entropy: MAX of the row maxima, then one SUM of (sum-exp, target logit, sum of logits); the
  rank owning label ``y`` contributes ``z[y - start]``. Then ``lse = max + log(sum-exp)`` is global
  and every rank has the exact per-token loss. Its local logit gradient
  ``g_r = softmax_r * (1 + 2c lse) - (1 - eps) onehot_r - eps / V`` (times softcap's chain rule)
  gives ``dW_r += g_r.T @ x_c``, ``db_r += g_r.sum(0)`` and a *partial* ``dX_c = g_r @ W_r``.
* distillation (every divergence of :func:`tune_losses.divergences.kd_terms`, with temperature):
  global log-sum-exp of the student's and the teacher's scaled logits (one MAX, one SUM), local
  ``log q_r``, ``log p_r``; the divergence is a vocabulary sum of elementwise terms, so one more SUM
  of ``(partial divergence, sum_v a_v)`` with ``a = dD / d log q`` gives the value and, through the
  softmax coupling, the exact gradient ``dD/dz_j = (a_j - q_j sum_v a_v) / T`` (forward KL: the
  closed form ``(q - p) / T``).

The partial ``dX`` is summed over the group once, with one all-reduce of ``[N, H]`` after the last
chunk. No rank ever holds more than one chunk of its shard's logits (plus a few chunk-sized
temporaries); every rank runs every collective, whatever its labels (a rank whose tokens are all
ignored still takes part; there is no branch on tensor values and no host sync).

:class:`VocabParallelPass` has :func:`tune_losses.fused.engine.chunk_pass`'s signature and results, so
the engine's autograd functions (``GradInForward``, ``Recompute``) run it unchanged; the public entry
points (:mod:`tune_losses.fused.functional`) build it from a DTensor weight or a local shard and a
process group (:func:`shard_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tune_losses.divergences import kd_terms
from tune_losses.fused.engine import FusedSpec, chunk_pass
from tune_losses.options import CEOptions, KDOptions

_MAX = dist.ReduceOp.MAX if dist.is_available() else None
_SUM = dist.ReduceOp.SUM if dist.is_available() else None
# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def even_shard_sizes(vocab: int, ranks: int) -> List[int]:
    """Rows per rank of torch's ``Shard(0)`` (``torch.chunk`` semantics: ``ceil(V / ranks)`` rows
    each, larger shards first, possibly empty ones at the end)."""
    per = -(-vocab // ranks)
    return [max(0, min(vocab, (i + 1) * per) - i * per) for i in range(ranks)]


def shard_layout(
    group: Optional["dist.ProcessGroup"],
    local_sizes: Sequence[int],
    device: torch.device,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[int, int]:
    """``(start, V)`` of this rank's vocabulary shard from the local shard sizes of every rank.

    ``local_sizes``: this rank's row counts of the weights that must be sharded alike (student,
    teacher). Unless both ``vocab_start`` and ``vocab_size`` are given, one all-gather of the sizes
    over ``group`` (ranks in group order hold consecutive rows) and one host read; errors are then
    raised on every rank alike (no rank is left waiting in a collective).
    """
    if vocab_start is not None and vocab_size is not None:
        start, vocab = int(vocab_start), int(vocab_size)
        if not 0 <= start <= start + local_sizes[0] <= vocab:
            raise ValueError(f"vocab_start: rows [{start}, {start + local_sizes[0]}) of the weight shard must lie "
                             f"in [0, vocab_size={vocab}), got vocab_start={vocab_start}")
        if any(s != local_sizes[0] for s in local_sizes):
            raise ValueError(f"teacher_weight: expected {local_sizes[0]} vocabulary rows on this rank (as "
                             f"student_weight), got {local_sizes[1]}")
        if local_sizes[0] < 1:
            raise ValueError("weight: every rank needs at least one vocabulary row, got an empty shard")
        return start, vocab
    world = dist.get_world_size(group)
    mine = torch.tensor(list(local_sizes), dtype=torch.int64, device=device)
    gathered = torch.empty(world * len(local_sizes), dtype=torch.int64, device=device)
    _ALL_GATHER(gathered, mine, group=group)
    table = gathered.view(world, len(local_sizes)).tolist()
    sizes = [row[0] for row in table]
    if any(row[1:] != [row[0]] * (len(row) - 1) for row in table):
        raise ValueError(f"teacher_weight: expected the teacher's vocabulary sharded like the student's "
                         f"(rows per rank {sizes}), got {[row[1] for row in table]}")
    if min(sizes) < 1:
        raise ValueError(f"weight: every rank needs at least one vocabulary row, got rows per rank {sizes}")
    rank = dist.get_rank(group)
    start, vocab = sum(sizes[:rank]), sum(sizes)
    if vocab_start is not None and int(vocab_start) != start:
        raise ValueError(f"vocab_start: expected {start} (the rows of lower ranks), got {vocab_start}")
    if vocab_size is not None and int(vocab_size) != vocab:
        raise ValueError(f"vocab_size: expected {vocab} (the sum of the shards' rows), got {vocab_size}")
    return start, vocab


# ------------------------------------------------------------------------------- per-chunk math


def _global_max(m: torch.Tensor, group) -> torch.Tensor:
    """All-reduce MAX of per-token maxima; rows with no finite logit anywhere get 0 (as logsumexp)."""
    dist.all_reduce(m, op=_MAX, group=group)
    return m.masked_fill(torch.isinf(m), 0.0)


def ce_chunk(
    z: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    opts: CEOptions,
    start: int,
    vocab: int,
    group,
    need_grad: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Cross-entropy of one chunk from this rank's logits ``z`` ``[n, V_r]`` (fp32, overwritten).

    Returns ``(loss [n], grad [n, V_r] or None)``: the loss is the full (global) per-token value on
    every rank, 0 at ignored tokens; ``grad`` is d loss / d z_r for a unit weight per token.
    """
    s = opts.softcap
    if s is not None:
        z.div_(s).tanh_().mul_(s)
    m = _global_max(z.amax(-1), group)
    local = labels - start
    owned = valid & (local >= 0) & (local < z.shape[1])
    idx = torch.where(owned, local, torch.zeros_like(local)).unsqueeze(-1)
    stats = [torch.where(owned, z.gather(-1, idx).squeeze(-1), 0.0)]
    eps = opts.label_smoothing
    if eps > 0:
        stats.append(z.sum(-1))
    # softcap's chain rule needs tanh = z / s, read before z is overwritten by the softmax.
    dcap = 1 - (z / s).square() if need_grad and s is not None else None
    e = z.sub_(m.unsqueeze(-1)).exp_()
    stats.insert(0, e.sum(-1))
    red = torch.stack(stats)
    dist.all_reduce(red, op=_SUM, group=group)
    sumexp, z_y = red[0], red[1]
    lse = m + sumexp.log()
    loss = lse - z_y
    if eps > 0:
        loss = (1 - eps) * loss + eps * (lse - red[2] / vocab)
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if not need_grad:
        return loss, None
    # d/dz: softmax * (1 + 2 c lse) - (1 - eps) onehot - eps / V, on this rank's columns.
    g = e.div_(sumexp.unsqueeze(-1))
    if opts.z_loss > 0:
        g.mul_((1 + 2 * opts.z_loss * lse).unsqueeze(-1))
    g.scatter_add_(-1, idx, torch.where(owned, -(1 - eps), 0.0).unsqueeze(-1))
    if eps > 0:
        g.sub_(eps / vocab)
    if dcap is not None:
        g.mul_(dcap)
    g.mul_(valid.unsqueeze(-1))
    return loss, g


def kd_chunk(
    zs: torch.Tensor,
    zt: torch.Tensor,
    opts: KDOptions,
    group,
    need_grad: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Distillation divergence of one chunk from this rank's student / teacher logits ``[n, V_r]``
    (fp32, overwritten).

    Returns ``(divergence [n], grad [n, V_r] or None)``: the global per-token value (no ignore mask)
    and d divergence / d zs_r for a unit weight per token.
    """
    t = opts.temperature
    if t != 1.0:
        zs.div_(t)
        zt.div_(t)
    m = _global_max(torch.stack([zs.amax(-1), zt.amax(-1)]), group)
    sums = torch.stack([(zs - m[0].unsqueeze(-1)).exp_().sum(-1), (zt - m[1].unsqueeze(-1)).exp_().sum(-1)])
    dist.all_reduce(sums, op=_SUM, group=group)
    lse = m + sums.log()
    log_q = zs.sub_(lse[0].unsqueeze(-1))
    log_p = zt.sub_(lse[1].unsqueeze(-1))
    # Entries of infinite logits (a model's masked vocabulary) count as 0, as in kd_divergence.
    inf_q, inf_p = torch.isinf(log_q), torch.isinf(log_p)
    p = log_p.exp()
    log_p.masked_fill_(inf_p, 0.0)
    if opts.divergence == "forward_kl":
        # The usual distillation loss, lean on memory (in place, as the single-rank closed form):
        # terms p (log p - log q) (or torchtune's -p log q), 0 where the student's logit is infinite.
        terms = log_p.sub(log_q) if opts.true_kl else log_q.neg()
        partial = terms.mul_(p).masked_fill_(inf_q, 0.0).sum(-1)
        del terms
        dist.all_reduce(partial, op=_SUM, group=group)
        value = partial * opts.loss_scale if opts.loss_scale != 1.0 else partial
        if not need_grad:
            return value, None
        # a = -p, sum_v a_v = -1: dD/dz = (q - p) / T
        return value, log_q.exp_().sub_(p).mul_(opts.loss_scale / t)
    q = log_q.exp()
    log_q.masked_fill_(inf_q, 0.0)
    if need_grad:
        # a = dD / d log q elementwise (q = exp(log q) inside), by autograd on this chunk.
        with torch.enable_grad():
            leaf = log_q.detach().requires_grad_(True)
            q_of_leaf = leaf.exp().masked_fill(inf_q, 0.0)
            partial = kd_terms(log_p, leaf, p, q_of_leaf, opts, inf_p, inf_q).sum(-1)
            (a,) = torch.autograd.grad(partial.sum(), leaf)
        red = torch.stack([partial.detach(), a.sum(-1)])
    else:
        red = kd_terms(log_p, log_q, p, q, opts, inf_p, inf_q).sum(-1).unsqueeze(0)
    dist.all_reduce(red, op=_SUM, group=group)
    value = red[0] * opts.loss_scale if opts.loss_scale != 1.0 else red[0]
    if not need_grad:
        return value, None
    # dD/dz_j = (a_j - q_j sum_v a_v) / T
    return value, a.sub_(q.mul_(red[1].unsqueeze(-1))).mul_(opts.loss_scale / t)


# ------------------------------------------------------------------------------------ the loop


@dataclass(frozen=True)
class VocabParallelPass:
    """The vocabulary-parallel chunk loop: :func:`tune_losses.fused.engine.chunk_pass`'s signature
    and results, on this rank's weight rows ``[start, start + V_r)`` of a ``vocab``-row weight.

    ``w`` / ``b`` (and the teacher's ``tw`` / ``tb``) are the local shards; ``x`` / ``tx`` and
    ``labels`` are the same on every rank of ``group``. Per-token values come back complete (equal
    on every rank); ``dx`` complete (summed over the group, one all-reduce); ``dw`` / ``db`` are the
    gradients of the local shards. A per-token ``token_weight`` (``grad_output`` of
    ``reduction="none"``) must be the same on every rank, as it is when every rank runs the same
    computation on the loss.
    """

    group: Optional["dist.ProcessGroup"]
    start: int
    vocab: int

    # The per-chunk math :func:`chunk_pass` asks of it (see LocalChunkMath): all-reduced over the group.
    def vocab_size(self, w: torch.Tensor) -> int:
        # The single-rank chunk size (the rule on the global V): a chunk of this rank's logits
        # [n, V_r] is 1 / ranks of a single-rank chunk, so the memory per rank shrinks with the rank
        # count, for as many chunks (and per-chunk all-reduces) as one rank would loop over.
        return self.vocab

    def ce(self, z, labels, valid, opts: CEOptions, need_grad: bool):
        return ce_chunk(z, labels, valid, opts, self.start, self.vocab, self.group, need_grad)

    def kd(self, zs, zt, opts: KDOptions, need_grad: bool):
        return kd_chunk(zs, zt, opts, self.group, need_grad)

    def finish_dx(self, dx: torch.Tensor) -> None:
        # Each rank's dX holds its vocabulary rows' share: one all-reduce for the whole call.
        dist.all_reduce(dx, op=_SUM, group=self.group)

    def __call__(self, x, w, b, labels, tx, tw, tb, spec: FusedSpec, token_weight, need, grad_scale=None):
        """:func:`chunk_pass` with this vocabulary-parallel math."""
        return chunk_pass(x, w, b, labels, tx, tw, tb, spec, token_weight, need, grad_scale, math=self)
