"""The Triton source of :mod:`tune_losses.kernels.triton_ce` (imported only where Triton is).

The function is left undecorated: :func:`tune_losses.kernels.triton_ce` applies ``triton.jit`` per
``TRITON_INTERPRET`` setting (Triton decides at decoration whether a kernel is interpreted, and
the interpreter needs ``tl`` among the function's module globals).
"""

import triton.language as tl


def ce_kernel(
    z_ptr,
    stride,
    labels_ptr,
    weight_ptr,
    loss_ptr,
    lse_ptr,
    V,
    ignore_index,
    eps,
    z_loss,
    softcap,
    HAS_GRAD: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    m = float("-inf")
    s = 0.0
    sum_z = 0.0
    nan_count = 0.0
    z_y = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inside = cols < V
        z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # s tanh(z / s), tanh from exp (NaN stays NaN, +-inf map to +-s)
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
            z = tl.where(inside, z, float("-inf"))
        nan_count += tl.sum(tl.where(z != z, 1.0, 0.0))
        z_y += tl.sum(tl.where(cols == label, z, 0.0))
        if HAS_SMOOTH:
            sum_z += tl.sum(tl.where(inside, z, 0.0))
        m_new = tl.maximum(m, tl.max(z, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift))
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse = shift + tl.log(s)
    lse = tl.where(nan_count > 0, float("nan"), lse)
    loss = lse - z_y
    if HAS_SMOOTH:
        loss = (1.0 - eps) * loss + eps * (lse - sum_z / V)
    if HAS_ZLOSS:
        loss = loss + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if HAS_GRAD:
        w = tl.load(weight_ptr + row).to(tl.float32)
        scale = w
        if HAS_ZLOSS:
            scale = w * (1.0 + 2.0 * z_loss * lse)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            inside = cols < V
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
            g = tl.exp(z - lse) * scale
            g = g - tl.where(cols == label, (1.0 - eps) * w, 0.0)
            if HAS_SMOOTH:
                g = g - eps * w / V
            if HAS_SOFTCAP:
                t = z / softcap
                g = g * (1.0 - t * t)
            g = tl.where(valid, g, 0.0)
            if ROUND_BF16:
                # round to nearest even in fp32 bits, so that the cast (a truncation in Triton's
                # interpreter) is exact: the interpreter's gradient is the GPU's to the bit
                bits = g.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                g = tl.where(g != g, g, bits.to(tl.float32, bitcast=True))
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=inside)


def distill_kernel(
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
    HAS_CE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    TRUE_KL: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Cross-entropy (raw logits) and forward KL(p || q) at temperature T of one token row; the
    # gradient w.r.t. the student's logits written over them (see tune_losses.kernels.triton_ce).
    row = tl.program_id(0).to(tl.int64)
    s_base = zs_ptr + row * stride_s
    t_base = zt_ptr + row * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    m_r = float("-inf")  # raw student logits (cross-entropy)
    s_r = 0.0
    m_s = float("-inf")  # student at T
    s_s = 0.0
    m_t = float("-inf")  # teacher at T: all entries, and the unmasked ones (u)
    s_t = 0.0
    s_u = 0.0
    cross = 0.0  # sum_u e^(t - m_t) (t - s) (true KL) or sum_u e^(t - m_t) s
    z_y = 0.0
    nan_count = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inside = cols < V
        zr = tl.load(s_base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        zt = tl.load(t_base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        nan_count += tl.sum(tl.where((zr != zr) | (zt != zt), 1.0, 0.0))
        s = zr * inv_t
        t = zt * inv_t
        if HAS_CE:
            z_y += tl.sum(tl.where(cols == label, zr, 0.0))
            m_new = tl.maximum(m_r, tl.max(zr, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_r = s_r * tl.exp(m_r - shift) + tl.sum(tl.exp(zr - shift))
            m_r = m_new
        m_new = tl.maximum(m_s, tl.max(s, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_s = s_s * tl.exp(m_s - shift) + tl.sum(tl.exp(s - shift))
        m_s = m_new
        m_new = tl.maximum(m_t, tl.max(t, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_t - shift)
        e_t = tl.exp(t - shift)
        unmasked = (s != float("-inf")) & (t != float("-inf")) & inside
        e_u = tl.where(unmasked, e_t, 0.0)
        s_t = s_t * rescale + tl.sum(e_t)
        s_u = s_u * rescale + tl.sum(e_u)
        if TRUE_KL:
            cross = cross * rescale + tl.sum(tl.where(unmasked, e_u * (t - s), 0.0))
        else:
            cross = cross * rescale + tl.sum(tl.where(unmasked, e_u * s, 0.0))
        m_t = m_new
    lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log(s_s)
    lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log(s_t)
    share_u = s_u / s_t
    if TRUE_KL:
        kd = cross / s_t + share_u * (lse_s - lse_t)
    else:
        kd = -cross / s_t + share_u * lse_s
    kd = tl.where(s_u == 0.0, 0.0, kd) * loss_scale
    kd = tl.where(nan_count > 0, float("nan"), kd)
    tl.store(kd_ptr + row, tl.where(valid, kd, 0.0))
    lse_r = tl.where(m_r == float("-inf"), 0.0, m_r) + tl.log(s_r)
    if HAS_CE:
        ce = tl.where(nan_count > 0, float("nan"), lse_r - z_y)
        tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    if HAS_GRAD:
        w_kd = tl.load(w_kd_ptr + row).to(tl.float32) * loss_scale * inv_t
        w_ce = 0.0
        if HAS_CE:
            w_ce = tl.load(w_ce_ptr + row).to(tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            inside = cols < V
            zr = tl.load(s_base + cols, mask=inside, other=0.0).to(tl.float32)
            zt = tl.load(t_base + cols, mask=inside, other=0.0).to(tl.float32)
            s = zr * inv_t
            t = zt * inv_t
            unmasked = (s != float("-inf")) & (t != float("-inf"))
            p_u = tl.where(unmasked, tl.exp(t - lse_t), 0.0)
            g = (tl.exp(s - lse_s) * share_u - p_u) * w_kd
            if HAS_CE:
                g += (tl.exp(zr - lse_r) - tl.where(cols == label, 1.0, 0.0)) * w_ce
            g = tl.where(valid, g, 0.0)
            if ROUND_BF16:
                # round to nearest even in fp32 bits, so that the cast (a truncation in Triton's
                # interpreter) is exact: the interpreter's gradient is the GPU's to the bit
                bits = g.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                g = tl.where(g != g, g, bits.to(tl.float32, bitcast=True))
            tl.store(s_base + cols, g.to(zs_ptr.dtype.element_ty), mask=inside)
