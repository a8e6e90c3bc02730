"""Generalized Jensen-Shannon divergence JSD(beta) = ``beta KL(p || m) + (1 - beta) KL(q || m)``,
``m = beta p + (1 - beta) q``.

``a = dD / dlog q = (1 - beta) q (log q - log m)`` and ``b = beta p (log p - log m)`` (the terms through
``log m`` cancel). beta = 0 and beta = 1 are taken as the limits TRL and Liger use, forward KL and
reverse KL (the unscaled formula is identically 0 there), so they never divide by 0 or take log 0.
Entries count 0 per side where that side's logit is -inf (the mixture is finite where one side is).
"""

from __future__ import annotations

import math

import torch

from tune_losses.divergences.base import Divergence
from tune_losses.divergences.common import NEG_INF
from tune_losses.divergences.forward_kl import ForwardKL
from tune_losses.divergences.reverse_kl import ReverseKL

_FORWARD, _REVERSE = ForwardKL(), ReverseKL()


class JSD(Divergence):
    """JSD(beta) (``KDOptions.beta``); closed form; forward / reverse KL at beta 0 / 1."""

    name = "jsd"
    chunked_name = "JSD"
    options = ("beta",)
    torchtune_args = ("beta",)

    def value(self, log_p, log_q, opts):
        beta = opts.beta
        if beta == 0.0:
            return _FORWARD.value(log_p, log_q, opts)
        if beta == 1.0:
            return _REVERSE.value(log_p, log_q, opts)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)

    def closed_form(self, log_p, log_q, p, q, opts, need_a, need_b):
        beta = opts.beta
        if beta == 0.0:
            return _FORWARD.closed_form(log_p, log_q, p, q, opts, need_a, need_b)
        if beta == 1.0:
            return _REVERSE.closed_form(log_p, log_q, p, q, opts, need_a, need_b)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        kp = (log_p - log_m).mul_(p).masked_fill_(log_p == NEG_INF, 0.0)
        kq = (log_q - log_m).mul_(q).masked_fill_(log_q == NEG_INF, 0.0)
        del log_m
        a = kq.mul(1 - beta) if need_a else None
        b = kp.mul(beta) if need_b else None
        return kp.mul_(beta).add_(kq, alpha=1 - beta), a, b

    def from_logits(self, zs, zt, opts, red, weight, consume_s, consume_t, shared):
        if opts.beta == 0.0:
            return _FORWARD.from_logits(zs, zt, opts, red, weight, consume_s, consume_t, shared)
        return None
