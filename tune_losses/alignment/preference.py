"""Preference losses (the DPO family), fused: no ``[2B, S, V]`` logits.

:func:`linear_preference_loss` takes the policy's final hidden states and output weight. Two paths,
same values and gradients (the loss formula, :mod:`tune_losses.alignment.formulas`, runs on ``[B]``
sequence log-probabilities either way):

* grad-in-forward over chunks of whole pairs (:mod:`tune_losses.alignment.pair_chunks`; the default
  where it applies: plain tensors, a gradient wanted, every pair within a chunk): each chunk's logits
  made once, over valid tokens only, its gradient taken in forward;
* per-token (everything else, ``execution.algorithm="recompute"``): per-token log-probabilities from
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

from tune_losses.alignment.formulas import counted_pair_losses, counted_pairs, sequence_log_probs, split_pairs
from tune_losses.alignment.log_probs import REFERENCE_NAMES, run_options, token_log_probs
from tune_losses.alignment.options import PreferenceOptions, Reference
from tune_losses.alignment.pair_chunks import (
    PairChunkedPreference,
    applies,
    local_weights,
    pair_chunk_layout,
    pair_chunk_limits,
)
from tune_losses.deprecation import no_more, options_object, take, warn_deprecated
from tune_losses.fused.engine import compute_dtype
from tune_losses.fused.functional import RunOptions
from tune_losses.options import IGNORE_INDEX, ArgumentTypeError, ExecutionOptions, check_float_option, check_int_option
from tune_losses.validation import LABEL_DTYPES, check_label_range


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
        return self._loss(num_pairs, num_chosen_tokens)

    def _loss(self, num_pairs, num_chosen_tokens) -> torch.Tensor:
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
        """:class:`PreferenceOutput` with the loss normalized as :meth:`loss` (counts checked by the caller)."""
        nll = self.nll_sum.detach() / self.num_chosen_tokens.clamp(min=1).to(self.nll_sum.dtype)
        return PreferenceOutput(
            self._loss(num_pairs, num_chosen_tokens),
            self.chosen_rewards,
            self.rejected_rewards,
            self.chosen_logps,
            self.rejected_logps,
            nll,
        )


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


_PREFERENCE_FIELDS = tuple(PreferenceOptions.__dataclass_fields__)
_EXECUTION_FIELDS = ("algorithm", "drop_ignored_tokens", "dw_accumulation")
_REFERENCE_FIELDS = ("ref_hidden", "ref_weight", "ref_bias")


def preference_options(fn: str, options, deprecated: dict) -> PreferenceOptions:
    """``options`` (a :class:`PreferenceOptions`), or one made from the old flat keywords in
    ``deprecated`` (taken out of it) with a DeprecationWarning."""
    return options_object(fn, "options", PreferenceOptions, options, take(deprecated, _PREFERENCE_FIELDS))


def reference_argument(fn: str, reference, deprecated: dict) -> Optional[Reference]:
    """``reference`` (a :class:`Reference` or None), or one made from the old flat ``ref_hidden``,
    ``ref_weight``, ``ref_bias`` in ``deprecated`` (taken out of it) with a DeprecationWarning."""
    flat = take(deprecated, _REFERENCE_FIELDS)
    if reference is not None and not isinstance(reference, Reference):
        raise ArgumentTypeError(
            f"reference: expected a Reference(hidden, weight, bias) or None, got {type(reference).__name__}"
        )
    flat = {k: v for k, v in flat.items() if v is not None}
    if not flat:
        return reference
    if reference is not None:
        raise TypeError(f"{fn}: {', '.join(f'{k}=' for k in flat)} and reference= both given; give reference= only")
    if ("ref_hidden" in flat) != ("ref_weight" in flat):
        raise ValueError(
            "ref_weight: expected ref_hidden and ref_weight together (the reference model's hidden "
            f"states and output projection), got {sorted(flat)}"
        )
    warn_deprecated(f"{fn}({', '.join(f'{k}=' for k in flat)}...)", "reference=Reference(hidden, weight, bias)")
    return Reference(flat["ref_hidden"], flat["ref_weight"], flat.get("ref_bias"))


def preference_terms(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_token_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[Sequence[torch.Tensor]] = None,
    nll_target: Optional[torch.Tensor] = None,
    nll_token_logps: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    options: Optional[PreferenceOptions] = None,
    **deprecated,
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
        options: :class:`PreferenceOptions` (``validate`` is not read: no vocabulary here). The old
            flat option keywords still work, with a DeprecationWarning.
    """
    fn = "preference_terms"
    opts = preference_options(fn, options, deprecated)
    no_more(fn, deprecated)
    check_int_option("ignore_index", ignore_index)
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
    if ref_token_logps is not None and ref_token_logps.shape != labels.shape:
        raise ValueError(f"ref_token_logps: expected shape {tuple(labels.shape)}, got {tuple(ref_token_logps.shape)}")
    if nll_target is not None:
        check_nll_target(nll_target, labels)
    return _terms_from_log_probs(
        opts, token_logps, labels, ref_token_logps, ref_logps, nll_target, nll_token_logps, ignore_index
    )


def _terms_from_log_probs(
    opts: PreferenceOptions, token_logps, labels, ref_token_logps, ref_logps, nll_target, nll_token_logps, ignore_index
) -> PreferenceTerms:
    """:func:`preference_terms` once its arguments are checked."""
    batch = labels.shape[0] // 2
    mask = labels != ignore_index
    seq = sequence_log_probs(token_logps, mask, opts.average)
    chosen, rejected = split_pairs(seq)
    if ref_token_logps is not None:
        ref_c, ref_r = split_pairs(sequence_log_probs(ref_token_logps.detach().to(seq.dtype), mask, opts.average))
    elif ref_logps is not None:
        ref_c, ref_r = _check_ref_logps(ref_logps, batch, seq.device)
        ref_c, ref_r = ref_c.to(seq.dtype), ref_r.to(seq.dtype)
    else:
        ref_c = ref_r = torch.zeros_like(chosen).detach()
    n_c, n_r = split_pairs(mask.sum(dim=-1))
    counted = counted_pairs(n_c, n_r)
    per_pair = counted_pair_losses(chosen, rejected, ref_c, ref_r, counted, **opts.formula())
    mask_c, _ = split_pairs(mask)
    logps_c, _ = split_pairs(token_logps)
    if nll_target is not None:
        mask_c, logps_c = _nll_rows(nll_target, nll_token_logps, labels, ignore_index)
    nll_sum = -torch.where(mask_c, logps_c, torch.zeros_like(logps_c)).sum()
    return sequence_terms(opts, chosen, rejected, ref_c, ref_r, counted, per_pair.sum(), nll_sum, mask_c.sum())


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
    opts: PreferenceOptions,
    chosen,
    rejected,
    ref_chosen,
    ref_rejected,
    counted,
    pair_loss_sum,
    nll_sum,
    num_chosen_tokens,
) -> PreferenceTerms:
    """:class:`PreferenceTerms` from the sequence log-probabilities ``[B]`` (policy, reference), the pairs
    that count ``[B]`` and the two sums (0-dim, differentiable or not)."""
    beta = opts.beta
    return PreferenceTerms(
        pair_loss_sum=pair_loss_sum,
        num_pairs=counted.sum(),
        nll_sum=nll_sum,
        num_chosen_tokens=num_chosen_tokens,
        nll_weight=opts.total_nll_weight,
        chosen_rewards=(beta * (chosen - ref_chosen)).detach(),
        rejected_rewards=(beta * (rejected - ref_rejected)).detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
        counted=counted,
    )


class _Call(NamedTuple):
    """One preference call's arguments, checked: the policy side, the reference, the options."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    reference: Optional[Reference]
    ref_logps: Optional[Sequence[torch.Tensor]]
    nll_target: Optional[torch.Tensor]
    opts: PreferenceOptions
    execution: ExecutionOptions
    run: RunOptions


def _parse(fn: str, hidden, weight, labels, bias, reference, ref_logps, nll_target, ignore_index, chunk_size,
           options, execution, deprecated) -> _Call:  # fmt: skip
    """The public functions' one check of their arguments (old flat keywords folded in)."""
    opts = preference_options(fn, options, deprecated)
    reference = reference_argument(fn, reference, deprecated)
    execution = options_object(fn, "execution", ExecutionOptions, execution, take(deprecated, _EXECUTION_FIELDS))
    no_more(fn, deprecated)
    run = run_options(chunk_size, ignore_index, opts.validate, execution)
    _check_pair_labels(labels)
    if reference is not None and ref_logps is not None:
        raise ValueError("ref_logps: give the reference either as reference= or as ref_logps, not both")
    if nll_target is not None:
        check_nll_target(nll_target, labels)
        if execution.algorithm == "grad_in_forward":
            raise ValueError(
                "algorithm: 'grad_in_forward' takes one set of labels; with nll_target use 'auto' or 'recompute'"
            )
    return _Call(hidden, weight, bias, labels, reference, ref_logps, nll_target, opts, execution, run)


def linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reference: Optional[Reference] = None,
    ref_logps: Optional[Sequence[torch.Tensor]] = None,
    nll_target: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    num_pairs=None,
    num_chosen_tokens=None,
    options: Optional[PreferenceOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> PreferenceOutput:
    """Fused preference loss (DPO and TRL's variants, IPO, hinge/RSO, SimPO, ORPO; RPO/CPO via ``nll_weight``).

    Args:
        hidden: ``[2B, S, H]`` the policy's final hidden states, B chosen rows then B rejected rows.
        weight: ``[V, H]`` output projection (plain, FSDP2 or tensor-parallel, as the engine takes).
        labels: ``[2B, S]`` next-token labels aligned with ``hidden``; ``ignore_index`` at prompt/padding.
        bias: ``[V]`` or None.
        reference: the frozen reference model as a :class:`Reference` ``(hidden [2B, S, H'], weight
            [V', H'], bias)``: its log-probabilities are made under no-grad by the same engine (one
            argument: its three tensors only mean something together), or
        ref_logps: ``(ref_chosen [B], ref_rejected [B])`` precomputed, or neither (zero reference).
        nll_target: ``[2B, S]`` labels for the NLL term when they differ from ``labels`` (Liger's ORPO
            ``nll_target``; only the chosen rows are read; ``ignore_index`` marks tokens that do not
            count); the NLL's token count is then nll_target's. Its log-probabilities take one more
            pass over the chosen rows (the per-token path).
        chunk_size: tokens per chunk, as everywhere (None: the default rule). The grad-in-forward
            path holds whole pairs (their valid tokens) in a chunk: as many as fit in ``chunk_size``
            tokens, at least one; a pair longer than 4 chunks takes the per-token path, whose chunks
            are ``chunk_size`` tokens. Its default packs pairs up to 4 chunk-policy chunks
            (:func:`tune_losses.alignment.pair_chunks.default_row_budget`).
        num_pairs, num_chosen_tokens: normalizers for exact gradient accumulation (a whole step's
            counted pairs and chosen valid tokens, all micro-batches and ranks); default: this batch's.
        options: :class:`PreferenceOptions`: ``loss_type`` (TRL 1.16's ``DPOConfig.loss_type``
            names), ``beta``, ``gamma``, ``label_smoothing``, ``discopop_tau``, ``nll_weight``,
            ``average_log_prob``, ``validate``.
        execution: :class:`~tune_losses.options.ExecutionOptions`: ``algorithm`` (``auto``:
            grad-in-forward over chunks of whole pairs where it applies,
            :mod:`tune_losses.alignment.pair_chunks`: plain tensors, a gradient wanted, every pair
            within the chunk; else the per-token path; ``grad_in_forward``: that path or a
            ValueError saying why not; ``recompute``: the per-token path, each chunk's logits made
            again in backward, several backward passes allowed), ``dw_accumulation``,
            ``drop_ignored_tokens`` (the per-token path; the pair path takes valid tokens only).
        deprecated: the old flat keywords (the :class:`PreferenceOptions` fields, ``ref_hidden`` /
            ``ref_weight`` / ``ref_bias``, ``algorithm``) still work, with a DeprecationWarning
            naming the new form.

    Returns:
        :class:`PreferenceOutput` ``(loss, chosen_rewards, rejected_rewards, chosen_logps,
        rejected_logps, nll)``; rewards and log-probs ``[B]``.
    """
    check_count("num_pairs", num_pairs)
    check_count("num_chosen_tokens", num_chosen_tokens)
    call = _parse(
        "linear_preference_loss", hidden, weight, labels, bias, reference, ref_logps, nll_target,
        ignore_index, chunk_size, options, execution, deprecated,
    )  # fmt: skip
    terms, loss = _linear_terms(call, (num_pairs, num_chosen_tokens))
    out = terms.output(num_pairs, num_chosen_tokens)
    return out if loss is None else out._replace(loss=loss)


def linear_preference_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reference: Optional[Reference] = None,
    ref_logps: Optional[Sequence[torch.Tensor]] = None,
    nll_target: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    options: Optional[PreferenceOptions] = None,
    execution: Optional[ExecutionOptions] = None,
    **deprecated,
) -> PreferenceTerms:
    """:func:`linear_preference_loss`'s sums and counts (for trainers that normalize over a step).

    ``terms.loss(num_pairs, num_chosen_tokens)`` is exact for any normalizers: the grad-in-forward path
    applies when the loss has no NLL term (its gradient is then linear in ``1 / num_pairs``); with one,
    the per-token path runs (or pass the normalizers to :func:`linear_preference_loss`). Arguments
    as :func:`linear_preference_loss`.
    """
    call = _parse(
        "linear_preference_terms", hidden, weight, labels, bias, reference, ref_logps, nll_target,
        ignore_index, chunk_size, options, execution, deprecated,
    )  # fmt: skip
    return _linear_terms(call, None)[0]


def _linear_terms(call: _Call, normalizers) -> Tuple[PreferenceTerms, Optional[torch.Tensor]]:
    """``(terms, loss)``: ``loss`` is the loss normalized by ``normalizers`` ``(num_pairs, num_chosen_tokens)``
    (None: this batch's) when the grad-in-forward path folded them into its gradients, else None (then
    ``terms.loss(...)`` is differentiable). ``normalizers=None``: the caller normalizes later."""
    hidden, weight, bias, labels, reference, ref_logps, nll_target, opts, execution, run = call
    if execution.algorithm != "recompute" and nll_target is None:
        result = _pair_chunked(call, normalizers, execution.algorithm == "grad_in_forward")
        if result is not None:
            return result
    logps = token_log_probs(hidden, weight, bias, labels, run)
    nll_token_logps = None
    if nll_target is not None:
        # The NLL's labels differ from the preference labels: one more pass over the chosen rows.
        half = labels.shape[0] // 2
        nll_token_logps = token_log_probs(hidden[:half], weight, bias, nll_target[:half], run)
    ref_token_logps = None
    if reference is not None:
        with torch.no_grad():
            ref_token_logps = token_log_probs(*reference[:3], labels, run, names=REFERENCE_NAMES)
    terms = _terms_from_log_probs(
        opts, logps, labels, ref_token_logps, ref_logps, nll_target, nll_token_logps, run.ignore_index
    )
    return terms, None


def _pair_chunked(call: _Call, normalizers, required: bool) -> Optional[Tuple[PreferenceTerms, Optional[torch.Tensor]]]:
    """The grad-in-forward path over chunks of whole pairs (:mod:`tune_losses.alignment.pair_chunks`), or
    None where it does not apply (a ValueError instead when ``required``)."""
    hidden, weight, bias, labels, reference, ref_logps, _, opts, execution, run = call
    ref_hidden, ref_weight, ref_bias = (None, None, None) if reference is None else reference
    ignore_index = run.ignore_index
    nll_weight = opts.total_nll_weight
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
    if opts.validate:
        check_label_range(labels, weight.shape[0], ignore_index)
        if ref_weight is not None and ref_weight.shape[0] != weight.shape[0]:
            check_label_range(labels, ref_weight.shape[0], ignore_index)
    chunk_tokens, max_pair = pair_chunk_limits(run.chunk_size, weight.shape[0], hidden.device)
    layout = pair_chunk_layout(labels, ignore_index, chunk_tokens, max_pair)
    if layout is None:
        if required:
            raise ValueError(
                f"chunk_size: a pair has more valid tokens than {max_pair} (4 chunks of {chunk_tokens} tokens; "
                "algorithm='grad_in_forward' keeps whole pairs in a chunk); raise chunk_size or "
                "use algorithm='auto'"
            )
        return None
    batch, device, dtype = labels.shape[0] // 2, hidden.device, compute_dtype(hidden.dtype)
    # From here on this path runs (every rank of a data-parallel group decides alike up to here, on
    # types and its own labels, before any collective): gather FSDP2 weights, the policy's first as
    # the per-token path does.
    weight, bias = local_weights(weight, bias, hidden.dtype)
    if reference is not None:
        ref_weight, ref_bias = local_weights(ref_weight, ref_bias, reference.hidden.dtype)
    ref_seq = None
    if ref_hidden is None:
        if ref_logps is not None:
            ref_c, ref_r = _check_ref_logps(ref_logps, batch, device)
            ref_seq = torch.cat([ref_c, ref_r]).to(dtype)
        else:
            ref_seq = torch.zeros(2 * batch, dtype=dtype, device=device)
    n_c, n_r = split_pairs(layout.lengths)
    counted = counted_pairs(n_c, n_r)
    if normalizers is None:
        pair_scale, nll_scale = torch.ones((), dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device)
    else:
        pairs = counted.sum() if normalizers[0] is None else torch.as_tensor(normalizers[0], device=device)
        tokens = n_c.sum() if normalizers[1] is None else torch.as_tensor(normalizers[1], device=device)
        pair_scale = 1.0 / pairs.clamp(min=1).to(dtype)
        nll_scale = nll_weight / tokens.clamp(min=1).to(dtype)
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
        execution.dw_accumulation,
    )
    chosen, rejected = split_pairs(seq)
    ref_c, ref_r = split_pairs(ref)
    sums = (total, None) if normalizers is None else (pair_sum, total)
    terms = sequence_terms(opts, chosen, rejected, ref_c, ref_r, counted, sums[0], nll_sum, n_c.sum())
    return terms, sums[1]
