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
