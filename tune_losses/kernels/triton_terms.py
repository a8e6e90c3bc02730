"""Log-probabilities (with entropy) and distillation's divergences (with cross-entropy) as Triton
kernels over one chunk of logits in their own dtype (no fp32 ``[n, V]`` buffer for bf16 inputs).

* :func:`log_prob_chunk_triton`: ``log softmax(z / T)[y]`` and the entropy ``H = -sum q log q``
  (the engine's :class:`~tune_losses.terms.LogProbTerm`: ``linear_log_probs``, the DPO family's
  log-probabilities). Sweep 1 keeps the maximum, the sum of exponentials and the entropy's
  ``sum e^(x - m) (x - m)`` online; sweep 2 (with a gradient weight) writes
  ``(w_lp (onehot - q) - w_h q (log q + H)) / T`` over the logits. :func:`log_prob_grad_triton`
  runs sweep 2 alone from an earlier call's logsumexp, for a weight that depends on the values.
* :func:`divergence_chunk_triton`: distillation's two logit sets: forward KL, reverse KL, symmetric
  KL, JSD(beta) (the limits beta = 0 / 1 are forward / reverse KL) and TVD at temperature T, alone
  or with the student's cross-entropy (label smoothing, z-loss, softcap). Sweep 1 keeps both logit
  sets' maximum and sum of exponentials online, and the KL parts' sums
  (``sum_u e^(s - m) (s - t)``, ``sum_u e^(t - m) (t - s)``), so the KL family has its value after
  one sweep. JSD and TVD need both normalizers before any term: a second sweep sums the
  value and the gradient's row reduction ``sum_v dD / dlog q_v``. With a gradient a last sweep writes
  ``w T^2 / T (a - q sum a)`` (+ the cross-entropy's gradient, as in
  :mod:`~tune_losses.kernels.triton_ce`) over the student's logits. Each sweep re-reads the chunk's logits from memory (a row is not kept in registers): the
  KL family reads both sets twice with a gradient, JSD / TVD three times.

Same contract as the eager math (:func:`tune_losses.divergences.log_prob_chunk`,
:func:`tune_losses.divergences.kd_chunk`) on one process: values 0 at ignored tokens, a NaN or +inf
logit at a counted token gives a NaN value, ``-inf`` logits are masked entries (KL parts count 0
where either side is -inf, JSD per side, TVD as ``|p - q|``); the gradient is 0 at ignored tokens.
The cross-entropy reads the student's logits only (a NaN teacher logit leaves it finite, as eager).
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from tune_losses.kernels.triton_ce import block_width, check_rows, fp32_or, launch
from tune_losses.options import CEOptions, KDOptions

# The divergence kernel's codes (JSD at beta = 0 / 1 runs as forward / reverse KL).
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "symmetric_kl": 2, "jsd": 3, "tvd": 4}


def log_prob_chunk_triton(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    entropy: bool = False,
    w_lp: Optional[torch.Tensor] = None,
    w_h: Optional[torch.Tensor] = None,
    block: Optional[int] = None,
    return_lse: bool = False,
) -> List[torch.Tensor]:
    """``log q[y]`` (and the entropy) of one chunk, ``q = softmax(z / T)``; the gradient of
    ``w_lp * log q[y] + w_h * H`` w.r.t. ``z`` is written over ``z`` when a weight is given.

    Args:
        z: ``[n, V]`` logits, bf16 / fp16 / fp32, rows contiguous.
        labels: ``[n]`` int64; ``ignore_index`` marks ignored tokens (values and gradient 0).
        w_lp, w_h: ``[n]`` gradient weights of the log-probability and of the entropy, or None.
        block: vocabulary columns per step (a power of two; default ``min(4096, next pow2 of V)``).
        return_lse: also return ``logsumexp(z / T)`` per token (NaN at a non-finite row), for a
            later :func:`log_prob_grad_triton` whose weight depends on these values.

    Returns:
        ``[log_probs [n]]`` (+ ``[entropy [n]]`` with ``entropy``, + ``[lse [n]]`` with
        ``return_lse``) in fp32.
    """
    if entropy is False and w_h is not None:
        raise ValueError("w_h: an entropy weight needs entropy=True")
    check_rows(z, "z")
    n = z.shape[0]
    lp = torch.empty(n, dtype=torch.float32, device=z.device)
    h = torch.empty(n, dtype=torch.float32, device=z.device) if entropy else lp
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    _launch(z, labels, temperature, ignore_index, entropy, False, w_lp, w_h, lp, h, lse, block)
    return [lp] + ([h] if entropy else []) + ([lse] if return_lse else [])


def log_prob_grad_triton(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    lse: torch.Tensor,
    w_lp: Optional[torch.Tensor] = None,
    w_h: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """The gradient of ``w_lp * log q[y] + w_h * H`` w.r.t. ``z``, written over ``z`` in one sweep
    from the values a :func:`log_prob_chunk_triton` call returned for the same logits: ``lse``
    (``return_lse``) and, with ``w_h``, ``entropy``. For a term whose gradient weight is a
    function of the log-probabilities (a policy or preference loss): values, formula, gradient.

    Returns:
        ``z`` (holding the gradient).
    """
    if w_h is not None and entropy is None:
        raise ValueError("entropy: an entropy weight needs the entropy values, got None")
    if w_lp is None and w_h is None:
        raise ValueError("w_lp, w_h: expected at least one gradient weight, got None for both")
    check_rows(z, "z")
    h = fp32_or(entropy, lse)
    lse = lse.to(torch.float32).contiguous()
    _launch(z, labels, temperature, ignore_index, entropy is not None, True, w_lp, w_h, lse, h, lse, block)
    return z


def _launch(z, labels, temperature, ignore_index, entropy, from_lse, w_lp, w_h, lp, h, lse, block) -> None:
    n, vocab = z.shape
    if n == 0:
        return
    launch(
        "triton_terms_source",
        "logprob_kernel",
        n,
        block_width(vocab, block),
        z,
        z.stride(0),
        labels.contiguous(),
        fp32_or(w_lp, lp),
        fp32_or(w_h, lp),
        lp,
        h,
        lse,
        vocab,
        ignore_index,
        1.0 / temperature,
        HAS_ENTROPY=entropy,
        FROM_LSE=from_lse,
        HAS_GRAD=w_lp is not None or w_h is not None,
        HAS_W_LP=w_lp is not None,
        HAS_W_H=w_h is not None,
        ROUND_BF16=z.dtype == torch.bfloat16,
    )


def divergence_chunk_triton(
    zs: torch.Tensor,
    zt: torch.Tensor,
    labels: torch.Tensor,
    kd: KDOptions,
    ignore_index: int,
    ce: Optional[CEOptions] = None,
    w_ce: Optional[torch.Tensor] = None,
    w_kd: Optional[torch.Tensor] = None,
    block: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``kd.divergence`` of one chunk and, when ``ce`` is given, the cross-entropy of the student's
    raw logits (any :class:`~tune_losses.options.CEOptions`); the gradient of
    ``w_ce * ce + w_kd * kd`` w.r.t. the student's logits is written over ``zs`` when ``w_kd`` is
    given (with ``ce``, ``w_ce`` too).

    Args:
        zs: ``[n, V]`` student logits, rows contiguous; zt: ``[n, >= V]`` teacher logits of the same
            dtype (a wider teacher's columns past V are not read: ``teacher_vocab="drop"``).
        kd: the divergence (forward_kl, reverse_kl, symmetric_kl, jsd, tvd) and its options
            (temperature, the ``T^2`` scale, beta, sym_kd_ratio, true_kl).
        ignore_index: labels equal to it are ignored tokens (values and gradient 0).

    Returns:
        ``(ce [n], kd [n])`` in fp32, 0 at ignored tokens (``ce`` zeros without ``ce``).
    """
    check_rows(zs, "zs")
    check_rows(zt, "zt")
    div = kd.divergence
    if div == "jsd" and kd.beta in (0.0, 1.0):
        div = "forward_kl" if kd.beta == 0.0 else "reverse_kl"  # the limits (the formula is 0 there)
    if div not in DIVERGENCE_CODES:
        raise ValueError(f"kd.divergence: expected one of {tuple(DIVERGENCE_CODES)}, got {kd.divergence!r}")
    code = DIVERGENCE_CODES[div]
    mix = kd.sym_kd_ratio if div == "symmetric_kl" else kd.beta
    n, vocab = zs.shape
    ce_out = torch.zeros(n, dtype=torch.float32, device=zs.device)
    kd_out = torch.empty(n, dtype=torch.float32, device=zs.device)
    if n == 0:
        return ce_out, kd_out
    mixed = 0.0 < kd.beta < 1.0  # JSD's mixture weights' logs (read only then)
    c = ce or CEOptions()
    launch(
        "triton_terms_source",
        "divergence_kernel",
        n,
        block_width(vocab, block, 2048),  # two logit sets per step
        zs,
        zt,
        zs.stride(0),
        zt.stride(0),
        labels.contiguous(),
        fp32_or(w_ce, kd_out),
        fp32_or(w_kd, kd_out),
        ce_out,
        kd_out,
        vocab,
        ignore_index,
        1.0 / kd.temperature,
        kd.loss_scale,
        float(mix),
        math.log(kd.beta) if mixed else 0.0,
        math.log1p(-kd.beta) if mixed else 0.0,
        float(c.label_smoothing),
        float(c.z_loss),
        float(c.softcap or 1.0),
        DIV=code,
        ONLINE_FKL=code in (0, 2),
        ONLINE_RKL=code in (1, 2),
        VALUE_SWEEP=code in (3, 4),
        HAS_CE=ce is not None,
        CE_OWN_STATS=ce is not None and (kd.temperature != 1.0 or c.softcap is not None),
        HAS_SMOOTH=c.label_smoothing > 0,
        HAS_ZLOSS=c.z_loss > 0,
        HAS_SOFTCAP=c.softcap is not None,
        HAS_GRAD=w_kd is not None,
        TRUE_KL=kd.true_kl,
        ROUND_BF16=zs.dtype == torch.bfloat16,
    )
    return ce_out, kd_out
