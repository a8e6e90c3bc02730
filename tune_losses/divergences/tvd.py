"""Total variation distance ``0.5 sum |p - q|``: ``a = sign(q - p) q / 2``, ``b = sign(p - q) p / 2``."""

from __future__ import annotations

from tune_losses.divergences.base import Divergence


class TVD(Divergence):
    """``0.5 sum |p - q|``; closed form."""

    name = "tvd"
    chunked_name = "TVD"

    def value(self, log_p, log_q, opts):
        return 0.5 * (log_q.exp() - log_p.exp()).abs()

    def closed_form(self, log_p, log_q, p, q, opts, need_a, need_b):
        diff = q - p
        a = diff.sign().mul_(q).mul_(0.5) if need_a else None
        b = diff.sign().mul_(p).mul_(-0.5) if need_b else None
        return diff.abs_().mul_(0.5), a, b
