"""Liger-Kernel's torch references for its chunked preference-loss tests, rewritten without liger_kernel.

Adapted from Liger-Kernel (BSD-2-Clause), ``test/utils.py`` (``HFAlignmentLoss``) and the ``HF*Loss``
classes of ``test/chunked_loss/test_{dpo,orpo,cpo}_loss.py``: the same full-logits computation (logits
in the input dtype, upcast to fp32; sequence log-probs summed or averaged over the valid tokens; the
chosen rows' NLL as ``nn.CrossEntropyLoss`` over ``nll_target`` or the labels; ``loss = alpha * nll +
mean(per-pair losses)``) and the per-pair formulas their tests use (TRL's). Their classes become one
function and a table of formulas; the logit means Liger also returns are left out (our losses do not
make them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dpo_family(loss_type, beta, label_smoothing=0.0, discopop_tau=0.05):
    """Per-pair loss of TRL's DPO variants as Liger's test classes write them."""

    def loss(pc, pr, rc, rr):
        c, r = pc - rc, pr - rr
        z = beta * (c - r)
        eps = label_smoothing
        if loss_type == "sigmoid":
            return -F.logsigmoid(z)
        if loss_type == "hinge":
            return torch.relu(1 - z)
        if loss_type == "apo_zero":
            return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
        if loss_type == "apo_down":
            return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
        if loss_type == "sppo_hard":
            return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        if loss_type == "nca_pair":
            return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
        if loss_type == "bco_pair":
            return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
        if loss_type == "robust":
            return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        if loss_type == "exo_pair":
            e = torch.tensor(eps, device=z.device)
            return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-e)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - torch.log(e)
            )
        if loss_type == "discopop":
            m = torch.sigmoid(z / discopop_tau)
            return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        raise ValueError(loss_type)

    return loss


def orpo_pair_loss(beta):
    """ORPO's odds-ratio term (Liger's ``HFORPOLoss``)."""

    def loss(pc, pr, rc, rr):
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        return -beta * F.logsigmoid(log_odds)

    return loss


def cpo_pair_loss(beta, label_smoothing=0.0, simpo_gamma=None):
    """CPO (``simpo_gamma=None``) or SimPO (Liger's ``HFCPOLoss`` with ``loss_type='simpo'``)."""

    def loss(pc, pr, rc, rr):
        logits = pc - pr
        if simpo_gamma is not None:
            logits = logits - simpo_gamma / beta
        eps = label_smoothing
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps

    return loss


def dpo_pair_loss(loss_type, beta, **kwargs):
    return _dpo_family(loss_type, beta, **kwargs)


def _batch_logps(logits, labels, ignore_index, average):
    mask = labels != ignore_index
    safe = torch.where(mask, labels, 0)
    tok = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(2)).squeeze(2)
    total = (tok * mask).sum(-1)
    return total / mask.sum(-1) if average else total


def alignment_loss(
    pair_loss,
    x,
    weight,
    target,
    bias=None,
    ref_x=None,
    ref_weight=None,
    ref_bias=None,
    *,
    beta,
    ignore_index=-100,
    average_log_prob=True,
    compute_nll_loss=True,
    alpha=1.0,
    nll_target=None,
    reward_from_ratio=True,
):
    """``(loss, (chosen_logps, rejected_logps, nll, chosen_rewards, rejected_rewards))`` as Liger's
    ``HFAlignmentLoss.get_batch_loss_metrics`` (rewards: ``beta * (policy - reference)``, or
    ``beta * policy`` for the reference-free losses)."""
    half = x.shape[0] // 2
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    nll = torch.tensor(0.0)
    if compute_nll_loss:
        labels = target if nll_target is None else nll_target
        nll = F.cross_entropy(
            logits[:half].reshape(-1, logits.shape[-1]), labels[:half].reshape(-1), ignore_index=ignore_index
        )
    logps = _batch_logps(logits, target, ignore_index, average_log_prob)
    pc, pr = logps[:half], logps[half:]
    rc = rr = torch.zeros((), device=x.device)
    if ref_x is not None:
        with torch.no_grad():
            ref_logits = ref_x @ ref_weight.t()
            if ref_bias is not None:
                ref_logits = ref_logits + ref_bias
            ref_logps = _batch_logps(ref_logits, target, ignore_index, average_log_prob)
        rc, rr = ref_logps[:half], ref_logps[half:]
    losses = pair_loss(pc, pr, rc, rr)
    loss = nll * alpha + losses.mean()
    return loss, (pc, pr, nll, beta * (pc - rc), beta * (pr - rr))


def kto_loss(
    x,
    weight,
    target,
    preference_labels,
    bias,
    ref_x,
    ref_weight,
    ref_bias,
    kl,
    *,
    beta,
    ignore_index=-100,
    average_log_prob=True,
):
    """Liger's ``HFKTOLoss`` (test/chunked_loss/test_kto_loss.py) through ``HFAlignmentLoss`` unpaired:
    ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_rewards_sum, rejected_rewards_sum))``; the
    given ``kl`` used as is (0 when None); the loss the mean over all rows."""
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    logps = _batch_logps(logits.float(), target, ignore_index, average_log_prob)
    with torch.no_grad():
        ref_logits = ref_x @ ref_weight.t()
        if ref_bias is not None:
            ref_logits = ref_logits + ref_bias
        ref_logps = _batch_logps(ref_logits, target, ignore_index, average_log_prob)
    kl = torch.zeros(1) if kl is None else kl
    c = logps[preference_labels] - ref_logps[preference_labels]
    r = logps[~preference_labels] - ref_logps[~preference_labels]
    losses = torch.cat((1 - torch.sigmoid(beta * (c - kl)), 1 - torch.sigmoid(beta * (kl - r))), 0)
    aux = (logps[preference_labels].sum(), logps[~preference_labels].sum(), (beta * c).sum(), (beta * r).sum())
    return losses.mean(), aux
