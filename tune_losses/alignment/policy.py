"""Policy-optimization losses (the GRPO family): TRL 1.16's ``GRPOTrainer`` losses, fused.

:func:`linear_policy_loss` takes a group of completions' final hidden states ``[G, S, H]``, the output
weight, labels ``[G, S]`` (completion tokens; ``ignore_index`` at prompt and padding) and one advantage
per completion ``[G]``. Two paths, same math (:mod:`tune_losses.alignment.policy_formulas`):

* grad-in-forward (the default where it applies): one engine term
  (:mod:`tune_losses.alignment.policy_term`) computes each token's loss and its logit gradient while
  the chunk's logits exist (3 matmuls: logits, dX, dW). Plain (or FSDP2-gathered) weights on one
  device, a gradient wanted; sequence-level losses (``importance_sampling_level="sequence"``,
  ``vespo``) chunk by whole sequences, when a sequence's logits fit in a few default chunks;
* recompute: per-token log-probabilities from :func:`tune_losses.linear_log_probs` (its backward
  makes each chunk's logits again: 4 matmuls), then the formula over ``[G, S]``
  (:func:`policy_loss_from_log_probs`). Vocabulary-parallel weights, very long sequences with a
  sequence-level loss, ``algorithm="recompute"``, and log-probs from elsewhere take it.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from tune_losses.alignment import pair_chunks
from tune_losses.alignment.log_probs import _check_hidden, token_log_probs
from tune_losses.alignment.policy_formulas import (
    POLICY_LOSS_TYPES,
    PolicyOptions,
    policy_metrics,
    policy_token_terms,
    policy_token_weights,
    vespo_log_ratio,
)
from tune_losses.alignment.policy_term import (
    PolicyTerm,
    run_policy_term,
    sequence_chunk_size,
    stat_names,
)
from tune_losses.alignment.preference import check_count
from tune_losses.fused.engine import compute_dtype
from tune_losses.options import check_bool_option, check_choice, check_float_option, check_int_option
from tune_losses.validation import check_label_range

ALGORITHMS = ("auto", "grad_in_forward", "recompute")


class PolicyOutput(NamedTuple):
    """Result of :func:`linear_policy_loss`: ``loss`` (0-dim, differentiable) and detached 0-dim
    ``metrics`` (TRL's logged values): ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio/region``
    (clip family: fractions of valid tokens, or of sequences with sequence-level importance
    sampling, whose ratio the clip cut off where it removes the gradient), ``cispo_clip_ratio``
    (cispo), ``vespo/phi_seq_mean`` (vespo), ``kl`` (mean KL term over valid tokens, when
    ``beta > 0``), ``entropy`` (mean policy entropy over valid tokens, when computed)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def check_policy_options(loss_type, beta, epsilon_low, epsilon_high, temperature, max_completion_length, **more):
    """Raise a ValueError / TypeError naming the first bad option; return the :class:`PolicyOptions`.

    ``more``: the other :class:`PolicyOptions` fields by name (``delta``, ``importance_sampling_level``, ...).
    """
    check_choice("loss_type", loss_type, POLICY_LOSS_TYPES)
    check_float_option("epsilon_low", epsilon_low, 0.0, 1.0)
    check_float_option("epsilon_high", epsilon_high, 0.0, allow_none=True)
    check_float_option("temperature", temperature, 0.0, low_open=True)
    check_int_option("max_completion_length", max_completion_length, 1, allow_none=True)
    if "use_bias_correction_kl" in more:
        check_bool_option("use_bias_correction_kl", more["use_bias_correction_kl"])
    eh = epsilon_low if epsilon_high is None else epsilon_high
    return PolicyOptions(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=eh, beta=beta, **more)


def _check_like(name: str, t, shapes, device) -> torch.Tensor:
    """``t`` a floating-point tensor of one of ``shapes``; detached, on ``device``."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) not in shapes:
        got = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name}: expected a floating-point tensor of shape {want}, got {got}")
    return t.detach().to(device)


def _token_inputs(
    opts: PolicyOptions,
    labels: torch.Tensor,
    advantages,
    old_logps,
    ref_logps,
    vllm_is_ratio,
    ignore_index: int,
    max_completion_length,
    num_items_in_batch,
    device: torch.device,
    dtype: torch.dtype,
) -> Dict[str, torch.Tensor]:
    """Every per-token side input ``[G, S]`` of the policy math, checked, in ``dtype``:
    ``advantages``, ``token_weights``, and where given / needed ``old_logps``, ``ref_logps``,
    ``is_ratio``, ``seq``. Values at ignored tokens are kept (the math never reads them)."""
    G, S = labels.shape
    mask = labels != ignore_index
    adv = _check_like("advantages", advantages, [(G,), (G, S)], device).to(dtype)
    out = {"advantages": (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand(G, S)}
    if old_logps is not None:
        out["old_logps"] = _check_like("old_logps", old_logps, [(G, S)], device).to(dtype)
    if opts.beta > 0:
        if ref_logps is None:
            raise ValueError(
                f"ref_logps: expected the reference's per-token log-probs [G, S] with beta={opts.beta} > 0, got None"
            )
        out["ref_logps"] = _check_like("ref_logps", ref_logps, [(G, S)], device).to(dtype)
    if vllm_is_ratio is not None:
        ratio = _check_like("vllm_is_ratio", vllm_is_ratio, [(G,), (G, 1), (G, S)], device).to(dtype)
        if opts.loss_type == "vespo":
            out["is_ratio"] = vespo_log_ratio(ratio, mask)
        else:
            out["is_ratio"] = ratio.reshape(G, -1).expand(G, S)
    out["token_weights"] = policy_token_weights(
        mask,
        opts.loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        dtype=dtype,
    )
    if opts.needs_sequences:
        out["seq"] = torch.arange(G, device=device).unsqueeze(-1).expand(G, S)
    return out


class _PolicyFromLogProbs(torch.autograd.Function):
    """``sum(token_weights * l(logps))`` over flat tokens, its closed-form gradient made in forward
    (elementwise, ``[n]``); also returns the statistics ``[k, n]`` (not differentiable)."""

    @staticmethod
    def forward(ctx, logps, valid, opts: PolicyOptions, names, inputs: Dict[str, torch.Tensor]):
        weight = inputs["token_weights"]
        loss, grad, stats = policy_token_terms(
            opts,
            logps.detach(),
            inputs.get("old_logps", logps.detach()),
            inputs["advantages"],
            valid,
            ref=inputs.get("ref_logps"),
            is_ratio=inputs.get("is_ratio"),
            seq=inputs.get("seq"),
            weight=weight,
        )
        ctx.save_for_backward(grad)
        total = (loss * weight).sum()
        stacked = torch.stack([stats[k] for k in names]) if names else logps.new_zeros(0, logps.shape[0])
        ctx.mark_non_differentiable(stacked)
        return total, stacked

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def policy_loss_from_log_probs(
    logps: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    loss_type: str = "grpo",
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    vllm_is_ratio: Optional[torch.Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
) -> PolicyOutput:
    """The policy loss from per-token log-probabilities ``logps [G, S]`` (any source; differentiable).

    ``entropy [G, S]`` (optional) only feeds the ``entropy`` metric. Other arguments: as
    :func:`linear_policy_loss`.
    """
    opts = check_policy_options(
        loss_type, beta, epsilon_low, epsilon_high, 1.0, max_completion_length, **_more(locals())
    )
    check_count("num_items_in_batch", num_items_in_batch)
    _check_labels(labels)
    if not isinstance(logps, torch.Tensor) or tuple(logps.shape) != tuple(labels.shape):
        got = tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__
        raise ValueError(f"logps: expected shape {tuple(labels.shape)} (labels'), got {got}")
    dtype = logps.dtype if logps.is_floating_point() else torch.float32
    inputs = _token_inputs(
        opts,
        labels,
        advantages,
        old_logps,
        ref_logps,
        vllm_is_ratio,
        ignore_index,
        max_completion_length,
        num_items_in_batch,
        logps.device,
        dtype,
    )
    mask = labels != ignore_index
    names = stat_names(opts, False)
    flat = {k: v.reshape(-1) for k, v in inputs.items()}
    loss, stacked = _PolicyFromLogProbs.apply(logps.reshape(-1), mask.reshape(-1), opts, names, flat)
    sums = {k: stacked[i].sum() for i, k in enumerate(names)}
    if entropy is not None:
        sums["entropy"] = torch.where(mask, entropy.detach().to(dtype), 0.0).sum()
    return PolicyOutput(loss, policy_metrics(opts, sums, mask.sum(), labels.shape[0], loss.dtype))


POLICY_MODULE_OPTIONS = (
    "delta",
    "importance_sampling_level",
    "use_bias_correction_kl",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
)
"""The :class:`PolicyOptions` fields beyond the ones :func:`check_policy_options` names."""


def _more(args: dict) -> dict:
    return {k: args[k] for k in POLICY_MODULE_OPTIONS}


def _check_labels(labels) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            f"labels: expected a [G, S] tensor, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )


def _fused_chunk_size(opts, hidden, weight, labels, chunk_size) -> Tuple[bool, Optional[int]]:
    """Whether the grad-in-forward path can chunk these inputs, and its chunk size."""
    if not opts.needs_sequences:
        return True, chunk_size
    G, S = labels.shape
    size = sequence_chunk_size(G * S, S, weight.shape[0], hidden.device, hidden.shape[-1], chunk_size)
    return size is not None, size


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    loss_type: str = "grpo",
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    vllm_is_ratio: Optional[torch.Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    temperature: float = 1.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    return_entropy: bool = True,
    algorithm: str = "auto",
    validate: bool = True,
) -> PolicyOutput:
    """Fused GRPO-family policy loss (TRL 1.16 ``GRPOTrainer`` definitions) with its metrics.

    Args:
        hidden: ``[G, S, H]`` the policy's final hidden states for G completions.
        weight: ``[V, H]`` output projection; bias ``[V]`` or None.
        labels: ``[G, S]`` completion tokens aligned with ``hidden``; ``ignore_index`` elsewhere.
        advantages: ``[G]`` one advantage per completion (or ``[G, S]`` per token).
        loss_type: ``grpo`` (mean over sequences of per-sequence means), ``bnpo`` (sum / valid
            tokens), ``dr_grpo`` (sum / (G * max_completion_length, default S)), ``dapo`` (sum /
            ``num_items_in_batch``, default the valid tokens: pass the step's global count for exact
            gradient accumulation), ``cispo`` (clipped, detached ratio times log-prob; dapo's
            normalization), ``sapo`` (sigmoid gate; grpo's), ``luspo`` (clipped; each sequence's
            token sum, mean over sequences), ``vespo`` (gamma-weighted log-prob; dapo's). Formulas:
            :mod:`tune_losses.alignment.policy_formulas`.
        old_logps: ``[G, S]`` log-probs of the policy that sampled (default: the current ones,
            detached: ratio 1, the on-policy case).
        ref_logps: ``[G, S]`` the reference's log-probs; needed when ``beta > 0``.
        beta: weight of the k3 KL estimate ``exp(ref - logp) - (ref - logp) - 1``.
        epsilon_low, epsilon_high: the clip range ``[1 - eps_low, 1 + eps_high]`` (high defaults to
            low); for ``cispo``, ``epsilon_high`` is the ratio's cap (TRL recommends 5.0).
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio capped at ``delta`` (clip family).
        importance_sampling_level: ``token``, or ``sequence`` (GSPO: each sequence's ratio is the exp of
            its mean log-ratio), with any loss type as TRL allows.
        use_bias_correction_kl: multiply the KL term by the (unclipped) ratio (DeepSeek-V3.2).
        vllm_is_ratio: ``[G, S]``, ``[G, 1]`` or ``[G]`` importance-sampling correction for rollouts from
            another engine (already truncated / masked:
            :func:`tune_losses.alignment.policy_formulas.importance_sampling_ratio` makes it as TRL does);
            multiplies the policy term (``vespo``: enters its sequence weight).
        sapo_temperature_pos, sapo_temperature_neg, vespo_*: those losses' parameters (TRL's defaults).
        temperature: logits are divided by it before the log-softmax (as at sampling).
        chunk_size: tokens per chunk of the engine's loop (None: its default; a sequence-level loss
            rounds it down to whole sequences).
        return_entropy: also compute the per-token entropy for the ``entropy`` metric (one more
            reduction over the vocabulary per chunk; False skips it).
        algorithm: ``auto`` (grad-in-forward where it applies, see the module docstring),
            ``grad_in_forward`` (an error where it does not apply) or ``recompute``.
        validate: check the label range (one host sync per call).

    Returns:
        :class:`PolicyOutput` ``(loss, metrics)``; the loss in fp32 (fp64 for fp64 inputs).
    """
    opts = check_policy_options(
        loss_type, beta, epsilon_low, epsilon_high, temperature, max_completion_length, **_more(locals())
    )
    check_count("num_items_in_batch", num_items_in_batch)
    check_choice("algorithm", algorithm, ALGORITHMS)
    check_bool_option("return_entropy", return_entropy)
    _check_labels(labels)
    fused = algorithm != "recompute" and pair_chunks.applies(hidden, weight, bias, labels, None, None, None)
    size = chunk_size
    if fused:
        fused, size = _fused_chunk_size(opts, hidden, weight, labels, chunk_size)
    if algorithm == "grad_in_forward" and not fused:
        raise ValueError(
            "algorithm: 'grad_in_forward' needs plain (or FSDP2) tensors on one device with a gradient wanted, "
            "and for a sequence-level loss sequences short enough to chunk whole; use 'auto' or 'recompute'"
        )
    if not fused:
        out = token_log_probs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
        )
        logps, entropy = out if return_entropy else (out, None)
        return policy_loss_from_log_probs(
            logps,
            labels,
            advantages,
            entropy=None if entropy is None else entropy.detach(),
            old_logps=old_logps,
            ref_logps=ref_logps,
            vllm_is_ratio=vllm_is_ratio,
            max_completion_length=max_completion_length,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            **{k: getattr(opts, k) for k in PolicyOptions.__dataclass_fields__},
        )
    _check_hidden("hidden", hidden, labels)
    w, b = pair_chunks.local_weights(weight, bias, hidden.dtype)
    if validate:
        check_label_range(labels, w.shape[0], ignore_index)
    dtype = compute_dtype(hidden.dtype)
    inputs = _token_inputs(
        opts,
        labels,
        advantages,
        old_logps,
        ref_logps,
        vllm_is_ratio,
        ignore_index,
        max_completion_length,
        num_items_in_batch,
        hidden.device,
        dtype,
    )
    term = PolicyTerm(
        opts=opts,
        temperature=float(temperature),
        entropy=bool(return_entropy),
        has_ratio=vllm_is_ratio is not None,
    )
    flat = {k: v.reshape(-1) for k, v in inputs.items()}
    x = hidden.reshape(-1, hidden.shape[-1])
    loss, sums = run_policy_term(x, w, b, labels.reshape(-1), term, flat, ignore_index=ignore_index, chunk_size=size)
    mask = labels != ignore_index
    return PolicyOutput(loss, policy_metrics(opts, sums, mask.sum(), labels.shape[0], loss.dtype))
