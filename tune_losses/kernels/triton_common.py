"""Per-row pieces shared by the Triton chunk kernels (:mod:`~tune_losses.kernels.triton_ce_source`,
:mod:`~tune_losses.kernels.triton_terms_source`); imported only where Triton is.

Each is a ``triton.jit`` device function: compiled, Triton inlines it into the calling kernel (the
kernels' code is the same as with the lines written out); interpreted, it runs as Python on the
interpreter's numpy values, with the same operations in the same order (the same bits). Decorated
at import, as Triton's own device functions (``tl.sum``, ``tl.max``) are: the kernels that call
them are decorated under the same ``TRITON_INTERPRET`` setting.

Shapes: a row's block of ``BLOCK`` columns ``cols`` / ``inside`` / values are ``[BLOCK]``; sums,
maxima and weights are fp32 scalars.
"""

import triton
import triton.language as tl


@triton.jit
def row_start(z_ptr, stride, labels_ptr, ignore_index):
    """This program's token row (int64, for pointer offsets), the pointer to its logits, its label
    and whether it counts."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    label = tl.load(labels_ptr + row)
    return row, base, label, label != ignore_index


@triton.jit
def load_block(base, off, V, BLOCK: tl.constexpr, other=float("-inf")):
    """Columns ``off ..`` of a row: ``(cols, inside, values in fp32)``; columns past ``V`` read
    ``other`` (``-inf``: probability 0 in every softmax sum)."""
    cols = off + tl.arange(0, BLOCK)
    inside = cols < V
    x = tl.load(base + cols, mask=inside, other=other).to(tl.float32)
    return cols, inside, x


@triton.jit
def online_max(m, x):
    """One block ``x`` of an online softmax with running maximum ``m``: ``(m_new, shift, rescale,
    e)``. ``shift`` is ``m_new`` (0 while the row is all ``-inf``, so no ``-inf - -inf`` NaN);
    ``rescale = e^(m - shift)`` brings every running sum kept at the old maximum to the new one,
    so ``s = sum e^(x - m)`` goes on as ``s * rescale + sum(e)`` with ``e = e^(x - shift)``."""
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - shift)
    e = tl.exp(x - shift)
    return m_new, shift, rescale, e


@triton.jit
def unmasked_sums(u, cross, rescale, e, unmasked, x, y, DIFF: tl.constexpr):
    """A KL part's online sums over one block, at the side's new maximum (``rescale`` and
    ``e = e^(x - shift)`` from :func:`online_max`): ``u = sum e`` and ``cross = sum e (x - y)``
    (DIFF; ``x`` this side's logits, ``y`` the other's) or ``sum e y`` (forward KL's cross-entropy
    form), over the entries where neither side is ``-inf`` (``unmasked``). Returns ``(u, cross)``."""
    e_u = tl.where(unmasked, e, 0.0)
    u = u * rescale + tl.sum(e_u)
    if DIFF:
        cross = cross * rescale + tl.sum(tl.where(unmasked, e_u * (x - y), 0.0))
    else:
        cross = cross * rescale + tl.sum(tl.where(unmasked, e_u * y, 0.0))
    return u, cross


@triton.jit
def logsumexp(m, s):
    """The logsumexp from an online softmax's maximum and sum (``-inf`` for a row of ``-inf``)."""
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(s)


@triton.jit
def softcapped(z, softcap):
    """``softcap * tanh(z / softcap)``, tanh from exp (NaN stays NaN, +-inf map to +-softcap)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))


@triton.jit
def ce_block(z, cols, inside, label, softcap, bad, z_y, sum_z, HAS_SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The cross-entropy's first-sweep sums over one block of raw logits ``z`` (``-inf`` past the
    row): the softcapped logits ``zc`` (``-inf`` past the row) and the running NaN count, label
    logit and (label smoothing) sum of logits. Returns ``(zc, bad, z_y, sum_z)``."""
    zc = z
    if HAS_SOFTCAP:
        zc = tl.where(inside, softcapped(z, softcap), float("-inf"))
    bad += tl.sum(tl.where(zc != zc, 1.0, 0.0))
    z_y += tl.sum(tl.where(cols == label, zc, 0.0))
    if HAS_SMOOTH:
        sum_z += tl.sum(tl.where(inside, zc, 0.0))
    return zc, bad, z_y, sum_z


@triton.jit
def ce_value(lse, z_y, sum_z, V, eps, z_loss, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """A token's cross-entropy ``lse - z_y`` with label smoothing ``eps`` (``sum_z`` the sum of its
    logits) and the z-loss ``z_loss lse^2``."""
    loss = lse - z_y
    if HAS_SMOOTH:
        loss = (1.0 - eps) * loss + eps * (lse - sum_z / V)
    if HAS_ZLOSS:
        loss = loss + z_loss * lse * lse
    return loss


@triton.jit
def ce_softmax_weight(w, lse, z_loss, HAS_ZLOSS: tl.constexpr):
    """The softmax's factor in the gradient of ``w * cross-entropy``: ``w (1 + 2 z_loss lse)``."""
    scale = w
    if HAS_ZLOSS:
        scale = w * (1.0 + 2.0 * z_loss * lse)
    return scale


@triton.jit
def ce_grad(g, zc, cols, label, w, V, eps, softcap, HAS_SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The gradient of ``w * cross-entropy`` w.r.t. the raw logits over one block, from ``g`` = the
    softmax times :func:`ce_softmax_weight`: minus the label's ``(1 - eps) w`` and the smoothing's
    ``eps w / V``, times the softcap's ``1 - tanh^2`` (``zc``: the softcapped logits)."""
    g -= tl.where(cols == label, (1.0 - eps) * w, 0.0)
    if HAS_SMOOTH:
        g -= eps * w / V
    if HAS_SOFTCAP:
        t = zc / softcap
        g = g * (1.0 - t * t)
    return g


@triton.jit
def store_grad(base, cols, inside, g, valid, ROUND_BF16: tl.constexpr):
    """Writes a block's gradient ``g`` (fp32; 0 at an ignored token) over the row's logits, in
    their dtype. bf16: rounded to nearest even in fp32 bits first, so that the cast (a truncation
    in Triton's interpreter) is exact: the interpreter's gradient is the GPU's to the bit."""
    g = tl.where(valid, g, 0.0)
    if ROUND_BF16:
        bits = g.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        g = tl.where(g != g, g, bits.to(tl.float32, bitcast=True))
    tl.store(base + cols, g.to(base.dtype.element_ty), mask=inside)


@triton.jit
def log_mixture(lp, lq, log_beta, log_1m_beta):
    """JSD's ``log m = logaddexp(log p + log beta, log q + log(1 - beta))`` over a block; a side at
    ``-inf`` counts 0 (``-inf`` where both are)."""
    hi = tl.maximum(lp + log_beta, lq + log_1m_beta)
    lo = tl.minimum(lp + log_beta, lq + log_1m_beta)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def log_softmax_pair(s_base, t_base, off, V, inv_t, lse_s, lse_t, BLOCK: tl.constexpr):
    """A block of a student row and a teacher row, with both sides' normalizers known:
    ``(cols, inside, raw student logits, log q, log p)``, ``log q = z_s / T - lse_s`` (``-inf``
    past the row), likewise ``log p``."""
    cols, inside, zr = load_block(s_base, off, V, BLOCK)
    _, _, zt = load_block(t_base, off, V, BLOCK)
    return cols, inside, zr, zr * inv_t - lse_s, zt * inv_t - lse_t
