"""Forward KL ``KL(p || q) = sum p (log p - log q)``, or torchtune's logged ``-sum p log q``.

``true_kl`` (:class:`~tune_losses.options.KDOptions`) picks the value; the gradient with respect to
the student is the same: ``a = dD / dlog q = -p``, so ``dD / dz = (q P - p) / T`` (``P`` the
teacher's probability outside masked entries). The fused path (:meth:`ForwardKL.from_logits`) keeps
no ``[n, V]`` log-probability: four per-token sums and one expression of the two logit buffers.
"""

from __future__ import annotations

import torch

from tune_losses.divergences.base import Divergence
from tune_losses.divergences.common import NEG_INF, VocabReducer, row_max, scaled
from tune_losses.options import KDOptions


class ForwardKL(Divergence):
    """``sum p (log p - log q)`` (``true_kl``) or ``-sum p log q``; closed form ``a = -p``, ``b = terms``."""

    name = "forward_kl"
    chunked_name = "ForwardKL"
    options = ("true_kl",)
    chunked_defaults = {"true_kl": False}  # torchtune's logged value by default (drop-in)

    def value(self, log_p, log_q, opts):
        return log_p.exp() * ((log_p - log_q) if opts.true_kl else -log_q)

    def closed_form(self, log_p, log_q, p, q, opts, need_a, need_b):
        mask = (log_p == NEG_INF) | (log_q == NEG_INF)
        terms = (log_p - log_q) if opts.true_kl else log_q.neg()
        terms = terms.mul_(p).masked_fill_(mask, 0.0)
        a = p.neg().masked_fill_(mask, 0.0) if need_a else None
        return terms, a, (terms.clone() if need_b else None)

    def from_logits(self, zs, zt, opts, red, weight, consume_s, consume_t, shared):
        return forward_kl_from_rows(zs, zt, opts, red, weight, consume_s, consume_t, shared)


def forward_kl_from_rows(
    zs, zt, opts: KDOptions, red: VocabReducer, weight, consume_student: bool, consume_teacher: bool, student_stats=None
):
    """Forward KL (or torchtune's ``-sum p log q``) from per-token statistics of the shifted logits.

    With ``s = zs / T - max``, ``t = zt / T - max``, ``S_q = sum e^s``, ``S_p = sum e^t`` and ``u`` the
    entries where neither side is -inf (the rest count 0, as in :meth:`ForwardKL.closed_form`):

    * ``KL = (sum_u e^t (t - s)) / S_p + (log S_q - log S_p) P_u``, with ``P_u = sum_u e^t / S_p``;
    * torchtune's ``-sum_u p log q = -(sum_u e^t s) / S_p + P_u log S_q``;
    * gradient w.r.t. ``zs``: ``(q P_u - p_u) / T`` with ``q = e^s / S_q``, ``p_u = e^t / S_p`` on ``u``.

    The value is the same quantity :meth:`ForwardKL.closed_form` sums, but no ``[n, V_r]`` log-probability
    is kept: the gradient is one expression of the two logit buffers and four numbers per token,
    which a compiler fuses into one pass (eager: it is written over the two buffers in place).
    Same arguments and results as :func:`kd_chunk` without a teacher gradient; ``student_stats``:
    the student's ``(max [n], sum exp [n])`` when another term of the chunk has computed them (T = 1), so
    both terms' gradients share one ``exp(zs - max)``.
    """
    t = opts.temperature
    ls, lt = scaled(zs, t, consume_student), scaled(zt, t, consume_teacher)
    if student_stats is None:
        m_s, m_t = row_max(torch.stack([ls.amax(-1), lt.amax(-1)]), red)
    else:
        m_s, m_t = student_stats[0], row_max(lt.amax(-1), red)
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
