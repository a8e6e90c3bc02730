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
  sequence-level loss, ``execution.algorithm="recompute"``, and log-probs from elsewhere take it.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from tune_losses.alignment import pair_chunks
from tune_losses.alignment.log_probs import _check_hidden, run_options, token_log_probs
from tune_losses.alignment.policy_formulas import (
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
from tune_losses.deprecation import no_more, options_object, take
from tune_losses.fused.engine import compute_dtype
from tune_losses.fused.valid_rows import select_valid_rows
from tune_losses.options import IGNORE_INDEX, ExecutionOptions, check_int_option
from tune_losses.validation import check_label_range


class PolicyOutput(NamedTuple):
    """Result of :func:`linear_policy_loss`: ``loss`` (0-dim, differentiable) and detached 0-dim
    ``metrics`` (TRL's logged values): ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio/region``
    (clip family: fractions of valid tokens, or of sequences with sequence-level importance
    sampling, whose ratio the clip cut off where it removes the gradient), ``cispo_clip_ratio``
    (cispo), ``vespo/phi_seq_mean`` (vespo), ``kl`` (mean KL term over valid tokens, when
    ``beta > 0``), ``entropy`` (mean policy entropy over valid tokens, when computed)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def _check_like(name: str, t, shapes, device) -> torch.Tensor:
    """``t`` a floating-point tensor of one of ``shapes``; detached, on ``device``."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) not in shapes:
        got = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name}: expected a floating-point tensor of shape {want}, got {got}")
    return t.detach().to(device)


class PolicyBatch(NamedTuple):
    """One call's per-completion tensors and counts, as the public functions take them (see
    :func:`linear_policy_loss`); checked by :func:`_token_inputs`."""

    labels: torch.Tensor
    advantages: torch.Tensor
    old_logps: Optional[torch.Tensor]
    ref_logps: Optional[torch.Tensor]
    vllm_is_ratio: Optional[torch.Tensor]
    num_items_in_batch: object
    ignore_index: int


def _token_inputs(
    opts: PolicyOptions, batch: PolicyBatch, device: torch.device, dtype: torch.dtype
) -> Dict[str, torch.Tensor]:
    """Every per-token side input ``[G, S]`` of the policy math, checked, in ``dtype``:
    ``advantages``, ``token_weights``, and where given / needed ``old_logps``, ``ref_logps``,
    ``is_ratio``, ``seq``. Values at ignored tokens are kept (the math never reads them)."""
    labels, advantages, old_logps, ref_logps, vllm_is_ratio, num_items_in_batch, ignore_index = batch
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
        max_completion_length=opts.max_completion_length,
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


_EXECUTION_FIELDS = ("algorithm", "drop_ignored_tokens", "dw_accumulation")
_POLICY_FIELDS = tuple(PolicyOptions.__dataclass_fields__)


def _check_labels(labels) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            f"labels: expected a [G, S] tensor, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )


def _policy_options(fn: str, options, deprecated: dict) -> PolicyOptions:
    return options_object(fn, "options", PolicyOptions, options, take(deprecated, _POLICY_FIELDS))


def policy_loss_from_log_probs(
    logps: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    vllm_is_ratio: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    options: Optional[PolicyOptions] = None,
    **deprecated,
) -> PolicyOutput:
    """The policy loss from per-token log-probabilities ``logps [G, S]`` (any source; differentiable).

    ``entropy [G, S]`` (optional) only feeds the ``entropy`` metric. ``options``: a
    :class:`PolicyOptions` (its ``temperature``, ``return_entropy`` and ``validate`` are not read
    here). Other arguments: as :func:`linear_policy_loss`; the old flat option keywords still work,
    with a DeprecationWarning.
    """
    fn = "policy_loss_from_log_probs"
    opts = _policy_options(fn, options, deprecated)
    no_more(fn, deprecated)
    check_count("num_items_in_batch", num_items_in_batch)
    check_int_option("ignore_index", ignore_index)
    _check_labels(labels)
    if not isinstance(logps, torch.Tensor) or tuple(logps.shape) != tuple(labels.shape):
        got = tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__
        raise ValueError(f"logps: expected shape {tuple(labels.shape)} (labels'), got {got}")
    batch = PolicyBatch(labels, advantages, old_logps, ref_logps, vllm_is_ratio, num_items_in_batch, ignore_index)
    return _from_log_probs(opts, logps, entropy, batch)


def _from_log_probs(
    opts: PolicyOptions, logps: torch.Tensor, entropy: Optional[torch.Tensor], batch: PolicyBatch
) -> PolicyOutput:
    """:func:`policy_loss_from_log_probs` once its arguments are checked."""
    labels = batch.labels
    dtype = logps.dtype if logps.is_floating_point() else torch.float32
    inputs = _token_inputs(opts, batch, logps.device, dtype)
    mask = labels != batch.ignore_index
    names = stat_names(opts, False)
    flat = {k: v.reshape(-1) for k, v in inputs.items()}
    loss, stacked = _PolicyFromLogProbs.apply(logps.reshape(-1), mask.reshape(-1), opts, names, flat)
    sums = {k: stacked[i].sum() for i, k in enumerate(names)}
    if entropy is not None:
        sums["entropy"] = torch.where(mask, entropy.detach().to(dtype), 0.0).sum()
    return PolicyOutput(loss, policy_metrics(opts, sums, mask.sum(), labels.shape[0], loss.dtype))


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
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    vllm_is_ratio: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    num_items_in_batch=None,
    options: Optional[PolicyOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> PolicyOutput:
    """Fused GRPO-family policy loss (TRL 1.16 ``GRPOTrainer`` definitions) with its metrics.

    Args:
        hidden: ``[G, S, H]`` the policy's final hidden states for G completions.
        weight: ``[V, H]`` output projection; bias ``[V]`` or None.
        labels: ``[G, S]`` completion tokens aligned with ``hidden``; ``ignore_index`` elsewhere.
        advantages: ``[G]`` one advantage per completion (or ``[G, S]`` per token).
        old_logps: ``[G, S]`` log-probs of the policy that sampled (default: the current ones,
            detached: ratio 1, the on-policy case).
        ref_logps: ``[G, S]`` the reference's log-probs; needed when ``options.beta > 0``.
        vllm_is_ratio: ``[G, S]``, ``[G, 1]`` or ``[G]`` importance-sampling correction for rollouts from
            another engine (already truncated / masked:
            :func:`tune_losses.alignment.policy_formulas.importance_sampling_ratio` makes it as TRL does);
            multiplies the policy term (``vespo``: enters its sequence weight).
        chunk_size: tokens per chunk (None: the engine's rule). A sequence-level loss
            (``importance_sampling_level="sequence"``, ``vespo``) holds whole sequences in a chunk: as
            many as fit in ``chunk_size`` tokens, at least one; a sequence longer than 4 chunks takes
            the per-token path, whose chunks are ``chunk_size`` tokens.
        num_items_in_batch: ``dapo`` / ``cispo`` / ``vespo``'s normalizer (default: the valid tokens;
            pass the step's global count for exact gradient accumulation).
        options: :class:`PolicyOptions`: ``loss_type``, ``beta``, the clip range, ``delta``,
            ``importance_sampling_level``, ``use_bias_correction_kl``, the SAPO / VESPO parameters,
            ``temperature``, ``max_completion_length``, ``return_entropy`` (the ``entropy`` metric)
            and ``validate`` (the label range, one host sync per call).
        execution: :class:`~tune_losses.options.ExecutionOptions`: ``algorithm`` (``auto``:
            grad-in-forward where it applies, see the module docstring; ``grad_in_forward``: that
            or a ValueError; ``recompute``), ``dw_accumulation``, ``drop_ignored_tokens`` (the
            per-token path and token-level losses on the grad-in-forward path).
        deprecated: the old flat keywords (the :class:`PolicyOptions` fields, ``algorithm``) still
            work, with a DeprecationWarning naming the new form.

    Returns:
        :class:`PolicyOutput` ``(loss, metrics)``; the loss in fp32 (fp64 for fp64 inputs).
    """
    fn = "linear_policy_loss"
    opts = _policy_options(fn, options, deprecated)
    execution = options_object(fn, "execution", ExecutionOptions, execution, take(deprecated, _EXECUTION_FIELDS))
    no_more(fn, deprecated)
    check_count("num_items_in_batch", num_items_in_batch)
    _check_labels(labels)
    run = run_options(chunk_size, ignore_index, opts.validate, execution)
    batch = PolicyBatch(labels, advantages, old_logps, ref_logps, vllm_is_ratio, num_items_in_batch, ignore_index)
    algorithm = execution.algorithm
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
            hidden, weight, bias, labels, run, temperature=opts.temperature, return_entropy=opts.return_entropy
        )
        logps, entropy = out if isinstance(out, tuple) else (out, None)
        return _from_log_probs(opts, logps, None if entropy is None else entropy.detach(), batch)
    _check_hidden("hidden", hidden, labels)
    w, b = pair_chunks.local_weights(weight, bias, hidden.dtype)
    if opts.validate:
        check_label_range(labels, w.shape[0], ignore_index)
    inputs = _token_inputs(opts, batch, hidden.device, compute_dtype(hidden.dtype))
    flat = {k: v.reshape(-1) for k, v in inputs.items()}
    x, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if execution.drop_ignored_tokens and not opts.needs_sequences:
        # Whole sequences stay whole for a sequence-level loss; a token-level one reads no neighbour.
        x, _, flat_labels, keep = select_valid_rows(x, None, flat_labels, ignore_index)
        if keep is not None:
            flat = {k: v.index_select(0, keep) for k, v in flat.items()}
    term = PolicyTerm(opts=opts, has_ratio=vllm_is_ratio is not None)
    loss, sums = run_policy_term(
        x, w, b, flat_labels, term, flat, ignore_index=ignore_index, chunk_size=size,
        dw_accumulation=execution.dw_accumulation,
    )  # fmt: skip
    mask = labels != ignore_index
    return PolicyOutput(loss, policy_metrics(opts, sums, mask.sum(), labels.shape[0], loss.dtype))
