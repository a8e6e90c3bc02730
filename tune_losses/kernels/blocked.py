"""Column-local loss gradients: the math of the vocabulary-blocked backward.

The blocked backward (:mod:`tune_losses.fused.dw_accumulation`) makes dW one block of vocabulary
rows at a time: the block's logits for *all* tokens ``[N, Vb]`` from one matmul, their gradient,
then ``dW[block] = g.T @ X`` in one matmul (rounded once, no ``[V, H]`` accumulator). That works
for a term whose gradient at column ``j`` depends only on column ``j``'s logits and a few numbers
per token over the whole vocabulary, computed by the engine's chunk loop before (:func:`row_stats`):

* cross-entropy (label smoothing ``eps``, z-loss ``c``, softcap ``s``), with ``lse`` of the
  (capped) logits: ``g_j = w (softmax_j (1 + 2 c lse) - (1 - eps) [j = y] - eps / V)``, times
  ``1 - (z_j / s)^2`` under a softcap;
* a distillation divergence ``sum_v f(log p_v, log q_v)`` with the two sides' ``lse`` (of ``z / T``)
  and ``S_a = sum_v a_v`` (``a = df / dlog q``): ``g_j = w (a_j - q_j S_a) * loss_scale / T``,
  ``a_j`` elementwise (:func:`tune_losses.divergences.divergence_terms`), so every registered
  divergence works;
* the label's log-probability and the entropy ``H`` (``lse`` of ``z / T``; ``H`` is the term's own
  output): ``g_j = (w_lp ([j = y] - q_j) - w_H q_j (log q_j + H)) / T``.

Any other term (a sparse teacher, a policy term, ...) is not column-local in this sense:
:func:`blocked_unsupported` says why, and the engine accumulates dW per chunk instead.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from tune_losses.divergences import VocabReducer, divergence_terms
from tune_losses.divergences.common import add_at_label, label_index
from tune_losses.terms import CrossEntropyTerm, DivergenceTerm, LogProbTerm, Term

Stats = Dict[str, torch.Tensor]


def blocked_unsupported(terms: Sequence[Term], red: Optional[VocabReducer]) -> Optional[str]:
    """None when every term has a column-local gradient here, else the reason (for messages)."""
    if red is not None and red.distributed:
        return "the vocabulary is split across processes (vocabulary-parallel weights)"
    for t in terms:
        if isinstance(t, DivergenceTerm):
            if t.opts.teacher_vocab == "pad_student":
                return f"term {t.name!r} keeps a wider teacher vocabulary (teacher_vocab={t.opts.teacher_vocab!r})"
        elif not isinstance(t, (CrossEntropyTerm, LogProbTerm)):
            return f"term {t.name!r} ({type(t).__name__}) has no column-local gradient"
    return None


def _capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def row_stats(term: Term, z: torch.Tensor, zt: Optional[torch.Tensor]) -> Stats:
    """A term's per-token statistics over the whole vocabulary from one chunk ``[n, V]`` of raw
    logits (compute dtype; neither tensor is modified): ``{name: [n]}``."""
    if isinstance(term, CrossEntropyTerm):
        return {"lse": torch.logsumexp(_capped(z, term.opts.softcap), -1)}
    if isinstance(term, LogProbTerm):
        return {"lse": torch.logsumexp(z / term.temperature, -1)}
    if isinstance(term, DivergenceTerm):
        if zt is None:
            raise ValueError("zt: a divergence term needs the teacher's logits, got None")
        t = term.opts.temperature
        zs, zt = z / t, zt / t
        lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
        log_q, log_p = zs.sub_(lse_s.unsqueeze(-1)), zt.sub_(lse_t.unsqueeze(-1))
        _, a, _ = divergence_terms(log_p, log_q, term.opts, True)
        return {"lse_s": lse_s, "lse_t": lse_t, "sum_a": a.sum(-1)}
    raise ValueError(f"terms: {type(term).__name__} has no column-local gradient (see blocked_unsupported)")


def block_grad(
    term: Term,
    zb: torch.Tensor,
    ztb: Optional[torch.Tensor],
    col0: int,
    vocab: int,
    labels: torch.Tensor,
    valid: torch.Tensor,
    stats: Stats,
    weights: Sequence[Optional[torch.Tensor]],
    outputs: Stats,
    consume: bool = False,
) -> Optional[torch.Tensor]:
    """The term's gradient w.r.t. the logits of vocabulary columns ``[col0, col0 + Vb)``.

    Args:
        zb, ztb: ``[N, Vb]`` student / teacher logits of the block (compute dtype).
        vocab: V, the whole vocabulary (label smoothing's ``eps / V``).
        labels, valid: ``[N]``.
        stats: the term's :func:`row_stats` for all tokens (``[N]`` each).
        weights: per output of the term, an ``[N]`` weight (0 at ignored tokens) or None.
        outputs: every output's per-token values by name (``[N]``), e.g. the entropy.
        consume: ``zb`` may be overwritten (no later term of the block reads it).

    Returns:
        ``[N, Vb]`` gradient in the compute dtype, or None when no output has a weight.
    """
    if all(w is None for w in weights):
        return None
    # The block holds columns [col0, col0 + Vb) of the vocabulary, as a vocabulary shard would.
    idx, owned = label_index(labels, valid, zb.shape[1], VocabReducer(vocab, col0))
    if isinstance(term, CrossEntropyTerm):
        o = term.opts
        w = weights[0]
        if w is None:
            return None
        z = _capped(zb, o.softcap)
        dcap = None if o.softcap is None else 1 - (z / o.softcap).square()
        lse = stats["lse"]
        row = w * (1 + 2 * o.z_loss * lse) if o.z_loss > 0 else w
        shifted = z.sub_(lse.unsqueeze(-1)) if consume or o.softcap is not None else z - lse.unsqueeze(-1)
        g = shifted.exp_().mul_(row.unsqueeze(-1))
        g = add_at_label(g, idx, owned, -(1 - o.label_smoothing) * w)
        if o.label_smoothing > 0:
            g.sub_((o.label_smoothing / vocab) * w.unsqueeze(-1))
        return g if dcap is None else g.mul_(dcap)
    if isinstance(term, LogProbTerm):
        t = term.temperature
        w_lp = weights[0]
        w_h = weights[1] if term.entropy and len(weights) > 1 else None
        log_q = (zb / t).sub_(stats["lse"].unsqueeze(-1))
        q = log_q.exp()
        g = torch.zeros_like(q)
        if w_h is not None:
            # dH/dz' = -q (log q + H); q log q is 0 where q is (a -inf logit).
            ent = outputs[term.outputs[1]]
            g.sub_(torch.special.xlogy(q, q).add_(q * ent.unsqueeze(-1)).mul_(w_h.unsqueeze(-1)))
        if w_lp is not None:
            g.sub_(q.mul_(w_lp.unsqueeze(-1)))
            g = add_at_label(g, idx, owned, w_lp)
        return g.div_(t) if t != 1.0 else g
    if isinstance(term, DivergenceTerm):
        kd = term.opts
        w_kd = weights[0]
        if w_kd is None or ztb is None:
            return None
        t = kd.temperature
        log_q = (zb / t).sub_(stats["lse_s"].unsqueeze(-1))
        log_p = (ztb / t).sub_(stats["lse_t"].unsqueeze(-1))
        _, a, q = divergence_terms(log_p, log_q, kd, True)
        return a.sub_(q.mul_(stats["sum_a"].unsqueeze(-1))).mul_((w_kd * (kd.loss_scale / t)).unsqueeze(-1))
    raise ValueError(f"terms: {type(term).__name__} has no column-local gradient (see blocked_unsupported)")
