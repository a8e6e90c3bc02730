"""Tensor steps the chunk loop (:mod:`tune_losses.fused.engine`) and the vocabulary-blocked backward
(:mod:`tune_losses.fused.dw_accumulation`) share, so that both make logits, mask ignored tokens and
weight gradients the same way."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

# A term output's gradient weight as the engine receives it: a float for every token, a per-token
# tensor (``grad_output``, a policy's weights), or None for no gradient.
OutputWeight = Union[float, torch.Tensor, None]


class Operands(NamedTuple):
    """One fused call's tensors, as the chunk loop and the blocked backward take them."""

    x: torch.Tensor  # [N, H] student hidden states
    w: torch.Tensor  # [V_r, H] output weight (this process's vocabulary rows)
    b: Optional[torch.Tensor]  # [V_r] bias
    labels: torch.Tensor  # [N]
    tx: Optional[torch.Tensor]  # [N, Ht] teacher hidden states (a term needs the teacher)
    tw: Optional[torch.Tensor]  # [V_r, Ht] teacher weight
    tb: Optional[torch.Tensor]  # [V_r] teacher bias


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are computed in fp64 (so gradcheck works); everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Logits ``[n, V_r]`` in the compute dtype: ``x @ w.T + b`` in the input dtype (as eager PyTorch
    makes them), then upcast; written into ``out`` (``[n, V_r]``) when given."""
    if out is not None and x.dtype == out.dtype:
        return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)
    z = torch.nn.functional.linear(x, w, b)
    if out is not None:
        return out.copy_(z)
    dtype = compute_dtype(z.dtype)
    return z if z.dtype == dtype else z.to(dtype)


def zero_ignored(rows: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[n, H]`` with the rows of ignored tokens (``ok`` ``[n]`` False) set to 0 (a copy).

    A non-finite hidden state at a token the loss leaves out (a padding position) then cannot reach
    dX / dW as ``0 * NaN``.
    """
    return torch.where(ok.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def token_weight(
    w: OutputWeight, ok: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """A term output's gradient weight per token ``[n]``: ``w`` (a float, or ``[n]`` for the same
    tokens as ``ok``), 0 at ignored tokens, times ``scale`` (0-dim or None); None stays None."""
    if w is None:
        return None
    t = torch.where(ok, w.to(dtype), 0.0) if isinstance(w, torch.Tensor) else ok.to(dtype) * w
    return t if scale is None else t * scale.to(dtype)
