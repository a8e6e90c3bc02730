"""Independent fp64 full-logits references for the alignment losses.

Written from the formulas of the alignment issue with plain torch ops on full logits, never calling
``tune_losses``: a test comparing the two compares two implementations. Inputs are cast to float64
and stay in the autograd graph, so ``torch.autograd.grad`` of a reference gives reference gradients.

Pair batches are ``[2B, S]``, chosen rows first; policy batches ``[G, S]``.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

__all__ = ["ref_token_logps", "ref_entropy", "ref_preference", "ref_log_importance_weight", "ref_policy"]


def _logits(hidden, weight, bias=None, temperature: float = 1.0) -> torch.Tensor:
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return z / temperature


def ref_token_logps(hidden, weight, labels, bias=None, temperature: float = 1.0, ignore_index: int = -100):
    """``[B, S]`` fp64 log-probability of each label (0 at ignored tokens)."""
    z = _logits(hidden, weight, bias, temperature)
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def ref_entropy(hidden, weight, labels, bias=None, temperature: float = 1.0, ignore_index: int = -100):
    """``[B, S]`` fp64 entropy ``-sum p log p`` of the (tempered) distribution (0 at ignored tokens)."""
    z = _logits(hidden, weight, bias, temperature)
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(labels != ignore_index, ent, torch.zeros_like(ent))


def _seq(tok, labels, average, ignore_index):
    valid = (labels != ignore_index).double()
    s = (tok * valid).sum(-1)
    return s / valid.sum(-1).clamp(min=1) if average else s


def ref_preference(
    hidden,
    weight,
    labels,
    *,
    loss_type="sigmoid",
    beta=0.1,
    gamma=0.0,
    label_smoothing=0.0,
    discopop_tau=0.05,
    nll_weight=0.0,
    nll_target=None,
    ref_hidden=None,
    ref_weight=None,
    ref_logps=None,
    average_log_prob=None,
    bias=None,
    ref_bias=None,
    ignore_index=-100,
) -> Dict[str, torch.Tensor]:
    """The preference loss and its parts, fp64, from the issue's formulas.

    Pairs count where both sequences have a valid token; loss = mean over counted pairs (0 if none)
    + nll_weight (+1 for ORPO) x the chosen rows' mean NLL per valid token (of ``nll_target`` when
    given). The loss types after ``orpo`` are written from TRL 1.16's ``DPOTrainer._compute_loss``.
    """
    if average_log_prob is None:
        average_log_prob = loss_type in ("ipo", "simpo", "orpo")
    B = labels.shape[0] // 2
    tok = ref_token_logps(hidden, weight, labels, bias, ignore_index=ignore_index)
    seq = _seq(tok, labels, average_log_prob, ignore_index)
    pc, pr = seq[:B], seq[B:]
    if ref_hidden is not None:
        with torch.no_grad():
            rtok = ref_token_logps(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index)
            rseq = _seq(rtok, labels, average_log_prob, ignore_index)
        rc, rr = rseq[:B], rseq[B:]
    elif ref_logps is not None:
        rc, rr = ref_logps[0].double(), ref_logps[1].double()
    else:
        rc = rr = torch.zeros(B, dtype=torch.float64)
    n = (labels != ignore_index).sum(-1)
    counted = (n[:B] > 0) & (n[B:] > 0)
    ls = lambda x: -torch.log1p(torch.exp(-x))  # log sigmoid, written out  # noqa: E731
    d = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        per = -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    elif loss_type == "ipo":
        per = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        per = torch.clamp(1 - beta * d, min=0)
    elif loss_type == "simpo":
        z = beta * (pc - pr) - gamma
        per = -(1 - eps) * ls(z) - eps * ls(-z)
    elif loss_type == "orpo":
        pcs = torch.where(counted, pc, torch.full_like(pc, -1.0))
        prs = torch.where(counted, pr, torch.full_like(pr, -1.0))
        L = (pcs - prs) - (torch.log(1 - torch.exp(pcs)) - torch.log(1 - torch.exp(prs)))
        per = -beta * ls(L)
    elif loss_type == "robust":
        per = (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        qw, ql = torch.sigmoid(beta * d), torch.sigmoid(-beta * d)
        per = qw * (ls(beta * d) - math.log(1 - eps)) + ql * (ls(-beta * d) - math.log(eps))
    elif loss_type == "nca_pair":
        cr, rr_ = beta * (pc - rc), beta * (pr - rr)
        per = -ls(cr) - 0.5 * ls(-cr) - 0.5 * ls(-rr_)
    elif loss_type == "bco_pair":
        per = -ls(beta * (pc - rc)) - ls(-beta * (pr - rr))
    elif loss_type == "sppo_hard":
        per = (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        per = 1 - torch.sigmoid(beta * (pc - rc)) + torch.sigmoid(beta * (pr - rr))
    elif loss_type == "apo_down":
        per = torch.sigmoid(beta * (pc - rc)) + 1 - torch.sigmoid(beta * d)
    elif loss_type == "discopop":
        mod = torch.sigmoid(beta * d / discopop_tau)
        per = -ls(beta * d) * (1 - mod) + torch.exp(-beta * d) * mod
    else:
        raise ValueError(loss_type)
    per = torch.where(counted, per, torch.zeros_like(per))
    loss = per.sum() / counted.sum().clamp(min=1)
    vc = labels[:B] != ignore_index
    nll_tok = tok
    if nll_target is not None:
        vc = nll_target[:B] != ignore_index
        nll_tok = ref_token_logps(hidden, weight, nll_target, bias, ignore_index=ignore_index)
    nll = -(nll_tok[:B] * vc.double()).sum() / vc.sum().clamp(min=1)
    w = nll_weight + (1.0 if loss_type == "orpo" else 0.0)
    total = loss + w * nll
    return {
        "loss": total,
        "chosen_rewards": (beta * (pc - rc)).detach(),
        "rejected_rewards": (beta * (pr - rr)).detach(),
        "chosen_logps": pc.detach(),
        "rejected_logps": pr.detach(),
        "nll": nll.detach(),
    }


def ref_log_importance_weight(log_ratio, mask, importance_sampling_level: str) -> torch.Tensor:
    """TRL's log importance weight from the per-token log-ratios ``[G, S]`` (``mask``: 1.0 at valid
    tokens): the log-ratio itself (``"token"``), or each sequence's mean over its valid tokens ``[G, 1]``
    (``"sequence"``)."""
    if importance_sampling_level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def ref_policy(
    hidden,
    weight,
    labels,
    advantages,
    *,
    loss_type="grpo",
    old_logps=None,
    ref_logps=None,
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=None,
    delta=None,
    importance_sampling_level="token",
    use_bias_correction_kl=False,
    vllm_is_ratio=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    temperature=1.0,
    max_completion_length=None,
    num_items_in_batch=None,
    bias=None,
    ignore_index=-100,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The GRPO-family loss and metrics, fp64, written as TRL 1.16's ``GRPOTrainer._compute_loss``:
    ``[G, S]`` tensors, sequence-level quantities ``[G, 1]`` broadcast, masks multiplied in."""
    eh = epsilon_low if epsilon_high is None else epsilon_high
    m = labels != ignore_index
    mask = m.double()
    logp = ref_token_logps(hidden, weight, labels, bias, temperature, ignore_index)
    old = logp.detach() if old_logps is None else torch.where(m, old_logps.double(), logp.detach())
    A = advantages.double()
    A = A.unsqueeze(-1) if A.dim() == 1 else A
    is_ratio = None
    if vllm_is_ratio is not None:
        is_ratio = vllm_is_ratio.double().reshape(labels.shape[0], -1)
        is_ratio = torch.where(m, is_ratio, torch.ones_like(logp)) if is_ratio.shape[1] > 1 else is_ratio
    log_ratio = logp - old
    coef_1 = torch.exp(ref_log_importance_weight(log_ratio, mask, importance_sampling_level))
    metrics = {}
    if beta != 0.0:
        ref = torch.where(m, ref_logps.double(), logp.detach())
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eh).detach() * A * logp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eh)
        c1 = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(c1 * A, coef_2 * A)
    elif loss_type == "sapo":
        temps = torch.where(A > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * A
    elif loss_type == "vespo":
        with torch.no_grad():
            seq_lr = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
            if is_ratio is not None:
                seq_lr = seq_lr + torch.clamp(torch.log(is_ratio), math.log(1e-8), 20.0).sum(-1, keepdim=True)
            log_w = torch.clamp(seq_lr, math.log(1e-8), 20.0)
            k = torch.where(A >= 0, vespo_k_pos, vespo_k_neg)
            lam = torch.where(A >= 0, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi * A * logp
    else:
        raise ValueError(loss_type)
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = torch.where(m, per_token_loss * torch.ones_like(logp), torch.zeros_like(logp))
    G, S = labels.shape
    if loss_type in ("grpo", "sapo"):
        loss = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token_loss.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per_token_loss.sum() / (G * (max_completion_length or S))
    elif loss_type in ("dapo", "cispo", "vespo"):
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        loss = per_token_loss.sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = per_token_loss.sum(-1).mean()

    def global_masked_mean(x):
        if x.shape[1] == 1:  # one value per sequence
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = ((coef_1 < 1 - epsilon_low) & (A < 0)).double()
        high = ((coef_1 > 1 + eh) & (A > 0)).double()
        metrics["clip_ratio/low"] = global_masked_mean(low)
        metrics["clip_ratio/high"] = global_masked_mean(high)
        metrics["clip_ratio/region"] = global_masked_mean(((low + high) > 0).double())
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > eh) & (A > 0)).double())
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = global_masked_mean(phi)
    ent = ref_entropy(hidden, weight, labels, bias, temperature, ignore_index)
    metrics["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1)
    return loss, {k: v.detach() for k, v in metrics.items()}


def ref_kto(
    hidden,
    weight,
    labels,
    kto_labels,
    *,
    loss_type="kto",
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    ref_hidden=None,
    ref_weight=None,
    kl=None,
    kl_hidden=None,
    kl_labels=None,
    kl_ref_hidden=None,
    average_log_prob=False,
    bias=None,
    ignore_index=-100,
):
    """KTO, fp64, from TRL 1.16's ``KTOTrainer._compute_loss``: desirable and undesirable losses weighted,
    concatenated and averaged over the sequences (here: those with a valid token); the KL point is the
    given ``kl`` or ``max(mean(policy - reference on the mismatched completions), 0)``, detached."""
    tok = ref_token_logps(hidden, weight, labels, bias, ignore_index=ignore_index)
    seq = _seq(tok, labels, average_log_prob, ignore_index)
    if ref_hidden is not None:
        with torch.no_grad():
            rseq = _seq(
                ref_token_logps(ref_hidden, ref_weight, labels, ignore_index=ignore_index),
                labels,
                average_log_prob,
                ignore_index,
            )
    else:
        rseq = torch.zeros_like(seq)
    if kl is not None:
        kl_v = torch.as_tensor(kl, dtype=torch.float64).reshape(())
    elif kl_hidden is not None:
        with torch.no_grad():
            p = _seq(
                ref_token_logps(kl_hidden, weight, kl_labels, bias, ignore_index=ignore_index),
                kl_labels,
                average_log_prob,
                ignore_index,
            )
            r = _seq(
                ref_token_logps(kl_ref_hidden, ref_weight, kl_labels, ignore_index=ignore_index),
                kl_labels,
                average_log_prob,
                ignore_index,
            )
            kl_v = (p - r).mean().clamp(min=0)
    else:
        kl_v = torch.zeros((), dtype=torch.float64)
    lr = seq - rseq
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (lr - kl_v))
        rejected = 1 - torch.sigmoid(beta * (kl_v - lr))
    else:
        chosen = 1 - torch.sigmoid(beta * lr)
        rejected = torch.sigmoid(beta * lr)
    per = torch.where(kto_labels, desirable_weight * chosen, undesirable_weight * rejected)
    counted = (labels != ignore_index).any(-1)
    per = torch.where(counted, per, torch.zeros_like(per))
    loss = per.sum() / counted.sum().clamp(min=1)
    return {"loss": loss, "rewards": (beta * lr).detach(), "logps": seq.detach(), "kl": kl_v}
