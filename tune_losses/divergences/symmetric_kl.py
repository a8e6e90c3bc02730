"""Symmetric KL ``r * FKL + (1 - r) * RKL`` (torchtune's ``sym_kd_ratio`` r; FKL as ``true_kl`` says)."""

from __future__ import annotations

from tune_losses.divergences.base import Divergence
from tune_losses.divergences.forward_kl import ForwardKL
from tune_losses.divergences.reverse_kl import ReverseKL

_FORWARD, _REVERSE = ForwardKL(), ReverseKL()


class SymmetricKL(Divergence):
    """``r * forward_kl + (1 - r) * reverse_kl``; each part's closed form, mixed by ``r``."""

    name = "symmetric_kl"
    chunked_name = "SymmetricKL"
    options = ("sym_kd_ratio", "true_kl")
    chunked_defaults = {"true_kl": False}  # torchtune's logged value by default (drop-in)
    torchtune_args = ("sym_kd_ratio",)

    def value(self, log_p, log_q, opts):
        r = opts.sym_kd_ratio
        return r * _FORWARD.value(log_p, log_q, opts) + (1 - r) * _REVERSE.value(log_p, log_q, opts)

    def closed_form(self, log_p, log_q, p, q, opts, need_a, need_b):
        r = opts.sym_kd_ratio
        tf, af, bf = _FORWARD.closed_form(log_p, log_q, p, q, opts, need_a, need_b)
        tr, ar, br = _REVERSE.closed_form(log_p, log_q, p, q, opts, need_a, need_b)
        b = bf.mul_(r).add_(br, alpha=1 - r) if need_b else None
        a = af.mul_(r).add_(ar, alpha=1 - r) if need_a else None  # ar may be tr: read it before tr changes
        return tf.mul_(r).add_(tr, alpha=1 - r), a, b
