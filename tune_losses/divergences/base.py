"""A distillation divergence as one class, the registry its definition fills, and the per-chunk driver.

A divergence of teacher ``p`` and student ``q = softmax(z / T)`` is ``D = sum_v f(log p_v, log q_v)``
over the vocabulary. With ``a_v = dD / dlog q_v``, the gradient with respect to the student's logits
is ``dD / dz_j = (a_j - q_j sum_v a_v) / T`` (the softmax's chain rule, one per-token sum), and the
same holds for the teacher with ``b_v = dD / dlog p_v``. So a divergence only gives ``f``:

* :meth:`Divergence.value`: the elementwise terms ``f`` ``[n, V_r]`` (required);
* :meth:`Divergence.closed_form`: ``a`` (and ``b``) written out by hand (optional, for speed and
  memory); without it ``a`` and ``b`` come from autograd over ``f`` on the chunk
  (``torch.func.vjp``, which also runs inside the compiled chunk math);
* :meth:`Divergence.from_logits`: a whole fused path from the raw logits (optional; forward KL has one).

Defining a subclass with a ``name`` registers it (:func:`divergence_names`, :func:`get_divergence`):
``KDOptions(divergence=name)``, the fused losses and the chunked-output losses then accept it.
Entries where either side's logit is exactly -inf (a model's deliberate mask) count as 0; a NaN or
+inf logit makes the token's value NaN (never hidden).
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional, Tuple

import torch

from tune_losses.divergences.common import NEG_INF, ChunkRun, VocabReducer, row_max, scaled
from tune_losses.options import KDOptions

_REGISTRY: Dict[str, Divergence] = {}


class Divergence:
    """Base of every distillation divergence; a subclass with a ``name`` registers itself.

    Attributes:
        name: the ``divergence=`` value that selects it (``"forward_kl"``, ...).
        chunked_name: the stem of its torchtune-style chunked-output classes (``"ForwardKL"`` gives
            ``ForwardKLWithChunkedOutputLoss`` and ``ForwardKLLoss``); None for none.
        torchtune_args: :class:`~tune_losses.options.KDOptions` fields those classes take by position
            between ``num_output_chunks`` and ``ignore_index`` (torchtune's order: JSD's ``beta``).
        options: the divergence-specific :class:`~tune_losses.options.KDOptions` fields it reads
            (JSD: ``beta``); the chunked-output classes take these and the common ones.
        chunked_defaults: those classes' defaults that differ from ``KDOptions``'s (the forward-KL
            family's drop-ins default to torchtune's value, ``true_kl=False``).
    """

    name: ClassVar[str] = ""
    chunked_name: ClassVar[Optional[str]] = None
    torchtune_args: ClassVar[Tuple[str, ...]] = ()
    options: ClassVar[Tuple[str, ...]] = ()
    chunked_defaults: ClassVar[Dict[str, object]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return
        old = _REGISTRY.get(name)
        if old is not None and type(old).__qualname__ != cls.__qualname__:
            raise ValueError(
                f"divergence {name!r}: already registered by {type(old).__module__}.{type(old).__qualname__}"
            )
        _REGISTRY[name] = cls()

    def value(self, log_p: torch.Tensor, log_q: torch.Tensor, opts: KDOptions) -> torch.Tensor:
        """Elementwise terms ``f(log p, log q)`` ``[n, V_r]`` whose sum over the vocabulary is the
        divergence (before ``opts.loss_scale``). Inputs are finite here (masked entries are 0)."""
        raise NotImplementedError

    def closed_form(
        self,
        log_p: torch.Tensor,
        log_q: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
        opts: KDOptions,
        need_a: bool,
        need_b: bool,
    ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """``(terms, a, b)`` with masked entries 0 (``a`` / ``b`` None when not needed), or None to
        take ``a`` and ``b`` from autograd over :meth:`value`. May not modify its inputs."""
        return None

    def from_logits(self, zs, zt, opts: KDOptions, red: VocabReducer, weight, consume_s: bool, consume_t: bool, shared):
        """``(value [n], grad [n, V_r] or None)`` straight from the raw logits, or None for the generic path."""
        return None


def divergence_names() -> Tuple[str, ...]:
    """Every registered divergence, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def get_divergence(name: str) -> Divergence:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"divergence: expected one of {divergence_names()}, got {name!r}") from None


def _by_autograd(div: Divergence, log_p, log_q, opts: KDOptions, need_a: bool, need_b: bool):
    """``(terms, a, b)`` of a divergence without a closed form: ``a``, ``b`` by a vector-Jacobian
    product of :meth:`Divergence.value` (elementwise over the chunk, so the cotangent is ones)."""
    mask = (log_p == NEG_INF) | (log_q == NEG_INF)
    lp, lq = log_p.masked_fill(mask, 0.0), log_q.masked_fill(mask, 0.0)
    if not (need_a or need_b):
        return div.value(lp, lq, opts).masked_fill_(mask, 0.0), None, None
    out = torch.func.vjp(lambda a_, b_: div.value(b_, a_, opts), lq, lp)
    terms, vjp = out[0], out[1]  # (value, vjp function): no has_aux
    a, b = vjp(torch.ones_like(terms))
    a = a.masked_fill(mask, 0.0) if need_a else None
    b = b.masked_fill(mask, 0.0) if need_b else None
    return terms.masked_fill(mask, 0.0), a, b


def divergence_terms(log_p: torch.Tensor, log_q: torch.Tensor, opts: KDOptions, need_a: bool, need_b: bool = False):
    """Elementwise terms of ``opts.divergence`` and ``a = dterms / dlog q``, over this slice of the vocabulary.

    ``divergence = loss_scale * sum_v terms``.

    Args:
        log_p, log_q: ``[n, V_r]`` teacher / student log-probabilities (normalized over the whole
            vocabulary, temperature applied).
        need_b: also return ``b = dterms / dlog p`` (a teacher that requires grad).

    Returns:
        ``(terms [n, V_r], a [n, V_r] or None, q [n, V_r])``, with ``(b, p)`` appended if ``need_b``.
    """
    div = get_divergence(opts.divergence)
    p, q = log_p.exp(), log_q.exp()
    out = div.closed_form(log_p, log_q, p, q, opts, need_a, need_b)
    terms, a, b = out if out is not None else _by_autograd(div, log_p, log_q, opts, need_a, need_b)
    return (terms, a, q, b, p) if need_b else (terms, a, q)


def log_softmax_pair(zs, zt, t: float, red: VocabReducer, consume_s: bool, consume_t: bool):
    """Student and teacher ``log softmax(z / T)`` over the whole vocabulary (one MAX, one SUM)."""
    ls, lt = scaled(zs, t, consume_s), scaled(zt, t, consume_t)
    m = row_max(torch.stack([ls.amax(-1), lt.amax(-1)]), red)
    # (z - max) - log(sum): as log_softmax rounds, not z - (max + log(sum)).
    ls, lt = ls.sub_(m[0].unsqueeze(-1)), lt.sub_(m[1].unsqueeze(-1))
    log_sums = red.sum(torch.stack([ls.exp().sum(-1), lt.exp().sum(-1)])).log()
    return ls.sub_(log_sums[0].unsqueeze(-1)), lt.sub_(log_sums[1].unsqueeze(-1))


def kd_chunk(zs: torch.Tensor, zt: torch.Tensor, opts: KDOptions, run: ChunkRun, teacher: Optional[ChunkRun] = None):
    """A distillation divergence of teacher ``p = softmax(zt / T)`` and student ``q = softmax(zs / T)``.

    Args:
        zs, zt: ``[n, V_r]`` raw student / teacher logits.
        run: the student side: the reducer, the gradient weight per token (None: the value only),
            whether ``zs`` may be overwritten, and in ``rows["raw"]`` the raw student logits'
            ``(max, sum exp)`` when another term of the chunk computed them (shared by a
            divergence's fused path at T = 1).
        teacher: the teacher side: whether ``zt`` may be overwritten and, with a ``weight`` ``[n]``,
            also the gradient w.r.t. ``zt`` (a teacher that requires grad, chunked-output losses
            only) as a third result.

    Returns:
        ``(divergence [n] times loss_scale (no ignore mask), grad [n, V_r] w.r.t. zs or None)``.
    """
    t = opts.temperature
    red, weight, consume_student, rows = run
    teacher_weight, consume_teacher = (None, False) if teacher is None else (teacher.weight, teacher.consume)
    div = get_divergence(opts.divergence)
    if teacher_weight is None:
        shared = rows.get("raw") if rows and t == 1.0 else None
        fused = div.from_logits(zs, zt, opts, red, weight, consume_student, consume_teacher, shared)
        if fused is not None:
            return fused
    log_q, log_p = log_softmax_pair(zs, zt, t, red, consume_student, consume_teacher)
    need, need_b = weight is not None, teacher_weight is not None
    terms, a, q, *bp = divergence_terms(log_p, log_q, opts, need, need_b)
    del log_q, log_p
    stats = [terms.sum(-1)] + ([a.sum(-1)] if need else []) + ([bp[0].sum(-1)] if need_b else [])
    del terms
    r = red.sum(torch.stack(stats))
    value = r[0] * opts.loss_scale if opts.loss_scale != 1.0 else r[0]
    g = None
    if weight is not None:
        g = a.sub_(q.mul_(r[1].unsqueeze(-1)))
        g = g.mul_((weight * (opts.loss_scale / t)).unsqueeze(-1))
    if teacher_weight is None:
        return value, g
    b, p = bp
    gt = b.sub_(p.mul_(r[-1].unsqueeze(-1))).mul_((teacher_weight * (opts.loss_scale / t)).unsqueeze(-1))
    return value, g, gt
