"""Preference losses (the DPO family), fused: no ``[2B, S, V]`` logits.

:func:`linear_preference_loss` takes the policy's final hidden states and output weight. Two paths,
same values and gradients (the loss formula, :mod:`tune_losses.alignment.formulas`, runs on ``[B]``
sequence log-probabilities either way):

* grad-in-forward over chunks of whole pairs (:mod:`tune_losses.alignment.pair_chunks`; the default
  where it applies: plain tensors, a gradient wanted, every pair within a chunk): each chunk's logits
  made once, over valid tokens only, its gradient taken in forward;
* per-token (everything else, ``algorithm="recompute"``): per-token log-probabilities from
  :func:`tune_losses.linear_log_probs` (the engine's one chunk loop), their masked sum (or mean), and
  autograd carries each token's weight back into the loop, whose backward makes each chunk again.

Batch layout (torchtune's ``padded_collate_dpo``): hidden ``[2B, S, H]``, labels ``[2B, S]``, the B
chosen sequences first, then the B rejected ones, labels already aligned with the hidden states and
``ignore_index`` at prompt and padding tokens.

A pair counts when both its sequences have at least one valid token; the loss is the mean over
counted pairs (0, with zero gradients, when none counts), so a mean log-probability is never 0 / 0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from tune_losses.alignment.formulas import (
    LABEL_SMOOTHING_TYPES,
    MEAN_LOG_PROB_TYPES,
    PREFERENCE_LOSS_TYPES,
    counted_pair_losses,
    sequence_log_probs,
    split_pairs,
)
from tune_losses.alignment.log_probs import token_log_probs
from tune_losses.alignment.pair_chunks import (
    PairChunkedPreference,
    PairOptions,
    applies,
    default_row_budget,
    local_weights,
    pair_chunk_layout,
)
from tune_losses.fused.engine import compute_dtype
from tune_losses.options import check_choice, check_float_option
from tune_losses.validation import LABEL_DTYPES, check_label_range

ALGORITHMS = ("auto", "grad_in_forward", "recompute")
_OPTION_NAMES = (
    "loss_type",
    "beta",
    "gamma",
    "label_smoothing",
    "discopop_tau",
    "nll_weight",
    "ref_logps",
    "average_log_prob",
    "nll_target",
)


class PreferenceOutput(NamedTuple):
    """Result of :func:`linear_preference_loss`.

    ``loss`` is 0-dim and differentiable; the rest are detached, in the loss's dtype (fp32, or fp64
    for fp64 inputs): rewards
    ``beta (policy - reference)`` and the policy's sequence log-probabilities ``[B]``, and ``nll``
    (0-dim), the chosen sequences' mean negative log-likelihood per valid token.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll: torch.Tensor


class PreferenceTerms(NamedTuple):
    """The sums and counts a preference loss is made of, for exact normalization by a trainer.

    ``loss = pair_loss_sum / num_pairs + nll_weight * nll_sum / num_chosen_tokens`` where the counts
    may be a whole optimizer step's (all micro-batches, all data-parallel ranks).
    ``pair_loss_sum`` and ``nll_sum`` are 0-dim and differentiable; counts 0-dim int64; ``counted``
    ``[B]`` bool marks the pairs that count (both sequences have a valid token); the rest as in
    :class:`PreferenceOutput` (detached).
    """

    pair_loss_sum: torch.Tensor
    num_pairs: torch.Tensor
    nll_sum: torch.Tensor
    num_chosen_tokens: torch.Tensor
    nll_weight: float
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    counted: torch.Tensor

    def loss(self, num_pairs=None, num_chosen_tokens=None) -> torch.Tensor:
        """The loss, normalized by these counts or by the given (e.g. step-global) ones."""
        check_count("num_pairs", num_pairs)
        check_count("num_chosen_tokens", num_chosen_tokens)
        pairs = self.num_pairs if num_pairs is None else torch.as_tensor(num_pairs, device=self.num_pairs.device)
        tokens = (
            self.num_chosen_tokens
            if num_chosen_tokens is None
            else torch.as_tensor(num_chosen_tokens, device=self.num_pairs.device)
        )
        dtype = self.pair_loss_sum.dtype
        loss = self.pair_loss_sum / pairs.clamp(min=1).to(dtype)
        if self.nll_weight:
            loss = loss + self.nll_weight * (self.nll_sum / tokens.clamp(min=1).to(dtype))
        return loss

    def output(self, num_pairs=None, num_chosen_tokens=None) -> PreferenceOutput:
        nll = self.nll_sum.detach() / self.num_chosen_tokens.clamp(min=1).to(self.nll_sum.dtype)
        return PreferenceOutput(
            self.loss(num_pairs, num_chosen_tokens),
            self.chosen_rewards,
            self.rejected_rewards,
            self.chosen_logps,
            self.rejected_logps,
            nll,
        )


def check_preference_options(
    loss_type: str,
    beta: float,
    gamma: float,
    label_smoothing: float,
    nll_weight: float,
    discopop_tau: float = 0.05,
) -> None:
    """Raise a ValueError / TypeError naming the first bad option (finite numbers only)."""
    check_choice("loss_type", loss_type, PREFERENCE_LOSS_TYPES)
    check_float_option("beta", beta, 0.0, low_open=True)
    check_float_option("gamma", gamma)
    check_float_option("label_smoothing", label_smoothing, 0.0, 1.0)
    check_float_option("discopop_tau", discopop_tau, 0.0, low_open=True)
    if label_smoothing and loss_type not in LABEL_SMOOTHING_TYPES:
        raise ValueError(
            f"label_smoothing: only the {LABEL_SMOOTHING_TYPES} losses take it, got "
            f"{label_smoothing} with loss_type={loss_type!r}"
        )
    if loss_type in ("sigmoid", "simpo") and label_smoothing > 0.5:
        raise ValueError(
            f"label_smoothing: expected a value in [0, 0.5] for loss_type={loss_type!r}, got {label_smoothing}"
        )
    if loss_type == "robust" and label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"label_smoothing: expected a value in (0, 1) for loss_type='exo_pair' (the EXO paper uses 1e-3), "
            f"got {label_smoothing}"
        )
    check_float_option("nll_weight", nll_weight, 0.0)


def check_count(name: str, count) -> None:
    """A normalizing count given by the caller: a tensor (not read: no host sync) or a number >= 1."""
    if count is not None and not isinstance(count, torch.Tensor):
        check_float_option(name, count, 1.0)


def _check_pair_labels(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a [2B, S] tensor (chosen rows, then rejected rows), got {got}")
    if labels.shape[0] % 2:
        raise ValueError(
            f"labels: expected an even number of rows [2B, S] (B chosen, then B rejected), "
            f"got shape {tuple(labels.shape)}"
        )


def _check_ref_logps(ref_logps, batch: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ref_logps, (tuple, list)) or len(ref_logps) != 2:
        raise ValueError(
            f"ref_logps: expected a pair (ref_chosen [B], ref_rejected [B]), got {type(ref_logps).__name__}"
        )
    out = []
    for name, t in zip(("ref_logps[0] (chosen)", "ref_logps[1] (rejected)"), ref_logps):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (batch,):
            got = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a floating-point tensor of shape ({batch},), got {got}")
        out.append(t.detach().to(device))
    return out[0], out[1]


def preference_terms(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    nll_weight: float = 0.0,
    ref_token_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[Sequence[torch.Tensor]] = None,
    average_log_prob: Optional[bool] = None,
    nll_target: Optional[torch.Tensor] = None,
    nll_token_logps: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> PreferenceTerms:
    """Preference-loss sums and counts from per-token log-probabilities (any source).

    Args:
        token_logps: ``[2B, S]`` the policy's log-probabilities of the labels (differentiable).
        labels: ``[2B, S]``, chosen rows first; ``ignore_index`` marks tokens that do not count.
        ref_token_logps: ``[2B, S]`` the reference's per-token log-probabilities, or
        ref_logps: ``(ref_chosen [B], ref_rejected [B])`` sequence log-probabilities, or neither
            (a zero reference).
        nll_target: ``[2B, S]`` other labels for the NLL term (ORPO's ``nll_target``; rejected rows not
            read), with
        nll_token_logps: ``[B, S]`` the policy's log-probabilities of the chosen rows' ``nll_target``
            (differentiable).
        Other arguments: as :func:`linear_preference_loss`.
    """
    check_preference_options(loss_type, beta, gamma, label_smoothing, nll_weight, discopop_tau)
    _check_pair_labels(labels)
    if token_logps.shape != labels.shape:
        raise ValueError(
            f"token_logps: expected shape {tuple(labels.shape)} (as labels), got {tuple(token_logps.shape)}"
        )
    if ref_token_logps is not None and ref_logps is not None:
        raise ValueError(
            "ref_logps: give the reference either as hidden states / per-token log-probs or as "
            "sequence log-probs, not both"
        )
    average = loss_type in MEAN_LOG_PROB_TYPES if average_log_prob is None else bool(average_log_prob)
    batch = labels.shape[0] // 2
    mask = labels != ignore_index

    seq = sequence_log_probs(token_logps, mask, average)
    chosen, rejected = split_pairs(seq)
    if ref_token_logps is not None:
        if ref_token_logps.shape != labels.shape:
            raise ValueError(
                f"ref_token_logps: expected shape {tuple(labels.shape)}, got {tuple(ref_token_logps.shape)}"
            )
        ref_c, ref_r = split_pairs(sequence_log_probs(ref_token_logps.detach().to(seq.dtype), mask, average))
    elif ref_logps is not None:
        ref_c, ref_r = _check_ref_logps(ref_logps, batch, seq.device)
        ref_c, ref_r = ref_c.to(seq.dtype), ref_r.to(seq.dtype)
    else:
        ref_c = ref_r = torch.zeros_like(chosen).detach()

    n_c, n_r = split_pairs(mask.sum(dim=-1))
    counted = (n_c > 0) & (n_r > 0)
    per_pair = counted_pair_losses(
        chosen,
        rejected,
        ref_c,
        ref_r,
        counted,
        loss_type=loss_type,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
    )
    mask_c, _ = split_pairs(mask)
    logps_c, _ = split_pairs(token_logps)
    if nll_target is not None:
        mask_c, logps_c = _nll_rows(nll_target, nll_token_logps, labels, ignore_index)
    nll_sum = -torch.where(mask_c, logps_c, torch.zeros_like(logps_c)).sum()
    return sequence_terms(
        chosen,
        rejected,
        ref_c,
        ref_r,
        counted,
        per_pair.sum(),
        nll_sum,
        mask_c.sum(),
        loss_type=loss_type,
        beta=beta,
        nll_weight=nll_weight,
    )


def check_nll_target(nll_target, labels: torch.Tensor) -> None:
    """ORPO's separate NLL labels: an integer tensor shaped as the preference labels ``[2B, S]``."""
    if not isinstance(nll_target, torch.Tensor) or tuple(nll_target.shape) != tuple(labels.shape):
        got = tuple(nll_target.shape) if isinstance(nll_target, torch.Tensor) else type(nll_target).__name__
        raise ValueError(
            f"nll_target: expected a [2B, S] tensor of shape {tuple(labels.shape)} (as labels; the rejected "
            f"rows are not read), got {got}"
        )
    if nll_target.dtype not in LABEL_DTYPES:
        raise ValueError(f"nll_target: expected an int64 or int32 tensor, got {nll_target.dtype}")


def _nll_rows(nll_target, nll_token_logps, labels, ignore_index) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mask [B, S], log-probs [B, S])`` of the chosen rows at ``nll_target``."""
    check_nll_target(nll_target, labels)
    batch = labels.shape[0] // 2
    if nll_token_logps is None or tuple(nll_token_logps.shape) != (batch, labels.shape[1]):
        got = None if nll_token_logps is None else tuple(nll_token_logps.shape)
        raise ValueError(
            f"nll_token_logps: expected the chosen rows' log-probabilities at nll_target, shape "
            f"{(batch, labels.shape[1])}, got {got}"
        )
    return nll_target[:batch] != ignore_index, nll_token_logps


def sequence_terms(
    chosen,
    rejected,
    ref_chosen,
    ref_rejected,
    counted,
    pair_loss_sum,
    nll_sum,
    num_chosen_tokens,
    *,
    loss_type: str,
    beta: float,
    nll_weight: float,
) -> PreferenceTerms:
    """:class:`PreferenceTerms` from the sequence log-probabilities ``[B]`` (policy, reference), the pairs
    that count ``[B]`` and the two sums (0-dim, differentiable or not)."""
    weight = nll_weight + (1.0 if loss_type == "orpo" else 0.0)  # ORPO's loss includes the chosen NLL
    return PreferenceTerms(
        pair_loss_sum=pair_loss_sum,
        num_pairs=counted.sum(),
        nll_sum=nll_sum,
        num_chosen_tokens=num_chosen_tokens,
        nll_weight=weight,
        chosen_rewards=(beta * (chosen - ref_chosen)).detach(),
        rejected_rewards=(beta * (rejected - ref_rejected)).detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
        counted=counted,
    )


def linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    nll_weight: float = 0.0,
    nll_target: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_logps: Optional[Sequence[torch.Tensor]] = None,
    average_log_prob: Optional[bool] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    num_pairs=None,
    num_chosen_tokens=None,
    algorithm: str = "auto",
) -> PreferenceOutput:
    """Fused preference loss (DPO and TRL's variants, IPO, hinge/RSO, SimPO, ORPO; RPO/CPO via ``nll_weight``).

    Args:
        hidden: ``[2B, S, H]`` the policy's final hidden states, B chosen rows then B rejected rows.
        weight: ``[V, H]`` output projection (plain, FSDP2 or tensor-parallel, as the engine takes).
        labels: ``[2B, S]`` next-token labels aligned with ``hidden``; ``ignore_index`` at prompt/padding.
        loss_type: ``sigmoid`` | ``ipo`` | ``hinge`` | ``simpo`` | ``orpo`` | ``robust`` | ``exo_pair``
            | ``nca_pair`` | ``bco_pair`` | ``sppo_hard`` | ``apo_zero`` | ``apo_down`` | ``discopop``
            (formulas in :func:`tune_losses.alignment.formulas.preference_pair_losses`; TRL 1.16's
            ``DPOConfig.loss_type`` names).
        beta: the inverse temperature of the implicit reward (> 0).
        gamma: SimPO's target margin.
        label_smoothing: conservative DPO / SimPO (in [0, 0.5]), ``robust`` (in [0, 0.5)),
            ``exo_pair`` (in (0, 1), required).
        discopop_tau: DiscoPOP's modulation temperature (> 0; TRL's default 0.05).
        nll_weight: weight of the chosen sequences' mean NLL per valid token (RPO / CPO); ORPO always
            adds it with weight 1, plus this.
        nll_target: ``[2B, S]`` labels for the NLL term when they differ from ``labels`` (Liger's ORPO
            ``nll_target``; only the chosen rows are read; ``ignore_index`` marks tokens that do not
            count); the NLL's token count is then nll_target's. Its log-probabilities take one more
            pass over the chosen rows (the per-token path).
        ref_hidden, ref_weight, ref_bias: the frozen reference model's hidden states ``[2B, S, H']``
            and projection; its log-probabilities are made under no-grad by the same engine, or
        ref_logps: ``(ref_chosen [B], ref_rejected [B])`` precomputed, or neither (zero reference).
        average_log_prob: sequence log-prob as the mean over valid tokens (default for ipo, simpo,
            orpo) instead of the sum (default for the others).
        bias: ``[V]`` or None.
        chunk_size: valid tokens per chunk of whole pairs (grad-in-forward path) or tokens per chunk of
            the engine's loop (per-token path); None: their defaults.
        num_pairs, num_chosen_tokens: normalizers for exact gradient accumulation (a whole step's
            counted pairs and chosen valid tokens, all micro-batches and ranks); default: this batch's.
        algorithm: ``auto`` (grad-in-forward over chunks of whole pairs where it applies,
            :mod:`tune_losses.alignment.pair_chunks`: plain tensors, a gradient wanted, every pair
            within the chunk; else the per-token path), ``grad_in_forward`` (that path or a ValueError
            saying why not), ``recompute`` (the per-token path: each chunk's logits made again in
            backward; several backward passes allowed, e.g. ``torch.autograd.gradcheck``).

    Returns:
        :class:`PreferenceOutput` ``(loss, chosen_rewards, rejected_rewards, chosen_logps,
        rejected_logps, nll)``; rewards and log-probs ``[B]``.
    """
    check_count("num_pairs", num_pairs)
    check_count("num_chosen_tokens", num_chosen_tokens)
    terms, loss = _linear_terms(
        hidden,
        weight,
        labels,
        loss_type=loss_type,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        nll_weight=nll_weight,
        nll_target=nll_target,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_logps=ref_logps,
        average_log_prob=average_log_prob,
        bias=bias,
        ref_bias=ref_bias,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        algorithm=algorithm,
        normalizers=(num_pairs, num_chosen_tokens),
    )
    out = terms.output(num_pairs, num_chosen_tokens)
    return out if loss is None else out._replace(loss=loss)


def linear_preference_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    algorithm: str = "auto",
    **options,
) -> PreferenceTerms:
    """:func:`linear_preference_loss`'s sums and counts (for trainers that normalize over a step).

    ``terms.loss(num_pairs, num_chosen_tokens)`` is exact for any normalizers: the grad-in-forward path
    applies when the loss has no NLL term (its gradient is then linear in ``1 / num_pairs``); with one,
    the per-token path runs (or pass the normalizers to :func:`linear_preference_loss`).
    """
    return _linear_terms(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        bias=bias,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        algorithm=algorithm,
        normalizers=None,
        **options,
    )[0]


def _linear_terms(
    hidden,
    weight,
    labels,
    *,
    ref_hidden,
    ref_weight,
    ref_bias,
    bias,
    ignore_index,
    chunk_size,
    algorithm,
    normalizers,
    **options,
) -> Tuple[PreferenceTerms, Optional[torch.Tensor]]:
    """``(terms, loss)``: ``loss`` is the loss normalized by ``normalizers`` ``(num_pairs, num_chosen_tokens)``
    (None: this batch's) when the grad-in-forward path folded them into its gradients, else None (then
    ``terms.loss(...)`` is differentiable). ``normalizers=None``: the caller normalizes later."""
    check_preference_options(
        options.get("loss_type", "sigmoid"),
        options.get("beta", 0.1),
        options.get("gamma", 0.0),
        options.get("label_smoothing", 0.0),
        options.get("nll_weight", 0.0),
        options.get("discopop_tau", 0.05),
    )
    check_choice("algorithm", algorithm, ALGORITHMS)
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"linear_preference_terms: unexpected keyword argument(s) {unknown}; expected some of {_OPTION_NAMES}"
        )
    _check_pair_labels(labels)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError(
            "ref_weight: expected ref_hidden and ref_weight together (the reference model's hidden "
            f"states and output projection), got ref_hidden={'set' if ref_hidden is not None else None}, "
            f"ref_weight={'set' if ref_weight is not None else None}"
        )
    if ref_hidden is not None and options.get("ref_logps") is not None:
        raise ValueError("ref_logps: give the reference either as ref_hidden + ref_weight or as ref_logps, not both")
    nll_target = options.get("nll_target")
    if nll_target is not None:
        check_nll_target(nll_target, labels)
        if algorithm == "grad_in_forward":
            raise ValueError(
                "algorithm: 'grad_in_forward' takes one set of labels; with nll_target use 'auto' or 'recompute'"
            )
    if algorithm != "recompute" and nll_target is None:
        result = _pair_chunked(
            hidden,
            weight,
            labels,
            bias,
            ref_hidden,
            ref_weight,
            ref_bias,
            ignore_index,
            chunk_size,
            normalizers,
            algorithm == "grad_in_forward",
            options,
        )
        if result is not None:
            return result
    logps = token_log_probs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, name="hidden"
    )
    nll_token_logps = None
    if nll_target is not None:
        # The NLL's labels differ from the preference labels: one more pass over the chosen rows.
        half = labels.shape[0] // 2
        nll_token_logps = token_log_probs(
            hidden[:half],
            weight,
            nll_target[:half],
            bias=bias,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            name="hidden",
        )
    ref_token_logps = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_token_logps = token_log_probs(
                ref_hidden,
                ref_weight,
                labels,
                bias=ref_bias,
                ignore_index=ignore_index,
                chunk_size=chunk_size,
                name="ref_hidden",
            )
    return preference_terms(
        logps,
        labels,
        ref_token_logps=ref_token_logps,
        nll_token_logps=nll_token_logps,
        ignore_index=ignore_index,
        **options,
    ), None


def _pair_chunked(
    hidden,
    weight,
    labels,
    bias,
    ref_hidden,
    ref_weight,
    ref_bias,
    ignore_index,
    chunk_size,
    normalizers,
    required: bool,
    options,
) -> Optional[Tuple[PreferenceTerms, Optional[torch.Tensor]]]:
    """The grad-in-forward path over chunks of whole pairs (:mod:`tune_losses.alignment.pair_chunks`), or
    None where it does not apply (a ValueError instead when ``required``)."""
    loss_type = options.get("loss_type", "sigmoid")
    beta = options.get("beta", 0.1)
    nll_weight = options.get("nll_weight", 0.0) + (1.0 if loss_type == "orpo" else 0.0)
    if normalizers is None and nll_weight:
        # Two sums with gradients normalized later by two counts: the per-token path keeps them apart.
        if required:
            raise ValueError(
                "algorithm: 'grad_in_forward' with an NLL term needs the normalizers at call time "
                "(linear_preference_loss with num_pairs / num_chosen_tokens); use 'auto'"
            )
        return None
    if not applies(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias):
        if required:
            raise ValueError(
                "algorithm: 'grad_in_forward' takes plain tensors (FSDP2 weights too, not vocabulary-"
                "parallel ones) of matching shapes and dtypes on one device, with a gradient wanted; "
                "use 'auto' or 'recompute'"
            )
        return None
    check_label_range(labels, weight.shape[0], ignore_index)
    if ref_weight is not None and ref_weight.shape[0] != weight.shape[0]:
        check_label_range(labels, ref_weight.shape[0], ignore_index)
    budget = chunk_size or default_row_budget(weight.shape[0], hidden.device)
    layout = pair_chunk_layout(labels, ignore_index, budget)
    if layout is None:
        if required:
            raise ValueError(
                f"chunk_size: a pair has more valid tokens than a chunk of {budget} rows "
                "(algorithm='grad_in_forward' keeps whole pairs in a chunk); raise chunk_size or "
                "use algorithm='auto'"
            )
        return None
    batch, device, dtype = labels.shape[0] // 2, hidden.device, compute_dtype(hidden.dtype)
    # From here on this path runs (every rank of a data-parallel group decides alike up to here, on
    # types and its own labels, before any collective): gather FSDP2 weights, the policy's first as
    # the per-token path does.
    weight, bias = local_weights(weight, bias, hidden.dtype)
    if ref_weight is not None:
        ref_weight, ref_bias = local_weights(ref_weight, ref_bias, ref_hidden.dtype)
    ref_seq = None
    if ref_hidden is None:
        if options.get("ref_logps") is not None:
            ref_c, ref_r = _check_ref_logps(options["ref_logps"], batch, device)
            ref_seq = torch.cat([ref_c, ref_r]).to(dtype)
        else:
            ref_seq = torch.zeros(2 * batch, dtype=dtype, device=device)
    n_c, n_r = split_pairs(layout.lengths)
    counted = (n_c > 0) & (n_r > 0)
    if normalizers is None:
        pair_scale, nll_scale = torch.ones((), dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device)
    else:
        pairs = counted.sum() if normalizers[0] is None else torch.as_tensor(normalizers[0], device=device)
        tokens = n_c.sum() if normalizers[1] is None else torch.as_tensor(normalizers[1], device=device)
        pair_scale = 1.0 / pairs.clamp(min=1).to(dtype)
        nll_scale = nll_weight / tokens.clamp(min=1).to(dtype)
    average = (
        loss_type in MEAN_LOG_PROB_TYPES
        if options.get("average_log_prob") is None
        else bool(options["average_log_prob"])
    )
    opts = PairOptions(
        loss_type=loss_type,
        beta=beta,
        gamma=options.get("gamma", 0.0),
        label_smoothing=options.get("label_smoothing", 0.0),
        discopop_tau=options.get("discopop_tau", 0.05),
        average=average,
    )
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    total, pair_sum, nll_sum, seq, ref = PairChunkedPreference.apply(
        hidden,
        weight,
        bias,
        detach(ref_hidden),
        detach(ref_weight),
        detach(ref_bias),
        ref_seq,
        labels,
        layout,
        opts,
        pair_scale,
        nll_scale,
    )
    chosen, rejected = split_pairs(seq)
    ref_c, ref_r = split_pairs(ref)
    common = dict(loss_type=loss_type, beta=beta, nll_weight=options.get("nll_weight", 0.0))
    if normalizers is None:
        return sequence_terms(chosen, rejected, ref_c, ref_r, counted, total, nll_sum, n_c.sum(), **common), None
    return sequence_terms(chosen, rejected, ref_c, ref_r, counted, pair_sum, nll_sum, n_c.sum(), **common), total
