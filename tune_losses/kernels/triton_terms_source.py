"""The Triton source of :mod:`tune_losses.kernels.triton_terms` (imported only where Triton is).

Left undecorated, as :mod:`tune_losses.kernels.triton_ce_source` (``triton.jit`` is applied per
``TRITON_INTERPRET`` setting). One program per token row; every sweep reads the row's logits in
blocks of ``BLOCK`` columns from memory and keeps per-token sums in fp32 registers.

Online sums: with a running maximum ``m`` and ``S = sum e^(x - m)``, a sum ``sum e^(x - m) f(x)`` is
rescaled by ``e^(m - m_new)`` when a block raises the maximum; the entropy's
``A = sum e^(x - m) (x - m)`` also gains ``(m - m_new) S`` (its factor ``x - m`` moves with ``m``).
"""

import triton.language as tl


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
    # log q[y] and the entropy H of q = softmax(z / T) for one token row (two sweeps with a gradient);
    # FROM_LSE: the gradient sweep alone, from the logsumexp (and entropy) an earlier call stored.
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
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
            cols = off + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            bad += tl.sum(tl.where((x != x) | (x == float("inf")), 1.0, 0.0))
            x_y += tl.sum(tl.where(cols == label, x, 0.0))
            m_new = tl.maximum(m, tl.max(x, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN
            rescale = tl.exp(m - shift)
            e = tl.exp(x - shift)
            if HAS_ENTROPY:
                moved = tl.where(s > 0.0, (m - shift) * s, 0.0)
                a = rescale * (a + moved) + tl.sum(tl.where(e > 0.0, e * (x - shift), 0.0))
            s = s * rescale + tl.sum(e)
            m = m_new
        log_s = tl.log(s)
        lse = tl.where(m == float("-inf"), 0.0, m) + log_s
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
            cols = off + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            q = tl.exp(x - lse)
            g = q * row_scale
            if HAS_W_H:
                g -= w_h * tl.where(q > 0.0, q * (x - lse), 0.0)  # q log q, 0 at masked entries
            if HAS_W_LP:
                g += tl.where(cols == label, w_lp, 0.0)
            g = tl.where(valid, g * inv_t, 0.0)
            if ROUND_BF16:
                # round to nearest even in fp32 bits, so that the cast (a truncation in Triton's
                # interpreter) is exact: the interpreter's gradient is the GPU's to the bit
                bits = g.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                g = tl.where(g != g, g, bits.to(tl.float32, bitcast=True))
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=inside)


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
    # A divergence of p = softmax(zt / T) and q = softmax(zs / T) (DIV: 0 forward KL, 1 reverse KL,
    # 2 symmetric KL with r = mix, 3 JSD with beta = mix, 4 TVD), with the cross-entropy of the raw
    # student logits when HAS_CE (label smoothing eps, z-loss, softcap; its own maximum and sum when
    # CE_OWN_STATS: T != 1 or softcap, else the student's). Sweep 1: both sides' maximum and sum of
    # exponentials online, with forward / reverse KL's online sums. JSD and TVD: sweep 2 for the
    # value (and the gradient's row sum). Last sweep: the gradient over the student's logits.
    row = tl.program_id(0).to(tl.int64)
    s_base = zs_ptr + row * stride_s
    t_base = zt_ptr + row * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
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
        cols = off + tl.arange(0, BLOCK)
        inside = cols < V
        zr = tl.load(s_base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        zt = tl.load(t_base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        bad += tl.sum(tl.where((zr != zr) | (zt != zt) | (zr == float("inf")) | (zt == float("inf")), 1.0, 0.0))
        s = zr * inv_t
        t = zt * inv_t
        unmasked = (s != float("-inf")) & (t != float("-inf"))
        if HAS_CE:
            zc = zr
            if HAS_SOFTCAP:
                # s tanh(z / s), tanh from exp (NaN stays NaN, +-inf map to +-s)
                zc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * zr / softcap) + 1.0))
                zc = tl.where(inside, zc, float("-inf"))
            bad_ce += tl.sum(tl.where(zc != zc, 1.0, 0.0))
            z_y += tl.sum(tl.where(cols == label, zc, 0.0))
            if HAS_SMOOTH:
                sum_z += tl.sum(tl.where(inside, zc, 0.0))
            if CE_OWN_STATS:
                m_new = tl.maximum(m_r, tl.max(zc, 0))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_r = s_r * tl.exp(m_r - shift) + tl.sum(tl.exp(zc - shift))
                m_r = m_new
        m_new = tl.maximum(m_s, tl.max(s, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_s - shift)
        e_s = tl.exp(s - shift)
        s_s = s_s * rescale + tl.sum(e_s)
        if ONLINE_RKL:
            e_u = tl.where(unmasked, e_s, 0.0)
            q_u = q_u * rescale + tl.sum(e_u)
            cross_r = cross_r * rescale + tl.sum(tl.where(unmasked, e_u * (s - t), 0.0))
        m_s = m_new
        m_new = tl.maximum(m_t, tl.max(t, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_t - shift)
        e_t = tl.exp(t - shift)
        s_t = s_t * rescale + tl.sum(e_t)
        if ONLINE_FKL:
            e_u = tl.where(unmasked, e_t, 0.0)
            p_u = p_u * rescale + tl.sum(e_u)
            if TRUE_KL:
                cross_f = cross_f * rescale + tl.sum(tl.where(unmasked, e_u * (t - s), 0.0))
            else:
                cross_f = cross_f * rescale + tl.sum(tl.where(unmasked, e_u * s, 0.0))
        m_t = m_new
    lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log(s_s)
    lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log(s_t)
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
            cols = off + tl.arange(0, BLOCK)
            inside = cols < V
            lq = tl.load(s_base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t - lse_s
            lp = tl.load(t_base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t - lse_t
            q = tl.exp(lq)
            p = tl.exp(lp)
            if DIV == 3:
                # log m = logaddexp(log p + log beta, log q + log(1 - beta)); a side's -inf counts 0
                hi = tl.maximum(lp + log_beta, lq + log_1m_beta)
                lo = tl.minimum(lp + log_beta, lq + log_1m_beta)
                lm = tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)))
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
            lse_r = tl.where(m_r == float("-inf"), 0.0, m_r) + tl.log(s_r)
        ce = lse_r - z_y
        if HAS_SMOOTH:
            ce = (1.0 - eps) * ce + eps * (lse_r - sum_z / V)
        if HAS_ZLOSS:
            ce = ce + z_loss * lse_r * lse_r
        ce = tl.where(bad_ce > 0, float("nan"), ce)
        tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    if HAS_GRAD:
        w_kd = tl.load(w_kd_ptr + row).to(tl.float32) * loss_scale * inv_t
        w_ce = 0.0
        w_soft = 0.0  # the softmax's factor in the cross-entropy's gradient
        if HAS_CE:
            w_ce = tl.load(w_ce_ptr + row).to(tl.float32)
            w_soft = w_ce
            if HAS_ZLOSS:
                w_soft = w_ce * (1.0 + 2.0 * z_loss * lse_r)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            inside = cols < V
            zr = tl.load(s_base + cols, mask=inside, other=float("-inf")).to(tl.float32)
            zt = tl.load(t_base + cols, mask=inside, other=float("-inf")).to(tl.float32)
            lq = zr * inv_t - lse_s
            lp = zt * inv_t - lse_t
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
                hi = tl.maximum(lp + log_beta, lq + log_1m_beta)
                lo = tl.minimum(lp + log_beta, lq + log_1m_beta)
                lm = tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)))
                a = (1.0 - mix) * tl.where(lq == float("-inf"), 0.0, q * (lq - lm))
            else:
                d = q - tl.exp(lp)
                a = 0.5 * tl.where(d > 0, q, tl.where(d < 0, -q, 0.0))
            g = (a - q * row_a) * w_kd
            if HAS_CE:
                if CE_OWN_STATS:
                    zc = zr
                    if HAS_SOFTCAP:
                        zc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * zr / softcap) + 1.0))
                    g_ce = tl.exp(zc - lse_r) * w_soft
                else:
                    g_ce = q * w_soft
                g_ce -= tl.where(cols == label, (1.0 - eps) * w_ce, 0.0)
                if HAS_SMOOTH:
                    g_ce -= eps * w_ce / V
                if HAS_SOFTCAP:
                    tc = zc / softcap
                    g_ce = g_ce * (1.0 - tc * tc)
                g += g_ce
            g = tl.where(valid, g, 0.0)
            if ROUND_BF16:
                # round to nearest even in fp32 bits, so that the cast (a truncation in Triton's
                # interpreter) is exact: the interpreter's gradient is the GPU's to the bit
                bits = g.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                g = tl.where(g != g, g, bits.to(tl.float32, bitcast=True))
            tl.store(s_base + cols, g.to(zs_ptr.dtype.element_ty), mask=inside)
