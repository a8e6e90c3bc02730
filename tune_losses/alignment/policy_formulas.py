"""The policy-optimization (GRPO family) math on per-token log-probabilities, written once.

TRL 1.16's ``GRPOTrainer._compute_loss`` definitions, as elementwise closed forms: for each token, the
loss ``l(logp)`` given the sampling policy's ``old`` log-prob, the reference's ``ref`` and the
advantage ``A``, and its derivative ``dl / dlogp``. Both loss paths use this one function:

* the grad-in-forward term (:mod:`tune_losses.alignment.policy_term`) turns the derivative into the
  logit gradient ``dl/dlogp * (onehot - softmax)`` of each chunk while the logits exist;
* :func:`tune_losses.alignment.policy.policy_loss_from_log_probs` (log-probs from anywhere, the
  recompute path) wraps it in an autograd function over ``[G, S]`` log-probs.

Tokens are flat ``[n]`` vectors; a token's sequence is given by a slot id ``seq [n]`` (int64, distinct
per sequence among the ``n`` tokens, below ``n``), needed where a sequence-level quantity enters
(``importance_sampling_level="sequence"``, ``vespo``): then every token of a sequence must be among
the ``n``. Policy batches are ``[G, S]`` with advantages ``[G]``.

Per token, with ``r = exp(logp - old)`` (token level) or ``r = exp(mean over the sequence's valid
tokens of (logp - old))`` (sequence level, GSPO), A the advantage:

* clip family (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``): ``-min(r' A, clip(r, 1 - eps_low,
  1 + eps_high) A)``, ``r' = min(r, delta)`` with two-sided clipping (``delta``), else ``r``;
* ``cispo``: ``-sg(min(r, eps_high)) A logp`` (``sg``: no gradient);
* ``sapo``: ``-(4 / tau) sigmoid(tau (r - 1)) A``, ``tau`` = ``sapo_temperature_pos`` if A > 0 else
  ``sapo_temperature_neg``;
* ``vespo``: ``-sg(phi) A logp`` with the sequence's gamma weight ``phi = exp(lam + k log w - lam w)``,
  ``log w = clamp(sum over its valid tokens of clamp(logp - old, -20, 20) (+ log is_ratio), log 1e-8,
  20)``, ``(k, lam)`` = ``(vespo_k_pos, vespo_lambda_pos)`` if A >= 0 else the ``_neg`` pair;
* times the rollout engine's importance-sampling ratio ``is_ratio`` when given (not for ``vespo``,
  which folds it into ``log w``);
* plus with ``beta > 0`` the k3 KL estimate ``beta (exp(ref - logp) - (ref - logp) - 1)``, times ``r``
  (before ``delta``) with ``use_bias_correction_kl``.

The loss is ``sum over valid tokens of weight * l`` with per-token weights that carry the
normalization (:func:`policy_token_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, cast

import torch

from tune_losses.options import check_bool_option, check_choice, check_float_option, check_int_option

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""Loss types with PPO's clipped surrogate (and TRL's clip-ratio metrics)."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IS_RATIO_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_LOG_1E8 = math.log(1e-8)


@dataclass(frozen=True)
class PolicyOptions:
    """Non-tensor options of a policy loss (TRL 1.16 ``GRPOConfig`` names); hashable, checked when made.

    Attributes:
        loss_type: ``grpo`` (mean over sequences of per-sequence means), ``bnpo`` (sum / valid
            tokens), ``dr_grpo`` (sum / (G * max_completion_length, default S)), ``dapo`` (sum /
            ``num_items_in_batch``, default the valid tokens), ``cispo`` (clipped, detached ratio
            times log-prob; dapo's normalization), ``sapo`` (sigmoid gate; grpo's), ``luspo``
            (clipped; each sequence's token sum, mean over sequences), ``vespo`` (gamma-weighted
            log-prob; dapo's). Formulas: this module's docstring.
        epsilon_low, epsilon_high: the clip range ``[1 - eps_low, 1 + eps_high]`` (None: high = low);
            for ``cispo``, ``epsilon_high`` is the ratio's cap (TRL recommends 5.0).
        beta: weight of the k3 KL estimate ``exp(ref - logp) - (ref - logp) - 1`` (>= 0; > 0 needs
            the reference's log-probs).
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio capped at ``delta`` (clip family).
        importance_sampling_level: ``token``, or ``sequence`` (GSPO: each sequence's ratio is the exp
            of its mean log-ratio).
        use_bias_correction_kl: multiply the KL term by the (unclipped) ratio (DeepSeek-V3.2). False
            here (TRL 1.16 defaults to True; Liger to False): the plain k3 estimate unless asked.
        sapo_temperature_pos, sapo_temperature_neg, vespo_*: those losses' parameters (TRL's defaults).
        temperature: logits are divided by it before the log-softmax (as at sampling); not read by
            :func:`~tune_losses.alignment.policy.policy_loss_from_log_probs` (log-probs made already).
        return_entropy: also compute the per-token entropy for the ``entropy`` metric (one more
            reduction over the vocabulary per chunk).
        max_completion_length: ``dr_grpo``'s normalizer (None: S).
        validate: check the label range (one host sync per call).
    """

    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.0
    delta: Optional[float] = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    temperature: float = 1.0
    return_entropy: bool = True
    max_completion_length: Optional[int] = None
    validate: bool = True

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, POLICY_LOSS_TYPES)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_float_option("beta", self.beta, 0.0)
        check_float_option("epsilon_low", self.epsilon_low, 0.0, 1.0)
        if self.loss_type in CLIP_LOSS_TYPES and self.epsilon_low == 1.0:
            raise ValueError(f"epsilon_low: expected a number in [0, 1), got {self.epsilon_low!r}")
        check_float_option("epsilon_high", self.epsilon_high, 0.0, allow_none=True)
        if self.epsilon_high is None:  # TRL's rule: the clip range is symmetric unless told otherwise
            object.__setattr__(self, "epsilon_high", self.epsilon_low)
        check_float_option("delta", self.delta, 0.0, low_open=True, allow_none=True)
        if self.delta is not None and self.loss_type not in CLIP_LOSS_TYPES:
            raise ValueError(
                f"delta: two-sided clipping applies to the clipped loss types {CLIP_LOSS_TYPES}, "
                f"got delta={self.delta!r} with loss_type={self.loss_type!r}"
            )
        check_bool_option("use_bias_correction_kl", self.use_bias_correction_kl)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "temperature"):
            check_float_option(name, getattr(self, name), 0.0, low_open=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            check_float_option(name, getattr(self, name), 0.0)
        check_int_option("max_completion_length", self.max_completion_length, 1, allow_none=True)
        check_bool_option("return_entropy", self.return_entropy)
        check_bool_option("validate", self.validate)

    @property
    def high(self) -> float:
        """``epsilon_high`` as applied: ``epsilon_low`` when none was given (TRL's rule)."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def needs_sequences(self) -> bool:
        """Whether a token's loss depends on its whole sequence (then chunks hold whole sequences)."""
        return self.sequence_level or self.loss_type == "vespo"


def _segment_sum(x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Per token, the sum of ``x`` ``[n]`` over the tokens of its sequence (slot ids ``seq`` ``[n]``)."""
    return torch.zeros_like(x).index_add_(0, seq, x)[seq]


def policy_token_terms(
    opts: PolicyOptions,
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    *,
    ref: Optional[torch.Tensor] = None,
    is_ratio: Optional[torch.Tensor] = None,
    seq: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """Per-token policy loss, its gradient and its statistics (see the module docstring).

    Args:
        logp, old: ``[n]`` the policy's and the sampler's log-probs of the tokens.
        adv: ``[n]`` each token's advantage (its sequence's).
        valid: ``[n]`` bool; other tokens get loss 0, gradient 0, and whatever their inputs hold
            (even inf or NaN) reaches nothing.
        ref: ``[n]`` the reference's log-probs, needed when ``opts.beta > 0``.
        is_ratio: ``[n]`` the rollout engine's importance-sampling ratio (truncated already), or None;
            for ``vespo``, per-token parts whose sum over a sequence is its clamped log-ratio
            (:func:`vespo_log_ratio`).
        seq: ``[n]`` int64 sequence slot ids, needed when ``opts.needs_sequences``.
        weight: ``[n]`` each token's weight in the loss (0 at invalid tokens), or None for values only.

    Returns:
        ``(loss [n], grad [n] or None, stats)``: ``loss`` unweighted (0 at invalid tokens), ``grad`` the
        derivative of ``sum(weight * loss)`` with respect to ``logp``; ``stats`` per token (0 at invalid
        tokens), ready to be summed: ``kl`` (the KL term as added, with ``beta > 0``), ``clip_low``,
        ``clip_high`` (clip family), ``cispo_clip`` (cispo), ``phi`` (vespo). A token-level flag is 0/1
        (its sum / valid tokens is TRL's metric); a sequence-level one is divided by the sequence's
        valid tokens (its sum / sequences is TRL's).
    """
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(valid, logp, zero)
    lr = torch.where(valid, lp - old.to(lp.dtype), zero)
    a = adv.to(lp.dtype)
    # Per token, 1 / its sequence's valid tokens where a sequence's tokens are summed (0 at invalid
    # tokens), else the valid flag: a flag's scale in the statistics either way (see Returns).
    inv_len = valid.to(lp.dtype)
    if opts.needs_sequences:
        if seq is None:
            raise ValueError(f"seq: sequence slot ids are needed for {opts}")
        inv_len = torch.where(valid, 1.0 / _segment_sum(inv_len, seq).clamp(min=1.0), zero)
    seq_ids = cast(torch.Tensor, seq)  # read below only where opts.needs_sequences (checked above)
    log_w = _segment_sum(lr, seq_ids) * inv_len if opts.sequence_level else lr
    r = torch.exp(log_w)
    stats: Dict[str, torch.Tensor] = {}

    dl_dlp = torch.zeros_like(lp)  # derivative through logp directly
    dl_dr = torch.zeros_like(lp)  # derivative through the ratio r
    t = opts.loss_type
    if t in CLIP_LOSS_TYPES:
        lo, hi = 1.0 - opts.epsilon_low, 1.0 + opts.high
        r2 = torch.clamp(r, lo, hi)
        r1 = r if opts.delta is None else torch.clamp(r, max=opts.delta)
        s1, s2 = r1 * a, r2 * a
        loss = -torch.minimum(s1, s2)
        d1 = a if opts.delta is None else torch.where(r <= opts.delta, a, zero)
        d2 = torch.where((r >= lo) & (r <= hi), a, zero)
        # min's derivative: the smaller side's; half of each at a tie (as autograd's minimum).
        dl_dr = -torch.where(s1 < s2, d1, torch.where(s1 > s2, d2, 0.5 * (d1 + d2)))
        stats["clip_low"] = ((r < lo) & (a < 0)).to(lp.dtype) * inv_len
        stats["clip_high"] = ((r > hi) & (a > 0)).to(lp.dtype) * inv_len
    elif t == "cispo":
        rc = torch.clamp(r, max=opts.high)
        loss = -rc * a * lp
        dl_dlp = -rc * a
        stats["cispo_clip"] = ((r > opts.high) & (a > 0)).to(lp.dtype) * inv_len
    elif t == "sapo":
        tau = torch.where(a > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg).to(lp.dtype)
        sig = torch.sigmoid(tau * (r - 1))
        loss = -(4.0 / tau) * sig * a
        dl_dr = -4.0 * sig * (1 - sig) * a
    else:  # vespo
        log_seq = torch.clamp(lr, -20.0, 20.0)
        if is_ratio is not None:  # here: per-token parts of the sequence's log-ratio (vespo_log_ratio)
            log_seq = log_seq + torch.where(valid, is_ratio.to(lp.dtype), zero)
        log_w_seq = torch.clamp(_segment_sum(torch.where(valid, log_seq, zero), seq_ids), _LOG_1E8, 20.0)
        k = torch.where(a >= 0, opts.vespo_k_pos, opts.vespo_k_neg).to(lp.dtype)
        lam = torch.where(a >= 0, opts.vespo_lambda_pos, opts.vespo_lambda_neg).to(lp.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        loss = -phi * a * lp
        dl_dlp = -phi * a
        stats["phi"] = phi * inv_len
    if is_ratio is not None and t != "vespo":
        ir = torch.where(valid, is_ratio.to(lp.dtype), zero)
        loss, dl_dlp, dl_dr = loss * ir, dl_dlp * ir, dl_dr * ir
    if opts.beta > 0:
        if ref is None:
            raise ValueError(f"ref: the reference's log-probs are needed with beta={opts.beta} > 0")
        d = torch.where(valid, ref.to(lp.dtype), lp) - lp
        ed = torch.exp(d)
        kl, dkl = ed - d - 1, 1 - ed
        if opts.use_bias_correction_kl:
            kl, dkl, dl_dr = kl * r, dkl * r, dl_dr + opts.beta * kl
        loss = loss + opts.beta * kl
        dl_dlp = dl_dlp + opts.beta * dkl
        stats["kl"] = torch.where(valid, kl, zero)
    loss = torch.where(valid, loss, zero)
    stats = {k: torch.where(valid, v, zero) for k, v in stats.items()}
    if weight is None:
        return loss, None, stats
    w = torch.where(valid, weight.to(lp.dtype), zero)
    if opts.sequence_level:
        # r is the sequence's: d r / d logp_t = r / len at each of its valid tokens, so every token's
        # gradient gathers the weighted derivative of the whole sequence.
        grad = w * dl_dlp + r * inv_len * _segment_sum(torch.where(valid, w * dl_dr, zero), seq_ids)
    else:
        grad = w * (dl_dlp + dl_dr * r)
    return loss, torch.where(valid, grad, zero), stats


def policy_token_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[G, S]`` weight of each token's loss (0 at masked tokens): TRL's aggregation as weights.

    * ``grpo``, ``sapo``: ``1 / (G * len_g)`` (mean over sequences of per-sequence means);
    * ``bnpo``: ``1 / sum(mask)``;
    * ``dr_grpo``: ``1 / (G * max_completion_length)`` (default S);
    * ``dapo``, ``cispo``, ``vespo``: ``1 / num_items_in_batch`` (default ``sum(mask)``; pass the step's
      count for exact gradient accumulation);
    * ``luspo``: ``1 / G`` (each sequence's token sum, so its mean loss times its length).

    Counts are clamped to at least 1: no valid token gives weights 0, never NaN.
    """
    m = mask.to(dtype)
    rows = max(mask.shape[0], 1)
    if loss_type in ("grpo", "sapo"):
        w = 1.0 / (rows * m.sum(-1, keepdim=True).clamp(min=1))
    elif loss_type == "bnpo":
        w = 1.0 / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        w = torch.full((), 1.0 / max(rows * length, 1), dtype=dtype, device=mask.device)
    elif loss_type in ("dapo", "cispo", "vespo"):
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=mask.device)
        w = 1.0 / n.to(dtype).clamp(min=1)
    elif loss_type == "luspo":
        w = torch.full((), 1.0 / rows, dtype=dtype, device=mask.device)
    else:
        raise ValueError(f"loss_type: expected one of {POLICY_LOSS_TYPES}, got {loss_type!r}")
    return m * w


def policy_metrics(
    opts: PolicyOptions, sums: Dict[str, torch.Tensor], num_valid: torch.Tensor, num_seqs: int, dtype: torch.dtype
) -> Dict[str, torch.Tensor]:
    """TRL's logged metrics from the summed statistics of :func:`policy_token_terms` (and ``entropy``,
    the summed per-token entropy, when present): token-level means divide by the valid tokens
    ``num_valid`` (0-dim), sequence-level ones by ``num_seqs``. Detached 0-dim tensors in ``dtype``.

    Names: ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio/region`` (clip family), ``cispo_clip_ratio``,
    ``vespo/phi_seq_mean``, ``kl`` (beta > 0), ``entropy``.
    """
    tokens = num_valid.to(dtype).clamp(min=1)
    seqs = float(max(num_seqs, 1))
    flags = seqs if opts.sequence_level else tokens
    out = {}
    if "clip_low" in sums:
        low, high = sums["clip_low"].to(dtype) / flags, sums["clip_high"].to(dtype) / flags
        out.update({"clip_ratio/low": low, "clip_ratio/high": high, "clip_ratio/region": low + high})
    if "cispo_clip" in sums:
        out["cispo_clip_ratio"] = sums["cispo_clip"].to(dtype) / flags
    if "phi" in sums:
        out["vespo/phi_seq_mean"] = sums["phi"].to(dtype) / seqs
    if "kl" in sums:
        out["kl"] = sums["kl"].to(dtype) / tokens
    if "entropy" in sums:
        out["entropy"] = sums["entropy"].to(dtype) / tokens
    return {k: v.detach() for k, v in out.items()}


def importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token_truncate",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> torch.Tensor:
    """The rollout engine's importance-sampling correction, as TRL 1.16 makes it for vLLM rollouts.

    ``d = (old_logps - sampling_logps)`` at valid tokens (0 elsewhere and where ``sampling_logps`` is
    NaN); per token (``token_*``) or summed per sequence (``sequence_*``), ``ratio = exp(d)``; then
    ``*_truncate`` clamps it to ``[clip_min, clip_max]`` (TRL's ``vllm_importance_sampling_cap`` is
    ``clip_max``) and ``*_mask`` sets ratios outside the range to 0.

    Args:
        old_logps, sampling_logps: ``[G, S]`` the trainer's and the rollout engine's log-probs.
        mask: ``[G, S]`` bool, valid tokens.

    Returns:
        ``[G, S]`` (token modes) or ``[G, 1]`` (sequence modes), no gradient: pass it as ``vllm_is_ratio``.
    """
    check_choice("mode", mode, IS_RATIO_MODES)
    with torch.no_grad():
        d = torch.where(mask, old_logps.double() - sampling_logps.double(), 0.0).nan_to_num(nan=0.0)
        if mode.startswith("sequence"):
            d = d.sum(-1, keepdim=True)
        ratio = torch.exp(d)
        if mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        else:
            lo = -math.inf if clip_min is None else clip_min
            hi = math.inf if clip_max is None else clip_max
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        return ratio.to(old_logps.dtype)


def vespo_log_ratio(ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VESPO's use of the rollout ratio as per-token parts ``[G, S]`` of each sequence's log-ratio.

    TRL adds ``sum over the ratio's last dimension of clamp(log ratio, log 1e-8, 20)`` to the sequence's
    log importance weight: per token for a ``[G, S]`` ratio (here over valid tokens only), once for a
    ``[G, 1]`` (or ``[G]``) one. Returned spread evenly over the sequence's valid tokens, so that the
    per-token math sums it back.
    """
    G, S = mask.shape
    ratio = ratio.reshape(G, -1)
    log_r = torch.clamp(torch.log(ratio), _LOG_1E8, 20.0)
    if ratio.shape[1] == S:
        return torch.where(mask, log_r, 0.0)
    per_seq = log_r.sum(-1, keepdim=True)
    return torch.where(mask, per_seq / mask.sum(-1, keepdim=True).clamp(min=1).to(per_seq.dtype), 0.0)


def aggregate_policy_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """Reduce per-token losses ``[G, S]`` over the valid tokens ``mask`` to a 0-dim loss with the
    weights of :func:`policy_token_weights`. No valid token gives 0, never NaN."""
    w = policy_token_weights(
        mask,
        loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        dtype=token_losses.dtype,
    )
    return torch.where(mask, token_losses * w, torch.zeros_like(token_losses)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty), detached, in ``dtype``."""
    x = x.detach().to(dtype)
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)
