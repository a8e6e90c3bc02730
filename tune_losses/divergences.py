"""Per-chunk loss math, written once against a vocabulary reducer.

Every function takes one chunk of logits ``[n, V_r]`` (the compute dtype: fp32, or fp64 for fp64
inputs) holding the columns ``[start, start + V_r)`` of a ``V``-column vocabulary, and returns the
per-token values ``[n]`` of the *whole* vocabulary with, on request, the gradient with respect to
those logits ``[n, V_r]``. Whatever crosses columns goes through a :class:`VocabReducer`: the row
maximum, a few per-token sums, the label's logit (a sum that only its owner adds to). On one
process the reducer is the identity (``V_r = V``); the vocabulary-parallel losses pass one that
all-reduces over the tensor-parallel group (:class:`tune_losses.fused.vocab_parallel.GroupReducer`).

Gradients are closed forms, never autograd on a chunk. A divergence ``D = sum_v f(log p_v, log q_v)``
of teacher p and student ``q = softmax(z / T)`` has, with ``a_v = df / dlog q_v``,
``dD / dz_j = (a_j - q_j sum_v a_v) / T``:

* forward KL ``p (log p - log q)`` (or torchtune's ``-p log q``): ``a = -p``;
* reverse KL ``q (log q - log p)``: ``a = q (log q - log p + 1)``, or ``a = q (log q - log p)``
  (adding ``c q`` to ``a`` changes nothing, since ``sum q = 1``);
* JSD(beta) with ``m = beta p + (1 - beta) q``: ``a = (1 - beta) q (log q - log m)`` (the terms
  through ``log m`` cancel);
* TVD ``|p - q| / 2``: ``a = sign(q - p) q / 2``.

Non-finite inputs are never hidden: only vocabulary entries whose logit is exactly -inf (a model's
deliberate mask) count as 0; a NaN or +inf logit anywhere in a row makes that token's value NaN.

Gradient weights: ``weight`` arguments are per-token ``[n]`` factors (the loss weight, the
``1 / tokens`` scale, or ``grad_output``), already 0 at ignored tokens; ``None`` means "no
gradient", and then none is built. ``consume`` lets a function overwrite a logits buffer the caller
no longer needs (a chunk then costs fewer ``[n, V]`` buffers).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from tune_losses.options import CEOptions, KDOptions

NEG_INF = float("-inf")


class VocabReducer:
    """Reductions over the vocabulary when this process holds all of it: the identity.

    Attributes:
        vocab: V, the whole vocabulary's size.
        start: first vocabulary column held here (0).
    """

    distributed = False

    def __init__(self, vocab: int, start: int = 0):
        self.vocab = vocab
        self.start = start

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token maxima ``[k, n]`` (or ``[n]``) over the whole vocabulary."""
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token sums ``[k, n]`` over the whole vocabulary."""
        return t

    def finish_dx(self, dx: torch.Tensor) -> None:
        """Complete a hidden-state gradient made from this process's columns (nothing to add here)."""


def _row_max(z: torch.Tensor, red: VocabReducer) -> torch.Tensor:
    """Global row maxima ``[k, n]`` of stacked ``[n, V_r]`` tensors; a row of only -inf logits (every
    entry masked) gets 0 so that the shifted logits stay -inf, not NaN. NaN and +inf are kept."""
    m = red.max(z)
    return m.masked_fill(m == NEG_INF, 0.0)


def _label_index(labels: torch.Tensor, valid: torch.Tensor, width: int, red: VocabReducer):
    """``(index [n, 1], owned [n])``: the label's local column where this process holds it."""
    local = labels - red.start
    owned = valid & (local >= 0) & (local < width)
    return torch.where(owned, local, torch.zeros_like(local)).unsqueeze(-1), owned


def _add_at_label(g: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """``g[i, idx[i]] += amount[i]`` where ``owned[i]`` (the one-hot part of a gradient).

    Eager: a scatter into ``g`` in place (``n`` entries). Under ``torch.compile``: a comparison against
    the column index, which Inductor fuses into the pass that writes ``g`` (a scatter would make it
    store ``g`` first and read it again).
    """
    if torch.compiler.is_compiling():
        cols = torch.arange(g.shape[-1], device=g.device)
        hit = (cols == idx) & owned.unsqueeze(-1)
        return torch.where(hit, g + amount.unsqueeze(-1), g)
    return g.scatter_add_(-1, idx, torch.where(owned, amount, 0.0).unsqueeze(-1))


def _scaled(z: torch.Tensor, t: float, consume: bool) -> torch.Tensor:
    """``z / t`` as a buffer the caller may overwrite (``z`` itself when it may be consumed)."""
    if consume:
        return z.div_(t) if t != 1.0 else z
    return z / t if t != 1.0 else z.clone()


# ------------------------------------------------------------------------------- cross-entropy


def ce_chunk(
    z: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    opts: CEOptions,
    red: VocabReducer,
    weight: Optional[torch.Tensor] = None,
    consume: bool = False,
    student_rows: Optional[dict] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Cross-entropy ``lse(z) - z[y]`` with label smoothing, z-loss and softcap, and its gradient.

    Args:
        z: ``[n, V_r]`` raw logits.
        labels, valid: ``[n]`` class ids and the mask of counted tokens.
        weight: ``[n]`` gradient weight per token, or None for the value only.
        student_rows: a dict to leave ``(max, sum exp)`` of the raw logits in (key ``"raw"``) for
            later terms of the same chunk (not with softcap, whose logits differ).

    Returns:
        ``(loss [n], grad [n, V_r] or None)``; the loss is 0 at ignored tokens.
    """
    s, eps, c = opts.softcap, opts.label_smoothing, opts.z_loss
    if s is not None:
        z = (z if consume else z.clone()).div_(s).tanh_().mul_(s)
        consume = True
    idx, owned = _label_index(labels, valid, z.shape[1], red)
    stats = [torch.where(owned, z.gather(-1, idx).squeeze(-1), 0.0)]
    if eps > 0:
        stats.append(z.sum(-1))
    # softcap's chain rule needs tanh = z / s, read before z is overwritten by the softmax.
    dcap = 1 - (z / s).square() if weight is not None and s is not None else None
    m = _row_max(z.amax(-1), red)
    e = (z.sub_(m.unsqueeze(-1)) if consume else z - m.unsqueeze(-1)).exp_()
    stats.insert(0, e.sum(-1))
    r = red.sum(torch.stack(stats))
    sumexp = r[0]
    if student_rows is not None and s is None:
        student_rows.setdefault("raw", (m, sumexp))
    lse = m + sumexp.log()
    loss = lse - r[1]
    if eps > 0:
        loss = (1 - eps) * loss + eps * (lse - r[2] / red.vocab)
    if c > 0:
        loss = loss + c * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if weight is None:
        return loss, None
    # d/dz = softmax (1 + 2 c lse) - (1 - eps) onehot - eps / V, times the token's weight; the
    # softmax normalization, the z-loss factor and the weight are one per-row scale: one pass.
    row = weight / sumexp
    if c > 0:
        row = row * (1 + 2 * c * lse)
    if torch.compiler.is_compiling() and not consume:
        # Compiled: exp again in the gradient's pass rather than store e between the reduction and
        # that pass (Inductor would keep a [n, V] buffer for it, and a divergence term of the same
        # chunk shares this exp(z - max) there).
        e = (z - m.unsqueeze(-1)).exp()
    g = _add_at_label(e.mul_(row.unsqueeze(-1)), idx, owned, -(1 - eps) * weight)
    if eps > 0:
        g.sub_((eps / red.vocab) * weight.unsqueeze(-1))
    if dcap is not None:
        g.mul_(dcap)
    return loss, g


# ---------------------------------------------------------------------------- log-probabilities


def log_prob_chunk(
    z: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    red: VocabReducer,
    entropy: bool = False,
    weights: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
    consume: bool = False,
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """``log q[y]`` with ``q = softmax(z / T)`` and, optionally, the entropy ``H = -sum q log q``.

    Gradients (``z' = z / T``): ``d log q[y] / dz'_j = onehot_j - q_j`` and
    ``dH / dz'_j = -q_j (log q_j + H)``; both divided by T for the raw logits.

    Args:
        z: ``[n, V_r]`` raw logits.
        weights: ``(weight of log q[y], weight of H)``, each ``[n]`` or None; None for no gradient.

    Returns:
        ``([log_probs [n], entropy [n] if asked], grad [n, V_r] or None)``; 0 at ignored tokens.
    """
    zz = _scaled(z, temperature, consume)
    idx, owned = _label_index(labels, valid, zz.shape[1], red)
    m = _row_max(zz.amax(-1), red)
    stats = [torch.where(owned, zz.gather(-1, idx).squeeze(-1), 0.0)]
    e = zz.sub_(m.unsqueeze(-1)).exp_()
    stats.insert(0, e.sum(-1))
    if entropy:
        stats.append(torch.special.xlogy(e, e).sum(-1))  # sum e log e, 0 log 0 = 0 at masked entries
    r = red.sum(torch.stack(stats))
    log_sum = r[0].log()
    outs = [torch.where(valid, r[1] - m - log_sum, 0.0)]
    h = None
    if entropy:
        h = log_sum - r[2] / r[0]
        outs.append(torch.where(valid, h, 0.0))
    if weights is None or all(w is None for w in weights):
        return outs, None
    w_lp, w_h = weights[0], (weights[1] if entropy else None)
    q = e.div_(r[0].unsqueeze(-1))
    row = torch.zeros_like(r[0])
    if w_lp is not None:
        row = row - w_lp
    if w_h is not None:
        row = row - w_h * h
        g = torch.special.xlogy(q, q).mul_(-w_h.unsqueeze(-1)).add_(q.mul_(row.unsqueeze(-1)))
    else:
        g = q.mul_(row.unsqueeze(-1))
    if w_lp is not None:
        g = _add_at_label(g, idx, owned, w_lp)
    if temperature != 1.0:
        g.div_(temperature)
    return outs, g


# --------------------------------------------------------------------------------- divergences


def _log_softmax_pair(zs, zt, t: float, red: VocabReducer, consume_s: bool, consume_t: bool):
    """Student and teacher ``log softmax(z / T)`` over the whole vocabulary (one MAX, one SUM)."""
    ls, lt = _scaled(zs, t, consume_s), _scaled(zt, t, consume_t)
    m = _row_max(torch.stack([ls.amax(-1), lt.amax(-1)]), red)
    # (z - max) - log(sum): as log_softmax rounds, not z - (max + log(sum)).
    ls, lt = ls.sub_(m[0].unsqueeze(-1)), lt.sub_(m[1].unsqueeze(-1))
    log_sums = red.sum(torch.stack([ls.exp().sum(-1), lt.exp().sum(-1)])).log()
    return ls.sub_(log_sums[0].unsqueeze(-1)), lt.sub_(log_sums[1].unsqueeze(-1))


def divergence_terms(log_p: torch.Tensor, log_q: torch.Tensor, opts: KDOptions, need_a: bool, need_b: bool = False):
    """Elementwise terms of a divergence and ``a = dterms / dlog q``, over this slice of the vocabulary.

    ``divergence = loss_scale * sum_v terms``; entries where either side's logit is -inf count as 0
    (as torchtune does; per side for JSD, whose mixture is finite where one side is).

    Args:
        log_p, log_q: ``[n, V_r]`` teacher / student log-probabilities (normalized over the whole
            vocabulary, temperature applied).

        need_b: also return ``b = dterms / dlog p`` (a teacher that requires grad, chunked-output
            losses only): ``b`` is ``terms`` for forward KL, ``-q`` for reverse KL, ``beta p (log p -
            log m)`` for JSD, ``sign(p - q) p / 2`` for TVD (up to ``c p``, which drops out).

    Returns:
        ``(terms [n, V_r], a [n, V_r] or None, q [n, V_r])``, with ``(b, p)`` appended if ``need_b``.
    """
    neg_p, neg_q = log_p == NEG_INF, log_q == NEG_INF
    p = log_p.exp()
    d = opts.divergence
    # Forward KL alone (the usual distillation loss) overwrites its inputs: log p becomes the terms,
    # p becomes a, log q becomes q (three [n, V_r] buffers); the other divergences keep them.
    alone = (d == "forward_kl" or (d == "jsd" and opts.beta == 0.0)) and not need_b

    def forward_kl():
        mask = neg_p | neg_q
        if opts.true_kl:
            terms = log_p.sub_(log_q) if alone else log_p - log_q
        else:
            terms = log_q.neg()
        terms = terms.mul_(p).masked_fill_(mask, 0.0)
        if not need_a:
            return terms, None
        return terms, (p.neg_() if alone else p.neg()).masked_fill_(mask, 0.0)

    if alone:
        terms, a = forward_kl()
        return terms, a, log_q.exp_()
    q = log_q.exp()

    def reverse_kl():
        mask = neg_p | neg_q
        terms = (log_q - log_p).masked_fill_(mask, 0.0).mul_(q)
        # a = q (log q - log p + 1); its q part drops out of a - q sum(a) (sum q = 1), so a = terms,
        # which also avoids the cancellation of q (r + 1) - q (RKL + 1) in fp32.
        return terms, (terms if need_a else None)

    b = None

    def jsd(beta: float):
        nonlocal b
        if beta == 0.0:
            return forward_kl()
        if beta == 1.0:
            return reverse_kl()
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        kp = (log_p - log_m).mul_(p).masked_fill_(neg_p, 0.0)
        kq = (log_q - log_m).mul_(q).masked_fill_(neg_q, 0.0)
        del log_m
        a = kq.mul(1 - beta) if need_a else None
        b = kp.mul(beta) if need_b else None
        return kp.mul_(beta).add_(kq, alpha=1 - beta), a

    def tvd():
        nonlocal b
        diff = q - p
        a = diff.sign().mul_(q).mul_(0.5) if need_a else None
        b = diff.sign().mul_(p).mul_(-0.5) if need_b else None
        return diff.abs_().mul_(0.5), a

    def rkl_b():
        return q.neg().masked_fill_(neg_p | neg_q, 0.0)

    if d == "forward_kl":
        terms, a = forward_kl()
        b = terms.clone() if need_b else None
    elif d == "reverse_kl":
        terms, a = reverse_kl()
        b = rkl_b() if need_b else None
    elif d == "symmetric_kl":
        r = opts.sym_kd_ratio
        tf, af = forward_kl()
        tr, ar = reverse_kl()
        b = tf.mul(r).add_(rkl_b(), alpha=1 - r) if need_b else None
        terms = tf.mul_(r).add_(tr, alpha=1 - r)
        a = af.mul_(r).add_(ar, alpha=1 - r) if need_a else None
    elif d == "jsd":
        terms, a = jsd(opts.beta)
        if need_b and opts.beta in (0.0, 1.0):
            b = terms.clone() if opts.beta == 0.0 else rkl_b()
    else:
        terms, a = tvd()
    return (terms, a, q, b, p) if need_b else (terms, a, q)


def kd_chunk(
    zs: torch.Tensor,
    zt: torch.Tensor,
    opts: KDOptions,
    red: VocabReducer,
    weight: Optional[torch.Tensor] = None,
    consume_student: bool = False,
    consume_teacher: bool = False,
    teacher_weight: Optional[torch.Tensor] = None,
    student_rows: Optional[dict] = None,
):
    """A distillation divergence of teacher ``p = softmax(zt / T)`` and student ``q = softmax(zs / T)``.

    Args:
        zs, zt: ``[n, V_r]`` raw student / teacher logits.
        weight: ``[n]`` gradient weight per token, or None for the value only.
        teacher_weight: ``[n]``: also return the gradient w.r.t. ``zt`` (a teacher that requires
            grad, chunked-output losses only), as a third result.

    Returns:
        ``(divergence [n] times loss_scale (no ignore mask), grad [n, V_r] w.r.t. zs or None)``.
    """
    t = opts.temperature
    if teacher_weight is None and (opts.divergence == "forward_kl" or (opts.divergence == "jsd" and opts.beta == 0.0)):
        shared = student_rows.get("raw") if student_rows and t == 1.0 else None
        return _forward_kl_from_rows(zs, zt, opts, red, weight, consume_student, consume_teacher, shared)
    log_q, log_p = _log_softmax_pair(zs, zt, t, red, consume_student, consume_teacher)
    need, need_b = weight is not None, teacher_weight is not None
    terms, a, q, *bp = divergence_terms(log_p, log_q, opts, need, need_b)
    del log_q, log_p
    stats = [terms.sum(-1)] + ([a.sum(-1)] if need else []) + ([bp[0].sum(-1)] if need_b else [])
    del terms
    r = red.sum(torch.stack(stats))
    value = r[0] * opts.loss_scale if opts.loss_scale != 1.0 else r[0]
    g = None
    if need:
        g = a.sub_(q.mul_(r[1].unsqueeze(-1)))
        g = g.mul_((weight * (opts.loss_scale / t)).unsqueeze(-1))
    if not need_b:
        return value, g
    b, p = bp
    gt = b.sub_(p.mul_(r[-1].unsqueeze(-1))).mul_((teacher_weight * (opts.loss_scale / t)).unsqueeze(-1))
    return value, g, gt


def _forward_kl_from_rows(
    zs, zt, opts: KDOptions, red: VocabReducer, weight, consume_student: bool, consume_teacher: bool, student_stats=None
):
    """Forward KL (or torchtune's ``-sum p log q``) from per-token statistics of the shifted logits.

    With ``s = zs / T - max``, ``t = zt / T - max``, ``S_q = sum e^s``, ``S_p = sum e^t`` and ``u`` the
    entries where neither side is -inf (the rest count 0, as in :func:`divergence_terms`):

    * ``KL = (sum_u e^t (t - s)) / S_p + (log S_q - log S_p) P_u``, with ``P_u = sum_u e^t / S_p``;
    * torchtune's ``-sum_u p log q = -(sum_u e^t s) / S_p + P_u log S_q``;
    * gradient w.r.t. ``zs``: ``(q P_u - p_u) / T`` with ``q = e^s / S_q``, ``p_u = e^t / S_p`` on ``u``.

    The value is the same quantity :func:`divergence_terms` sums, but no ``[n, V_r]`` log-probability
    is kept: the gradient is one expression of the two logit buffers and four numbers per token,
    which a compiler fuses into one pass (eager: it is written over the two buffers in place).
    Same arguments and results as :func:`kd_chunk` without a teacher gradient; ``student_stats``:
    the student's ``(max [n], sum exp [n])`` when another term of the chunk has computed them (T = 1), so
    both terms' gradients share one ``exp(zs - max)``.
    """
    t = opts.temperature
    ls, lt = _scaled(zs, t, consume_student), _scaled(zt, t, consume_teacher)
    if student_stats is None:
        m_s, m_t = _row_max(torch.stack([ls.amax(-1), lt.amax(-1)]), red)
    else:
        m_s, m_t = student_stats[0], _row_max(lt.amax(-1), red)
    ls, lt = ls.sub_(m_s.unsqueeze(-1)), lt.sub_(m_t.unsqueeze(-1))
    masked = (ls == NEG_INF) | (lt == NEG_INF)
    e_t = lt.exp()
    stats = [e_t.sum(-1)]
    e_t = e_t.masked_fill_(masked, 0.0)
    stats.append(e_t.sum(-1))
    log_ratio = (lt - ls) if opts.true_kl else ls.neg()
    stats.append(e_t.mul_(log_ratio).masked_fill_(masked, 0.0).sum(-1))
    del e_t, log_ratio
    if student_stats is None:
        stats.append(ls.exp().sum(-1))
    sums = red.sum(torch.stack(stats))
    sum_p, sum_u, cross = sums[0], sums[1], sums[2]
    sum_q = sums[3] if student_stats is None else student_stats[1]
    share_u = sum_u / sum_p  # P_u: the teacher's probability outside the masked entries
    log_sum_q = sum_q.log()
    rest = (log_sum_q - sum_p.log()) if opts.true_kl else log_sum_q
    # A token whose every entry is masked has P_u = 0 and divergence 0 (not 0 * inf).
    value = torch.where(sum_u == 0, 0.0, cross / sum_p + rest * share_u)
    if opts.loss_scale != 1.0:
        value = value * opts.loss_scale
    if weight is None:
        return value, None
    w = weight * (opts.loss_scale / t)
    q_part = (w * share_u / sum_q).unsqueeze(-1)
    p_part = (w / sum_p).unsqueeze(-1)
    g = ls.exp_().mul_(q_part).sub_(lt.exp_().masked_fill_(masked, 0.0).mul_(p_part))
    return value, g
