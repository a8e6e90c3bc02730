"""Per-chunk loss math on fp32, knowing nothing of modules, chunk lists or reductions.

Every function takes one chunk of flattened logits ``[n, V]`` (any float dtype; upcast here) and
returns per-token values ``[n]``. Masking ignored tokens and summing is the caller's job, so the same
math serves the chunked-output classes, the fused linear losses and the tests' references.

Notation (per token, over the vocabulary): p = teacher distribution, q = student distribution.
"""

from __future__ import annotations

import math

from typing import Optional, Tuple

import torch

from tune_losses.options import CEOptions, KDOptions


def _softcap(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, opts: CEOptions = CEOptions()) -> torch.Tensor:
    """Token-level cross-entropy with optional label smoothing, z-loss and softcap.

    Args:
        logits: ``[n, V]`` raw logits of one chunk.
        labels: ``[n]`` class ids; ``opts.ignore_index`` marks tokens left out.
        opts: see :class:`CEOptions`.

    Returns:
        ``[n]`` fp32 per-token loss, exactly 0 (with 0 gradient) at ignored tokens.
    """
    z = _softcap(logits.float(), opts.softcap)
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if opts.label_smoothing > 0:
        eps = opts.label_smoothing
        loss = (1 - eps) * loss + eps * (lse - z.mean(dim=-1))
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss))


def cross_entropy_with_grad(
    logits: torch.Tensor, labels: torch.Tensor, opts: CEOptions = CEOptions()
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and its gradient with respect to the raw logits, in closed form.

    The gradient is written into ``logits`` in place when it is already an fp32 tensor that
    nothing else needs (the fused losses hand over their fresh chunk buffer), so a chunk costs one
    ``[n, V]`` fp32 buffer, not three.

    Args:
        logits: ``[n, V]`` raw logits (a fresh buffer the caller gives up).
        labels: ``[n]`` class ids.

    Returns:
        ``(loss [n], grad [n, V])``: fp32; both are 0 at ignored tokens. ``grad`` is
        d loss_i / d logits_i for a unit weight per token.
    """
    z = logits if logits.dtype == torch.float32 else logits.float()
    n, vocab = z.shape
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    if opts.softcap is not None:
        z = _softcap(z, opts.softcap) if z is not logits else z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    z_y = z.gather(-1, safe).squeeze(-1)
    mean_z = z.mean(dim=-1) if opts.label_smoothing > 0 else None
    # softcap's chain rule needs tanh = z / s, read before z is overwritten by the softmax.
    dcap = None if opts.softcap is None else 1 - (z / opts.softcap).square()
    # One exp pass serves both the logsumexp and the softmax (torch.logsumexp would make its own
    # [n, V] temporary and a second exp pass): z <- exp(z - max), lse = max + log(sum), softmax = z / sum.
    zmax = z.amax(dim=-1, keepdim=True)
    g = z.sub_(zmax).exp_()
    sumexp = g.sum(dim=-1, keepdim=True)
    lse = (zmax + sumexp.log()).squeeze(-1)
    loss = lse - z_y
    if opts.label_smoothing > 0:
        eps = opts.label_smoothing
        loss = (1 - eps) * loss + eps * (lse - mean_z)
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse.square()
    # d/dz: softmax * (1 + 2 c lse) - (1 - eps) onehot - eps / V, all zero at ignored tokens. The
    # softmax normalization, the z-loss factor and the ignore mask are one per-row scale: one pass.
    row = valid.unsqueeze(-1) / sumexp
    if opts.z_loss > 0:
        row = row * (1 + 2 * opts.z_loss * lse).unsqueeze(-1)
    g.mul_(row)
    onehot = -(1 - opts.label_smoothing) * valid.to(g.dtype)
    g.scatter_add_(-1, safe, onehot.unsqueeze(-1))
    if opts.label_smoothing > 0:
        g.sub_((opts.label_smoothing / vocab) * valid.unsqueeze(-1))
    if dcap is not None:
        g.mul_(dcap)
    return torch.where(valid, loss, torch.zeros_like(loss)), g


def _masked_log_softmax(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_softmax with -inf replaced by 0, probabilities, mask of infinite logits)``.

    Logits of -inf mark vocabulary entries a model masks out; their terms are taken as 0 (as
    torchtune does) and the log-probabilities are made finite so no 0 * inf reaches autograd.
    """
    inf = torch.isinf(z)
    logp = torch.log_softmax(z, dim=-1)
    prob = logp.exp()
    return logp.masked_fill(inf, 0.0), prob, inf


def kd_terms(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    opts: KDOptions,
    inf_p: Optional[torch.Tensor] = None,
    inf_q: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Elementwise terms of a divergence: ``kd_divergence = kd_terms(...).sum(-1) * loss_scale``.

    Every divergence here is a sum over the vocabulary of a function of ``(log p_v, log q_v)``, so
    the terms of a slice of the vocabulary sum to that slice's share of the divergence: the
    vocabulary-parallel losses (:mod:`tune_losses.fused.vocab_parallel`) add the per-rank partial
    sums with one all-reduce.

    Args:
        log_p, log_q: ``[n, V']`` teacher / student log-probabilities (already temperature-scaled
            and normalized over the *whole* vocabulary), with entries of infinite logits set to 0.
        p, q: ``[n, V']`` their probabilities (0 at those entries).
        inf_p, inf_q: ``[n, V']`` bool masks of the teacher's / student's infinite logits (vocabulary
            entries a model masks out; their terms count as 0, as in torchtune), or None for none.

    Returns:
        ``[n, V']`` fp32 terms, before the temperature scale ``opts.loss_scale``.
    """

    def masked(t: torch.Tensor, *masks: Optional[torch.Tensor]) -> torch.Tensor:
        mask = None
        for m in masks:
            if m is not None:
                mask = m if mask is None else mask | m
        return t if mask is None else t.masked_fill(mask, 0.0)

    def forward_kl(true_kl: bool) -> torch.Tensor:
        # torchtune zeroes the terms where the student's logit is infinite; so do we.
        cross = masked(p * log_q, inf_q)
        if not true_kl:
            return -cross
        return masked(p * log_p, inf_q) - cross

    def reverse_kl() -> torch.Tensor:
        return masked(q * (log_q - log_p), inf_q, inf_p)

    def jsd() -> torch.Tensor:
        beta = opts.beta
        if beta == 0.0:
            return forward_kl(True)
        if beta == 1.0:
            return reverse_kl()
        # log m = logaddexp(log p + log beta, log q + log(1 - beta)), from the unmasked log-probs.
        a = (log_p if inf_p is None else log_p.masked_fill(inf_p, -math.inf)) + math.log(beta)
        b = (log_q if inf_q is None else log_q.masked_fill(inf_q, -math.inf)) + math.log(1 - beta)
        # Fix: where both sides are -inf (a masked vocabulary entry), logaddexp's backward is
        # exp(-inf - (-inf)) = NaN, and masking its output afterwards does not stop that NaN
        # (0 * NaN). Feed it finite stand-ins there and mask the result.
        both = torch.isinf(a) & torch.isinf(b)
        log_m = torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)).masked_fill(both, 0.0)
        kl_p = masked(p * (log_p - log_m), inf_p)
        kl_q = masked(q * (log_q - log_m), inf_q)
        return beta * kl_p + (1 - beta) * kl_q

    def tvd() -> torch.Tensor:
        return 0.5 * (p - q).abs()

    if opts.divergence == "forward_kl":
        return forward_kl(opts.true_kl)
    if opts.divergence == "reverse_kl":
        return reverse_kl()
    if opts.divergence == "symmetric_kl":
        r = opts.sym_kd_ratio
        return r * forward_kl(opts.true_kl) + (1 - r) * reverse_kl()
    if opts.divergence == "jsd":
        return jsd()
    return tvd()


def kd_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, opts: KDOptions = KDOptions()
) -> torch.Tensor:
    """Distillation divergence between teacher and student, per token.

    Args:
        student_logits: ``[n, V]`` student logits (q).
        teacher_logits: ``[n, V]`` teacher logits (p).
        opts: divergence, temperature (both sides divided by T, result times T^2 if enabled), ...

    Returns:
        ``[n]`` fp32 divergence per token (no ignore mask applied).
    """
    t = opts.temperature
    zs = student_logits.float()
    zt = teacher_logits.float()
    if t != 1.0:
        zs, zt = zs / t, zt / t
    log_q, q, inf_s = _masked_log_softmax(zs)
    log_p, p, inf_t = _masked_log_softmax(zt)
    out = kd_terms(log_p, log_q, p, q, opts, inf_t, inf_s).sum(-1)
    return out * opts.loss_scale if opts.loss_scale != 1.0 else out


def kd_divergence_with_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, opts: KDOptions, need_grad: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Divergence per token and its gradient with respect to the raw student logits.

    Used by the fused losses on fresh fp32 chunk buffers, which it may overwrite. Forward KL (the
    usual distillation loss) has a closed form using three ``[n, V]`` buffers; the other divergences
    differentiate :func:`kd_divergence` with autograd on the chunk.

    Args:
        student_logits: ``[n, V]`` fp32 raw student logits (buffer given up by the caller).
        teacher_logits: ``[n, V]`` fp32 raw teacher logits (buffer given up by the caller).
        need_grad: False skips the gradient (returns None for it).

    Returns:
        ``(divergence [n], grad [n, V] or None)`` for a unit weight per token, fp32.
    """
    if opts.divergence != "forward_kl" or not student_logits.dtype == teacher_logits.dtype == torch.float32:
        if not need_grad:
            return kd_divergence(student_logits, teacher_logits, opts), None
        with torch.enable_grad():
            zs = student_logits.detach().requires_grad_(True)
            per_token = kd_divergence(zs, teacher_logits, opts)
            (grad,) = torch.autograd.grad(per_token.sum(), zs)
        return per_token.detach(), grad
    # Forward KL, closed form: d/dz_raw [T^2 KL(p || q)] = T (q - p), with z = z_raw / T.
    t = opts.temperature
    log_q = student_logits.div_(t) if t != 1.0 else student_logits
    log_p = teacher_logits.div_(t) if t != 1.0 else teacher_logits
    log_q.sub_(torch.logsumexp(log_q, -1, keepdim=True))
    log_p.sub_(torch.logsumexp(log_p, -1, keepdim=True))
    p = log_p.exp()
    # value: true KL = sum p (log p - log q), or torchtune's cross-entropy -sum p log q.
    diff = log_p.sub_(log_q) if opts.true_kl else log_p.copy_(log_q).neg_()
    per_token = torch.nan_to_num(diff.mul_(p), nan=0.0).sum(-1) * opts.loss_scale
    if not need_grad:
        return per_token, None
    grad = log_q.exp_().sub_(p).mul_(opts.loss_scale / t)
    return per_token, grad
