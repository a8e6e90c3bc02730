"""Per-chunk loss math, written once against a vocabulary reducer; one file per divergence.

Every function takes one chunk of logits ``[n, V_r]`` (the compute dtype) and returns the per-token
values ``[n]`` of the *whole* vocabulary with, on request, the gradient with respect to those logits
``[n, V_r]`` (:mod:`~tune_losses.divergences.common` explains the reducer):

* :func:`ce_chunk` (cross-entropy), :func:`log_prob_chunk` (label log-probability and entropy);
* :func:`kd_chunk`: a distillation divergence chosen by ``KDOptions.divergence`` among the
  registered :class:`Divergence` classes, one per file: forward_kl, reverse_kl, symmetric_kl, jsd,
  tvd. Adding one is one class in one new file (CONTRIBUTING.md); its gradient comes from autograd
  over its elementwise terms unless it writes a closed form.

Most take a :class:`ChunkRun`: the reducer, a gradient ``weight`` and ``consume``. Gradient weights
are per-token ``[n]`` factors (the loss weight, the ``1 / tokens`` scale, or ``grad_output``), already
0 at ignored tokens; ``None`` means "no gradient", and then none is built. ``consume`` lets a function
overwrite a logits buffer the caller no longer needs (a chunk then costs fewer ``[n, V]`` buffers).
"""

# isort: off
# Registration order is the order of divergence_names() (error messages, parametrized tests).
from tune_losses.divergences.forward_kl import ForwardKL
from tune_losses.divergences.reverse_kl import ReverseKL
from tune_losses.divergences.symmetric_kl import SymmetricKL
from tune_losses.divergences.jsd import JSD
from tune_losses.divergences.tvd import TVD

# isort: on
from tune_losses.divergences.base import (
    Divergence,
    divergence_names,
    divergence_terms,
    get_divergence,
    kd_chunk,
    log_softmax_pair,
)
from tune_losses.divergences.common import NEG_INF, ChunkRun, VocabReducer
from tune_losses.divergences.cross_entropy import ce_chunk
from tune_losses.divergences.log_probs import log_prob_chunk

__all__ = [
    "NEG_INF",
    "ChunkRun",
    "VocabReducer",
    "Divergence",
    "divergence_names",
    "get_divergence",
    "divergence_terms",
    "log_softmax_pair",
    "kd_chunk",
    "ce_chunk",
    "log_prob_chunk",
    "ForwardKL",
    "ReverseKL",
    "SymmetricKL",
    "JSD",
    "TVD",
]
