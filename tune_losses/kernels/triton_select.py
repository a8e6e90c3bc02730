"""Which Triton chunk kernel serves a term set (the engine's one call into the kernels).

Term sets served (:func:`triton_chunk_math`), on one process, for bf16 / fp16 / fp32 logits:

* cross-entropy alone, any :class:`~tune_losses.options.CEOptions` (``triton_ce.ce_chunk_triton``);
* the label's log-probability, with or without the entropy (``triton_terms.log_prob_chunk_triton``);
* a divergence alone, or cross-entropy (any options) then a divergence (distillation): forward KL,
  reverse KL, symmetric KL, JSD (beta in [0, 1]), TVD (``triton_terms.divergence_chunk_triton``).

A term of a higher layer (an alignment term with its own per-token formula over the label's
log-probability) joins by defining ``triton_chunk_math(ignore_index)``, returning a callable of the
same form (or None for the compiled / eager math); it may call
:func:`~tune_losses.kernels.triton_terms.log_prob_chunk_triton` twice: values first, then the
gradient for the per-token weight its formula gives (``d loss / d log q[y]``).

Everything else gets None and runs the engine's compiled / eager math: other terms (a sparse
teacher, the alignment terms with their own formulas, token statistics), a registered divergence
without a kernel, ``teacher_vocab="pad_student"``, a vocabulary-parallel reducer, fp64 inputs (fp64
math, for gradcheck), or no Triton here (:func:`~tune_losses.kernels.triton_ce.triton_wanted`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from tune_losses.kernels import triton_ce, triton_terms
from tune_losses.options import IGNORE_INDEX, CEOptions, KDOptions
from tune_losses.terms import CrossEntropyTerm, DivergenceTerm, LogProbTerm, Term

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _kernel_divergence(t: Term) -> bool:
    """A divergence term the divergence kernel serves."""
    o = getattr(t, "opts", None)
    return (
        type(t) is DivergenceTerm
        and isinstance(o, KDOptions)
        and o.teacher_vocab != "pad_student"
        and o.divergence in triton_terms.DIVERGENCE_CODES
    )


def _first(ws) -> Optional[torch.Tensor]:
    return None if ws is None else ws[0]


def triton_chunk_math(
    terms: Sequence[Term],
    reducer,
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    ignore_index: int = IGNORE_INDEX,
) -> Optional[Callable]:
    """The Triton chunk math for this term set on ``device``, or None where the engine's eager /
    compiled math must run (see the module docstring).

    Args:
        dtype: the logits' dtype (None: not checked); ignore_index: the plan's (log-probabilities).

    The callable takes ``(z [n, V], zt [n, V_t] or None, labels [n], weights, inputs)`` (logits in
    the input dtype; ``weights`` as the engine's, per term, per output; ``inputs`` the chunk's
    per-token side inputs by name) and returns ``(outputs, g)``: every output ``[n]`` of every
    term, in order, and ``g`` = ``z`` holding the gradient, or None when no output has a weight.
    """
    if reducer is not None and reducer.distributed:
        return None
    if dtype is not None and dtype not in _DTYPES:
        return None
    math = _select(list(terms), ignore_index)
    if math is None or not triton_ce.triton_wanted(device):
        return None
    return math


def _select(terms: Sequence[Term], ignore_index: int) -> Optional[Callable]:
    own = getattr(terms[0], "triton_chunk_math", None) if len(terms) == 1 else None
    if callable(own):
        return own(ignore_index)
    if len(terms) == 1 and type(terms[0]) is CrossEntropyTerm:
        opts = terms[0].opts  # type: ignore[attr-defined]

        def ce_math(z, zt, labels, weights, inputs=None):
            w = _first(weights[0])
            loss, _ = triton_ce.ce_chunk_triton(z, labels, opts, w)
            return [loss], (z if w is not None else None)

        return ce_math
    if len(terms) == 1 and type(terms[0]) is LogProbTerm:
        term: LogProbTerm = terms[0]  # type: ignore[assignment]

        def log_prob_math(z, zt, labels, weights, inputs=None):
            ws = weights[0] or [None, None]
            w_lp, w_h = ws[0], (ws[1] if term.entropy and len(ws) > 1 else None)
            outs = triton_terms.log_prob_chunk_triton(
                z, labels, term.temperature, ignore_index, term.entropy, w_lp, w_h
            )
            return outs, (z if w_lp is not None or w_h is not None else None)

        return log_prob_math
    distill = len(terms) == 2 and type(terms[0]) is CrossEntropyTerm
    if not (terms and _kernel_divergence(terms[-1]) and (len(terms) == 1 or distill)):
        return None
    kd_opts: KDOptions = terms[-1].opts  # type: ignore[attr-defined]
    ce_opts: Optional[CEOptions] = terms[0].opts if distill else None  # type: ignore[attr-defined]

    def kd_math(z, zt, labels, weights, inputs=None):
        w_kd = _first(weights[-1])
        w_ce = _first(weights[0]) if distill else None
        if w_kd is None and w_ce is not None:
            w_kd = torch.zeros_like(w_ce)
        if w_kd is not None and distill and w_ce is None:
            w_ce = torch.zeros_like(w_kd)
        # looked up per call (the tests spy on it)
        ce, kd = triton_terms.divergence_chunk_triton(z, zt, labels, kd_opts, kd_opts.ignore_index, ce_opts, w_ce, w_kd)
        return ([ce, kd] if distill else [kd]), (z if w_kd is not None else None)

    return kd_math
