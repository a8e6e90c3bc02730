"""The label's log-probability (and the entropy) of one chunk of logits."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from tune_losses.divergences.common import VocabReducer, add_at_label, label_index, row_max, scaled


def log_prob_chunk(
    z: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    red: VocabReducer,
    entropy: bool = False,
    weights: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
    consume: bool = False,
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """``log q[y]`` with ``q = softmax(z / T)`` and, optionally, the entropy ``H = -sum q log q``.

    Gradients (``z' = z / T``): ``d log q[y] / dz'_j = onehot_j - q_j`` and
    ``dH / dz'_j = -q_j (log q_j + H)``; both divided by T for the raw logits.

    Args:
        z: ``[n, V_r]`` raw logits.
        weights: ``(weight of log q[y], weight of H)``, each ``[n]`` or None; None for no gradient.

    Returns:
        ``([log_probs [n], entropy [n] if asked], grad [n, V_r] or None)``; 0 at ignored tokens.
    """
    zz = scaled(z, temperature, consume)
    idx, owned = label_index(labels, valid, zz.shape[1], red)
    m = row_max(zz.amax(-1), red)
    stats = [torch.where(owned, zz.gather(-1, idx).squeeze(-1), 0.0)]
    e = zz.sub_(m.unsqueeze(-1)).exp_()
    stats.insert(0, e.sum(-1))
    if entropy:
        stats.append(torch.special.xlogy(e, e).sum(-1))  # sum e log e, 0 log 0 = 0 at masked entries
    r = red.sum(torch.stack(stats))
    log_sum = r[0].log()
    outs = [torch.where(valid, r[1] - m - log_sum, 0.0)]
    h = None
    if entropy:
        h = log_sum - r[2] / r[0]
        outs.append(torch.where(valid, h, 0.0))
    if weights is None or all(w is None for w in weights):
        return outs, None
    w_lp, w_h = weights[0], (weights[1] if entropy else None)
    q = e.div_(r[0].unsqueeze(-1))
    row = torch.zeros_like(r[0])
    if w_lp is not None:
        row = row - w_lp
    if w_h is not None:
        assert h is not None  # w_h is only taken with the entropy
        row = row - w_h * h
        g = torch.special.xlogy(q, q).mul_(-w_h.unsqueeze(-1)).add_(q.mul_(row.unsqueeze(-1)))
    else:
        g = q.mul_(row.unsqueeze(-1))
    if w_lp is not None:
        g = add_at_label(g, idx, owned, w_lp)
    if temperature != 1.0:
        g.div_(temperature)
    return outs, g
