"""Independent fp64 full-logits references for every token loss in ``tune_losses``.

Written from the math in ``../shared/design.md`` section 3 with plain torch ops, never by calling
``tune_losses`` code, so a test comparing the two compares two implementations. Everything is
computed in float64 on the full (unchunked) logits and stays in the autograd graph::

    x = logits.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(ref_ce(x, labels), x)       # the reference gradient

Shapes: logits ``[N, V]`` with labels ``[N]``, or ``[B, S, V]`` with labels ``[B, S]`` (a list of
``[B, S_i, V]`` chunks is concatenated along dim 1 first). Reductions: ``"mean"`` is the sum over
valid tokens divided by their count (0 when there is none: the package's contract), ``"sum"``
the sum, ``"none"`` per-token values shaped like ``labels`` with exact 0 at ignored tokens.

Import from other test files with ``from reference import ref_ce, ref_kd, make_labels`` (pytest
puts ``tests/`` on ``sys.path``) or ``from tests.reference import ...``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["DIVERGENCES", "make_labels", "ref_ce", "ref_kd", "ref_log_probs", "teacher_entropy"]


def _builtin_divergences() -> tuple:
    """The package's registered divergences (test-only ones defined in tests/ are left out, so that
    the test matrix does not depend on which test modules were imported first)."""
    from tune_losses.divergences import divergence_names, get_divergence

    return tuple(n for n in divergence_names() if type(get_divergence(n)).__module__.startswith("tune_losses."))


DIVERGENCES = _builtin_divergences()
# The formulas below are written independently for these; a divergence added later is checked
# against its own elementwise value over the full fp64 logits, differentiated by autograd.
_WRITTEN_OUT = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd")

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------- helpers


def make_labels(
    shape,
    vocab: int,
    ignore: str = "none",
    generator: Optional[torch.Generator] = None,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Random int64 labels in ``[0, vocab)`` of ``shape``, some or all set to ``ignore_index``.

    Args:
        shape: e.g. ``(B, S)`` or ``(N,)``.
        vocab: V.
        ignore: ``"none"`` (every token valid), ``"some"`` (about a third ignored; always at least
            one ignored and one valid token when there are two or more), ``"all"``.
        generator: a seeded ``torch.Generator`` for reproducibility.
    """
    shape = tuple(shape)
    labels = torch.randint(0, vocab, shape, generator=generator, dtype=torch.long)
    if ignore == "none":
        return labels
    if ignore == "all":
        return torch.full(shape, ignore_index, dtype=torch.long)
    if ignore != "some":
        raise ValueError(f"ignore: expected 'none', 'some' or 'all', got {ignore!r}")
    drop = torch.rand(shape, generator=generator) < 1 / 3
    flat = drop.view(-1)
    if flat.numel() >= 2:
        flat[0] = True  # at least one ignored ...
        flat[-1] = False  # ... and one valid token
    return labels.masked_fill(drop, ignore_index)


def _flat_logits(logits: Logits) -> torch.Tensor:
    """``[N, V]`` float64 view of a tensor or a list of ``[B, S_i, V]`` chunks (kept in the graph)."""
    if isinstance(logits, (list, tuple)):
        logits = torch.cat(list(logits), dim=1)
    x = logits.to(torch.float64)
    return x.reshape(-1, x.shape[-1])


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    valid = labels.reshape(-1) != ignore_index
    if per_token.shape != valid.shape:
        raise ValueError(f"labels: {tuple(labels.shape)} does not match {per_token.shape[0]} tokens of logits")
    # where, not multiply: a value at an ignored token (any value) must contribute nothing.
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token.reshape(labels.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp(min=1).to(total.dtype)
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def _lse(z: torch.Tensor) -> torch.Tensor:
    """``log sum_v exp z_v`` written out (max-shifted), ``[..., 1]``."""
    m = z.max(dim=-1, keepdim=True).values.detach()
    return m + (z - m).exp().sum(dim=-1, keepdim=True).log()


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    """``z - lse(z)``, fp64; -inf logits stay -inf."""
    return z - _lse(z)


def _kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``sum_v a (log a - log b)`` per token, with ``0 log 0 = 0`` (no NaN value or gradient)."""
    pos = a > 0
    diff = torch.where(pos, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(dim=-1)


# ---------------------------------------------------------------------------------- cross-entropy


def ref_ce(
    logits: Logits,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross-entropy, fp64.

    Per token: ``z = s tanh(z / s)`` (softcap, if given) first; then with ``log p = log_softmax(z)``,
    ``(1 - eps) (-log p[y]) + eps * mean_v(-log p[v]) + c * lse(z)^2``.
    """
    z = _flat_logits(logits)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = _lse(z)
    logp = z - lse
    lse = lse.squeeze(-1)
    y = labels.reshape(-1)
    safe = torch.where(y == ignore_index, torch.zeros_like(y), y)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(dim=-1)
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse.square()
    return _reduce(loss, labels, ignore_index, reduction)


# ------------------------------------------------------------------------------------ distillation


def teacher_entropy(teacher_logits: Logits, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy ``-sum p log p`` of the teacher, fp64 ``[N]``."""
    log_p = _log_softmax(_flat_logits(teacher_logits) / temperature)
    p = log_p.exp()
    return -_kl(p, log_p, torch.zeros_like(log_p))


def ref_kd(
    student_logits: Logits,
    teacher_logits: Logits,
    labels: torch.Tensor,
    *,
    divergence: str,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    beta: float = 0.5,
    sym_kd_ratio: float = 0.5,
    true_kl: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """A distillation divergence between teacher p and student q, fp64.

    Both sides' logits are divided by ``temperature`` and the result is multiplied by T^2 when
    ``scale_by_temperature_squared``. Per token:

    * ``forward_kl``: ``sum p (log p - log q)``; with ``true_kl=False`` torchtune's ``-sum p log q``.
    * ``reverse_kl``: ``sum q (log q - log p)``.
    * ``symmetric_kl``: ``r * forward_kl + (1 - r) * reverse_kl``, ``r = sym_kd_ratio``.
    * ``jsd``: ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``; beta 0 and
      1 are the TRL / Liger limits forward KL and reverse KL.
    * ``tvd``: ``0.5 sum |p - q|``.

    Vocabulary entries with probability 0 on a side (e.g. logits of -inf) contribute ``0 log 0 = 0``.
    """
    if divergence not in _WRITTEN_OUT:
        return _ref_registered(
            student_logits,
            teacher_logits,
            labels,
            divergence,
            temperature,
            scale_by_temperature_squared,
            ignore_index,
            reduction,
            beta=beta,
            sym_kd_ratio=sym_kd_ratio,
            true_kl=true_kl,
        )
    zs = _flat_logits(student_logits) / temperature
    zt = _flat_logits(teacher_logits) / temperature
    if zs.shape != zt.shape:
        raise ValueError(f"teacher_logits: shape {tuple(zt.shape)} differs from student's {tuple(zs.shape)}")
    log_q, log_p = _log_softmax(zs), _log_softmax(zt)
    q, p = log_q.exp(), log_p.exp()

    def forward_kl() -> torch.Tensor:
        if true_kl:
            return _kl(p, log_p, log_q)
        return _kl(p, torch.zeros_like(log_q), log_q)  # -sum p log q

    def reverse_kl() -> torch.Tensor:
        return _kl(q, log_q, log_p)

    if divergence == "forward_kl":
        per_token = forward_kl()
    elif divergence == "reverse_kl":
        per_token = reverse_kl()
    elif divergence == "symmetric_kl":
        per_token = sym_kd_ratio * forward_kl() + (1 - sym_kd_ratio) * reverse_kl()
    elif divergence == "jsd":
        if beta == 0.0:
            per_token = _kl(p, log_p, log_q)
        elif beta == 1.0:
            per_token = _kl(q, log_q, log_p)
        else:
            m = beta * p + (1 - beta) * q
            log_m = torch.where(m > 0, m, torch.ones_like(m)).log()
            per_token = beta * _kl(p, log_p, log_m) + (1 - beta) * _kl(q, log_q, log_m)
    else:
        per_token = 0.5 * (p - q).abs().sum(dim=-1)
    if scale_by_temperature_squared:
        per_token = per_token * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def _ref_registered(
    student_logits,
    teacher_logits,
    labels,
    divergence,
    temperature,
    scale_by_temperature_squared,
    ignore_index,
    reduction,
    **options,
) -> torch.Tensor:
    """A registered divergence without a formula here: its own elementwise value over the full fp64
    log-probabilities (entries where either side is -inf count 0), in the autograd graph."""
    from tune_losses.divergences import get_divergence
    from tune_losses.options import KDOptions

    div = get_divergence(divergence)
    opts = KDOptions(divergence, temperature, scale_by_temperature_squared, **options)
    log_q = _log_softmax(_flat_logits(student_logits) / temperature)
    log_p = _log_softmax(_flat_logits(teacher_logits) / temperature)
    mask = (log_p == float("-inf")) | (log_q == float("-inf"))
    terms = div.value(log_p.masked_fill(mask, 0.0), log_q.masked_fill(mask, 0.0), opts)
    per_token = terms.masked_fill(mask, 0.0).sum(-1)
    if scale_by_temperature_squared:
        per_token = per_token * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


# ------------------------------------------------------------------------------ log-probabilities


def ref_log_probs(logits: Logits, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100):
    """``(log q[y], entropy -sum q log q)`` per token with ``q = softmax(z / T)``, fp64, shaped like
    ``labels``; both exactly 0 at ignored tokens."""
    log_q = _log_softmax(_flat_logits(logits) / temperature)
    y = labels.reshape(-1)
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y))
    lp = log_q.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    q = log_q.exp()
    ent = -_kl(q, log_q, torch.zeros_like(log_q))
    zero = torch.zeros_like(lp)
    return torch.where(valid, lp, zero).reshape(labels.shape), torch.where(valid, ent, zero).reshape(labels.shape)


# ------------------------------------------------------------------ options of a parameter sweep

_PARALLEL = ("process_group", "vocab_parallel", "vocab_start", "vocab_size")
_EXECUTION = ("algorithm", "drop_ignored_tokens", "dw_accumulation")
_KD = ("divergence", "temperature", "beta", "sym_kd_ratio", "scale_by_temperature_squared", "teacher_vocab")


def object_form(loss: str, **flat) -> dict:
    """Keyword arguments for a fused loss (``loss``: ``"ce"``, ``"kd"``, ``"distillation"``,
    ``"log_probs"`` or ``"sparse"``) from a sweep's flat options: the term options go into
    ``options=`` (CEOptions / KDOptions / DistillationOptions), the placement ones into ``parallel=``,
    the execution ones into ``execution=``; ``ignore_index`` and ``validate`` join the term options
    (the cross-entropy's ``ignore_index`` and the plain arguments of ``log_probs`` / ``sparse`` stay)."""
    from tune_losses.options import CEOptions, DistillationOptions, ExecutionOptions, KDOptions, VocabParallelOptions

    kw = dict(flat)

    def take(names):
        return {k: kw.pop(k) for k in names if k in kw}

    parallel, execution = take(_PARALLEL), take(_EXECUTION)
    if loss == "ce":
        ce = take(("label_smoothing", "z_loss", "softcap", "validate"))
        if ce:
            kw["options"] = CEOptions(ignore_index=kw.pop("ignore_index", -100), **ce)
    elif loss == "kd":
        kw["options"] = KDOptions(**take(_KD + ("ignore_index", "validate")))
    elif loss == "distillation":
        mix, kd = take(("kd_ratio", "label_smoothing")), KDOptions(**take(_KD + ("ignore_index", "validate")))
        ce = CEOptions(kd.ignore_index, mix.get("label_smoothing", 0.0), validate=kd.validate)
        kw["options"] = DistillationOptions(mix.get("kd_ratio", 0.5), kd, ce)
    elif loss not in ("log_probs", "sparse"):
        raise ValueError(f"loss: expected ce, kd, distillation, log_probs or sparse, got {loss!r}")
    if parallel:
        kw["parallel"] = VocabParallelOptions(**parallel)
    if execution:
        kw["execution"] = ExecutionOptions(**execution)
    return kw
