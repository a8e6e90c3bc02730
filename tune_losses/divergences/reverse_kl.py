"""Reverse KL ``KL(q || p) = sum q (log q - log p)``.

``a = dD / dlog q = q (log q - log p + 1)``; its ``q`` part drops out of ``a - q sum(a)``
(``sum q = 1``), so ``a = terms``, which also avoids the cancellation of ``q (r + 1) - q (RKL + 1)``
in fp32. ``b = dD / dlog p = -q``.
"""

from __future__ import annotations

from tune_losses.divergences.base import Divergence
from tune_losses.divergences.common import NEG_INF


class ReverseKL(Divergence):
    """``sum q (log q - log p)``; closed form ``a = terms``, ``b = -q``."""

    name = "reverse_kl"
    chunked_name = "ReverseKL"

    def value(self, log_p, log_q, opts):
        return log_q.exp() * (log_q - log_p)

    def closed_form(self, log_p, log_q, p, q, opts, need_a, need_b):
        mask = (log_p == NEG_INF) | (log_q == NEG_INF)
        terms = (log_q - log_p).masked_fill_(mask, 0.0).mul_(q)
        b = q.neg().masked_fill_(mask, 0.0) if need_b else None
        return terms, (terms if need_a else None), b
