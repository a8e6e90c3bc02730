"""The Triton source of :mod:`tune_losses.kernels.triton_ce` (imported only where Triton is).

The function is left undecorated: :func:`tune_losses.kernels.triton_ce` applies ``triton.jit`` per
``TRITON_INTERPRET`` setting (Triton decides at decoration whether a kernel is interpreted, and
the interpreter needs ``tl`` among the function's module globals). The per-row pieces it shares
with the other kernels are :mod:`tune_losses.kernels.triton_common`'s.
"""

import triton.language as tl

from tune_losses.kernels.triton_common import (
    ce_block,
    ce_grad,
    ce_softmax_weight,
    ce_value,
    load_block,
    logsumexp,
    online_max,
    row_start,
    softcapped,
    store_grad,
)


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
    """The cross-entropy of one token row (label smoothing eps, z-loss, softcap) and its logsumexp;
    HAS_GRAD: a second sweep writes the gradient of ``weight * loss`` over the row's logits."""
    row, base, label, valid = row_start(z_ptr, stride, labels_ptr, ignore_index)
    m = float("-inf")
    s = 0.0
    sum_z = 0.0
    nan_count = 0.0
    z_y = 0.0
    for off in range(0, V, BLOCK):
        cols, inside, z = load_block(base, off, V, BLOCK)
        z, nan_count, z_y, sum_z = ce_block(
            z, cols, inside, label, softcap, nan_count, z_y, sum_z, HAS_SMOOTH, HAS_SOFTCAP
        )
        m_new, _, rescale, e = online_max(m, z)
        s = s * rescale + tl.sum(e)
        m = m_new
    lse = tl.where(nan_count > 0, float("nan"), logsumexp(m, s))
    loss = ce_value(lse, z_y, sum_z, V, eps, z_loss, HAS_SMOOTH, HAS_ZLOSS)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if HAS_GRAD:
        w = tl.load(weight_ptr + row).to(tl.float32)
        scale = ce_softmax_weight(w, lse, z_loss, HAS_ZLOSS)
        for off in range(0, V, BLOCK):
            cols, inside, z = load_block(base, off, V, BLOCK, 0.0)
            if HAS_SOFTCAP:
                z = softcapped(z, softcap)
            g = ce_grad(tl.exp(z - lse) * scale, z, cols, label, w, V, eps, softcap, HAS_SMOOTH, HAS_SOFTCAP)
            store_grad(base, cols, inside, g, valid, ROUND_BF16)
