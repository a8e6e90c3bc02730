"""The Triton source of :mod:`tune_losses.kernels.triton_terms` (imported only where Triton is).

Left undecorated, as :mod:`tune_losses.kernels.triton_ce_source` (``triton.jit`` is applied per
``TRITON_INTERPRET`` setting). One program per token row; every sweep reads the row's logits in
blocks of ``BLOCK`` columns from memory and keeps per-token sums in fp32 registers.

Online sums: with a running maximum ``m`` and ``S = sum e^(x - m)``, a sum ``sum e^(x - m) f(x)`` is
rescaled by ``e^(m - m_new)`` when a block raises the maximum; the entropy's
``A = sum e^(x - m) (x - m)`` also gains ``(m - m_new) S`` (its factor ``x - m`` moves with ``m``).
"""

import triton.language as tl

from tune_losses.kernels.triton_common import (
    ce_block,
    ce_grad,
    ce_softmax_weight,
    ce_value,
    load_block,
    log_mixture,
    log_softmax_pair,
    logsumexp,
    online_max,
    row_start,
    softcapped,
    store_grad,
    unmasked_sums,
)


def logprob_kernel(
    z_ptr,
    stride,
    labels_ptr,
    w_lp_ptr,
    w_h_ptr,
    lp_ptr,
    h_ptr,
    lse_ptr,
    V,
    ignore_index,
    inv_t,
    HAS_ENTROPY: tl.constexpr,
    FROM_LSE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_W_LP: tl.constexpr,
    HAS_W_H: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``log q[y]`` and the entropy ``H`` of ``q = softmax(z / T)`` for one token row (two sweeps with
    a gradient); FROM_LSE: the gradient sweep alone, from the logsumexp (and entropy) an earlier
    call stored."""
    row, base, label, valid = row_start(z_ptr, stride, labels_ptr, ignore_index)
    if FROM_LSE:
        lse = tl.load(lse_ptr + row)
        h = 0.0
        if HAS_W_H:
            h = tl.load(h_ptr + row)
    else:
        m = float("-inf")
        s = 0.0
        a = 0.0  # sum e^(x - m) (x - m), for the entropy
        x_y = 0.0
        bad = 0.0  # NaN or +inf logits: the token's values become NaN
        for off in range(0, V, BLOCK):
            cols, inside, x = load_block(base, off, V, BLOCK)
            x = x * inv_t
            bad += tl.sum(tl.where((x != x) | (x == float("inf")), 1.0, 0.0))
            x_y += tl.sum(tl.where(cols == label, x, 0.0))
            m_new, shift, rescale, e = online_max(m, x)
            if HAS_ENTROPY:
                moved = tl.where(s > 0.0, (m - shift) * s, 0.0)
                a = rescale * (a + moved) + tl.sum(tl.where(e > 0.0, e * (x - shift), 0.0))
            s = s * rescale + tl.sum(e)
            m = m_new
        log_s = tl.log(s)
        lse = tl.where(m == float("-inf"), 0.0, m) + log_s  # logsumexp(m, s), log s kept for H
        lse = tl.where(bad > 0, float("nan"), lse)
        tl.store(lse_ptr + row, lse)
        tl.store(lp_ptr + row, tl.where(valid, x_y - lse, 0.0))
        h = 0.0
        if HAS_ENTROPY:
            h = tl.where(bad > 0, float("nan"), log_s - a / s)
            tl.store(h_ptr + row, tl.where(valid, h, 0.0))
    if HAS_GRAD:
        # d log q[y] / dx_j = onehot_j - q_j;  dH / dx_j = -q_j (log q_j + H);  x = z / T.
        w_lp = 0.0
        w_h = 0.0
        if HAS_W_LP:
            w_lp = tl.load(w_lp_ptr + row).to(tl.float32)
        if HAS_W_H:
            w_h = tl.load(w_h_ptr + row).to(tl.float32)
        row_scale = -w_lp
        if HAS_W_H:
            row_scale -= w_h * h
        for off in range(0, V, BLOCK):
            cols, inside, x = load_block(base, off, V, BLOCK)
            x = x * inv_t
            q = tl.exp(x - lse)
            g = q * row_scale
            if HAS_W_H:
                g -= w_h * tl.where(q > 0.0, q * (x - lse), 0.0)  # q log q, 0 at masked entries
            if HAS_W_LP:
                g += tl.where(cols == label, w_lp, 0.0)
            store_grad(base, cols, inside, g * inv_t, valid, ROUND_BF16)


def divergence_kernel(
    zs_ptr,
    zt_ptr,
    stride_s,
    stride_t,
    labels_ptr,
    w_ce_ptr,
    w_kd_ptr,
    ce_ptr,
    kd_ptr,
    V,
    ignore_index,
    inv_t,
    loss_scale,
    mix,
    log_beta,
    log_1m_beta,
    eps,
    z_loss,
    softcap,
    DIV: tl.constexpr,
    ONLINE_FKL: tl.constexpr,
    ONLINE_RKL: tl.constexpr,
    VALUE_SWEEP: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_OWN_STATS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    TRUE_KL: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """A divergence of ``p = softmax(zt / T)`` and ``q = softmax(zs / T)`` (DIV: 0 forward KL,
    1 reverse KL, 2 symmetric KL with r = mix, 3 JSD with beta = mix, 4 TVD), with the cross-entropy
    of the raw student logits when HAS_CE (label smoothing eps, z-loss, softcap; its own maximum and
    sum when CE_OWN_STATS: T != 1 or softcap, else the student's). Sweep 1: both sides' maximum and
    sum of exponentials online, with forward / reverse KL's online sums. JSD and TVD: sweep 2 for
    the value (and the gradient's row sum). Last sweep: the gradient over the student's logits."""
    row, s_base, label, valid = row_start(zs_ptr, stride_s, labels_ptr, ignore_index)
    t_base = zt_ptr + row * stride_t
    m_r = float("-inf")  # the cross-entropy's logits (raw, softcapped) when CE_OWN_STATS
    s_r = 0.0
    z_y = 0.0
    sum_z = 0.0
    bad_ce = 0.0  # NaN among the cross-entropy's logits (+inf makes it NaN by itself)
    m_s = float("-inf")  # student at T
    s_s = 0.0
    q_u = 0.0  # sum_u e^(s - m_s) over entries where neither side is -inf
    cross_r = 0.0  # sum_u e^(s - m_s) (s - t)
    m_t = float("-inf")  # teacher at T
    s_t = 0.0
    p_u = 0.0  # sum_u e^(t - m_t)
    cross_f = 0.0  # sum_u e^(t - m_t) (t - s) (true KL) or sum_u e^(t - m_t) s
    bad = 0.0  # NaN or +inf on either side: the divergence is NaN
    for off in range(0, V, BLOCK):
        cols, inside, zr = load_block(s_base, off, V, BLOCK)
        _, _, zt = load_block(t_base, off, V, BLOCK)
        bad += tl.sum(tl.where((zr != zr) | (zt != zt) | (zr == float("inf")) | (zt == float("inf")), 1.0, 0.0))
        s = zr * inv_t
        t = zt * inv_t
        unmasked = (s != float("-inf")) & (t != float("-inf"))
        if HAS_CE:
            zc, bad_ce, z_y, sum_z = ce_block(
                zr, cols, inside, label, softcap, bad_ce, z_y, sum_z, HAS_SMOOTH, HAS_SOFTCAP
            )
            if CE_OWN_STATS:
                m_new, _, rescale, e_r = online_max(m_r, zc)
                s_r = s_r * rescale + tl.sum(e_r)
                m_r = m_new
        m_new, _, rescale, e_s = online_max(m_s, s)
        s_s = s_s * rescale + tl.sum(e_s)
        if ONLINE_RKL:
            q_u, cross_r = unmasked_sums(q_u, cross_r, rescale, e_s, unmasked, s, t, True)
        m_s = m_new
        m_new, _, rescale, e_t = online_max(m_t, t)
        s_t = s_t * rescale + tl.sum(e_t)
        if ONLINE_FKL:
            p_u, cross_f = unmasked_sums(p_u, cross_f, rescale, e_t, unmasked, t, s, TRUE_KL)
        m_t = m_new
    lse_s = logsumexp(m_s, s_s)
    lse_t = logsumexp(m_t, s_t)
    value = 0.0
    row_a = 0.0  # sum_v dD / dlog q_v: the gradient is (a - q row_a) / T
    rkl = 0.0
    fkl = 0.0
    share_p = 0.0
    if ONLINE_RKL:
        rkl = tl.where(q_u == 0.0, 0.0, cross_r / s_s + (q_u / s_s) * (lse_t - lse_s))
        value = rkl
        row_a = rkl
    if ONLINE_FKL:
        share_p = p_u / s_t  # the teacher's probability outside masked entries
        if TRUE_KL:
            fkl = cross_f / s_t + share_p * (lse_s - lse_t)
        else:
            fkl = -cross_f / s_t + share_p * lse_s
        fkl = tl.where(p_u == 0.0, 0.0, fkl)  # every entry masked: 0, not 0 * inf
        value = fkl
        row_a = -share_p
    if DIV == 2:
        value = mix * fkl + (1.0 - mix) * rkl
        row_a = -mix * share_p + (1.0 - mix) * rkl
    if VALUE_SWEEP:
        for off in range(0, V, BLOCK):
            _, _, _, lq, lp = log_softmax_pair(s_base, t_base, off, V, inv_t, lse_s, lse_t, BLOCK)
            q = tl.exp(lq)
            p = tl.exp(lp)
            if DIV == 3:
                lm = log_mixture(lp, lq, log_beta, log_1m_beta)
                kp = tl.where(lp == float("-inf"), 0.0, p * (lp - lm))
                kq = tl.where(lq == float("-inf"), 0.0, q * (lq - lm))
                value += tl.sum(mix * kp + (1.0 - mix) * kq)
                if HAS_GRAD:
                    row_a += tl.sum((1.0 - mix) * kq)
            else:
                d = q - p
                value += 0.5 * tl.sum(tl.abs(d))
                if HAS_GRAD:
                    row_a += 0.5 * tl.sum(tl.where(d > 0, q, tl.where(d < 0, -q, 0.0)))
    kd = tl.where(bad > 0, float("nan"), value * loss_scale)
    tl.store(kd_ptr + row, tl.where(valid, kd, 0.0))
    lse_r = lse_s
    if HAS_CE:
        if CE_OWN_STATS:
            lse_r = logsumexp(m_r, s_r)
        ce = ce_value(lse_r, z_y, sum_z, V, eps, z_loss, HAS_SMOOTH, HAS_ZLOSS)
        ce = tl.where(bad_ce > 0, float("nan"), ce)
        tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    if HAS_GRAD:
        w_kd = tl.load(w_kd_ptr + row).to(tl.float32) * loss_scale * inv_t
        w_ce = 0.0
        w_soft = 0.0  # the softmax's factor in the cross-entropy's gradient
        if HAS_CE:
            w_ce = tl.load(w_ce_ptr + row).to(tl.float32)
            w_soft = ce_softmax_weight(w_ce, lse_r, z_loss, HAS_ZLOSS)
        for off in range(0, V, BLOCK):
            cols, inside, zr, lq, lp = log_softmax_pair(s_base, t_base, off, V, inv_t, lse_s, lse_t, BLOCK)
            q = tl.exp(lq)
            unmasked = (lq != float("-inf")) & (lp != float("-inf"))
            if DIV == 0:
                a = tl.where(unmasked, -tl.exp(lp), 0.0)
            elif ONLINE_RKL:
                a_r = tl.where(unmasked, q * (lq - lp), 0.0)  # reverse KL's terms (its a)
                a = a_r
                if DIV == 2:
                    a = mix * tl.where(unmasked, -tl.exp(lp), 0.0) + (1.0 - mix) * a_r
            elif DIV == 3:
                lm = log_mixture(lp, lq, log_beta, log_1m_beta)
                a = (1.0 - mix) * tl.where(lq == float("-inf"), 0.0, q * (lq - lm))
            else:
                d = q - tl.exp(lp)
                a = 0.5 * tl.where(d > 0, q, tl.where(d < 0, -q, 0.0))
            g = (a - q * row_a) * w_kd
            if HAS_CE:
                zc = zr
                if HAS_SOFTCAP:
                    zc = softcapped(zr, softcap)
                if CE_OWN_STATS:
                    soft = tl.exp(zc - lse_r) * w_soft
                else:
                    soft = q * w_soft
                g += ce_grad(soft, zc, cols, label, w_ce, V, eps, softcap, HAS_SMOOTH, HAS_SOFTCAP)
            store_grad(s_base, cols, inside, g, valid, ROUND_BF16)
