"""Token cross-entropy of one chunk of logits, with label smoothing, z-loss and softcap."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from tune_losses.divergences.common import ChunkRun, add_at_label, label_index, row_max
from tune_losses.options import CEOptions


def ce_chunk(
    z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, opts: CEOptions, run: ChunkRun
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Cross-entropy ``lse(z) - z[y]`` with label smoothing, z-loss and softcap, and its gradient.

    Args:
        z: ``[n, V_r]`` raw logits.
        labels, valid: ``[n]`` class ids and the mask of counted tokens.
        run: the reducer, the gradient weight per token (None: the value only), whether ``z`` may
            be overwritten, and a dict to leave ``(max, sum exp)`` of the raw logits in (``rows``,
            key ``"raw"``) for later terms of the same chunk (not with softcap, whose logits differ).

    Returns:
        ``(loss [n], grad [n, V_r] or None)``; the loss is 0 at ignored tokens.
    """
    s, eps, c = opts.softcap, opts.label_smoothing, opts.z_loss
    red, weight, consume, rows = run
    if s is not None:
        z = (z if consume else z.clone()).div_(s).tanh_().mul_(s)
        consume = True
    idx, owned = label_index(labels, valid, z.shape[1], red)
    stats = [torch.where(owned, z.gather(-1, idx).squeeze(-1), 0.0)]
    if eps > 0:
        stats.append(z.sum(-1))
    # softcap's chain rule needs tanh = z / s, read before z is overwritten by the softmax.
    dcap = 1 - (z / s).square() if weight is not None and s is not None else None
    m = row_max(z.amax(-1), red)
    e = (z.sub_(m.unsqueeze(-1)) if consume else z - m.unsqueeze(-1)).exp_()
    stats.insert(0, e.sum(-1))
    r = red.sum(torch.stack(stats))
    sumexp = r[0]
    if rows is not None and s is None:
        rows.setdefault("raw", (m, sumexp))
    lse = m + sumexp.log()
    loss = lse - r[1]
    if eps > 0:
        loss = (1 - eps) * loss + eps * (lse - r[2] / red.vocab)
    if c > 0:
        loss = loss + c * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if weight is None:
        return loss, None
    # d/dz = softmax (1 + 2 c lse) - (1 - eps) onehot - eps / V, times the token's weight; the
    # softmax normalization, the z-loss factor and the weight are one per-row scale: one pass.
    row = weight / sumexp
    if c > 0:
        row = row * (1 + 2 * c * lse)
    if torch.compiler.is_compiling() and not consume:
        # Compiled: exp again in the gradient's pass rather than store e between the reduction and
        # that pass (Inductor would keep a [n, V] buffer for it, and a divergence term of the same
        # chunk shares this exp(z - max) there).
        e = (z - m.unsqueeze(-1)).exp()
    g = add_at_label(e.mul_(row.unsqueeze(-1)), idx, owned, -(1 - eps) * weight)
    if eps > 0:
        g.sub_((eps / red.vocab) * weight.unsqueeze(-1))
    if dcap is not None:
        g.mul_(dcap)
    return loss, g
