"""The policy loss as one engine term: value and logit gradient in forward (3 matmuls, not 4).

A policy loss's per-token value ``l(logp_t)`` depends on the logits only through the label's
log-probability; everything else (old / reference log-probs, advantages, the normalization as token
weights) is known before the call and reaches each chunk as per-token side inputs
(``Chunk.inputs``). So while a chunk's logits exist the term computes ``logp`` (one log-softmax
pass), the elementwise ``l`` and ``dl/dlogp`` (:func:`~tune_losses.alignment.policy_formulas.policy_token_terms`)
and the logit gradient ``w_t * dl/dlogp_t * (onehot - softmax) / T`` in the same buffer; the engine's
grad-in-forward function turns it into dX and dW. Backward makes no logits again: logits, dX, dW.

Sequence-level quantities (GSPO's ``importance_sampling_level="sequence"``, VESPO's gamma weight)
need every token of a sequence before any token's gradient: the caller then chunks by whole
sequences (a chunk size that is a multiple of S), and the term sums within a chunk by sequence slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from tune_losses.alignment.policy_formulas import CLIP_LOSS_TYPES, PolicyOptions, policy_token_terms
from tune_losses.divergences.common import add_at_label, label_index, row_max, scaled
from tune_losses.fused.engine import LossPlan, default_chunk_size, run_terms
from tune_losses.terms import Term

# A sequence-level loss chunks by whole sequences. A sequence longer than this many default chunks
# would make one chunk's logits that much larger than the engine's measured chunk: the recompute path
# (which chunks by tokens) runs instead.
MAX_SEQUENCE_CHUNKS = 4


def stat_names(opts: PolicyOptions, entropy: bool) -> Tuple[str, ...]:
    """The statistics a policy term reports beside its loss (summed over tokens)."""
    names = []
    if opts.loss_type in CLIP_LOSS_TYPES:
        names += ["clip_low", "clip_high"]
    elif opts.loss_type == "cispo":
        names.append("cispo_clip")
    elif opts.loss_type == "vespo":
        names.append("phi")
    if opts.beta > 0:
        names.append("kl")
    if entropy:
        names.append("entropy")
    return tuple(names)


@dataclass(frozen=True)
class PolicyTerm(Term):
    """GRPO-family loss per token, its gradient made with the chunk's logits.

    Reads ``chunk.inputs``: ``old_logps``, ``advantages``, ``token_weights`` (the normalization) and,
    when the options need them, ``ref_logps``, ``is_ratio``, ``seq`` (int64 sequence ids, consecutive
    within a chunk that holds whole sequences), all ``[n]``.

    Outputs: ``policy`` (``token_weight * l``, whose sum is the loss), then :func:`stat_names`.
    """

    opts: PolicyOptions = PolicyOptions()
    has_ratio: bool = False
    weight: float = 1.0
    name: str = "policy"

    @property
    def temperature(self) -> float:
        return float(self.opts.temperature)

    @property
    def entropy(self) -> bool:
        return self.opts.return_entropy

    @property
    def outputs(self) -> Tuple[str, ...]:
        return (self.name,) + stat_names(self.opts, self.entropy)

    def compute(self, chunk, weights, consume_student, consume_teacher):
        z, labels, valid, red = chunk.student, chunk.labels, chunk.valid, chunk.reducer
        inp = chunk.inputs
        zz = scaled(z, self.temperature, consume_student)
        idx, owned = label_index(labels, valid, zz.shape[1], red)
        m = row_max(zz.amax(-1), red)
        rows = [torch.where(owned, zz.gather(-1, idx).squeeze(-1), 0.0)]
        e = zz.sub_(m.unsqueeze(-1)).exp_()
        rows.insert(0, e.sum(-1))
        if self.entropy:
            rows.append(torch.special.xlogy(e, e).sum(-1))  # sum e log e (0 log 0 = 0)
        r = red.sum(torch.stack(rows))
        log_sum = r[0].log()
        logp = torch.where(valid, r[1] - m - log_sum, 0.0)
        token_w = inp["token_weights"].to(logp.dtype)
        w = None
        if weights is not None and weights[0] is not None:
            w = weights[0] * token_w
        seq = inp.get("seq")
        if seq is not None:
            # Slots below n, distinct for the (consecutive) sequences of this chunk; padded rows
            # (id 0) may share a slot, but hold no valid token and so add nothing.
            seq = torch.remainder(seq, z.shape[0])
        loss, dlp, stats = policy_token_terms(
            self.opts,
            logp,
            inp.get("old_logps", logp),  # absent: on-policy (ratio 1)
            inp["advantages"],
            valid,
            ref=inp.get("ref_logps"),
            is_ratio=inp.get("is_ratio") if self.has_ratio else None,
            seq=seq,
            weight=w,
        )
        if self.entropy:
            stats["entropy"] = torch.where(valid, log_sum - r[2] / r[0], 0.0)
        outs = [loss * token_w] + [stats[k] for k in stat_names(self.opts, self.entropy)]
        if dlp is None:
            return outs, None
        # d(w l)/dz'_j = w dl/dlogp (onehot_j - q_j), written over the exp buffer.
        q = e.div_(r[0].unsqueeze(-1))
        g = q.mul_((-dlp).unsqueeze(-1))
        g = add_at_label(g, idx, owned, dlp)
        if self.temperature != 1.0:
            g.div_(self.temperature)
        return outs, g


def sequence_chunk_size(
    num_tokens: int, seq_len: int, vocab: int, device: torch.device, hidden: int, chunk_size: Optional[int]
) -> Optional[int]:
    """Tokens per chunk holding whole sequences of ``seq_len`` tokens (a multiple of it), or None
    when one sequence is more than :data:`MAX_SEQUENCE_CHUNKS` default chunks (recompute instead)."""
    base = chunk_size or default_chunk_size(num_tokens, vocab, device, hidden_size=hidden)
    if seq_len > MAX_SEQUENCE_CHUNKS * base:
        return None
    return seq_len * max(1, base // seq_len)


def run_policy_term(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    labels: torch.Tensor,
    term: PolicyTerm,
    inputs: Dict[str, torch.Tensor],
    *,
    ignore_index: int,
    chunk_size: Optional[int],
    dw_accumulation: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The engine's grad-in-forward call: ``(loss 0-dim, {stat name: sum})``.

    x ``[N, H]``, w ``[V, H]``, b ``[V]`` or None (plain tensors on one device), labels ``[N]``,
    ``inputs`` ``[N]`` each (see :class:`PolicyTerm`); ``chunk_size`` already a multiple of the
    sequence length where the term needs whole sequences; ``dw_accumulation`` as
    :class:`~tune_losses.options.ExecutionOptions`.
    """
    plan = LossPlan(terms=(term,), ignore_index=ignore_index, chunk_size=chunk_size, dw_accumulation=dw_accumulation)
    loss, parts = run_terms(x, w, b, labels, None, None, None, plan, per_token=False, recompute=False, inputs=inputs)
    return loss, {k: v for k, v in parts.items() if k != term.name}
