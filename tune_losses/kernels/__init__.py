"""Per-chunk loss math as kernels behind one contract (values per token, gradient w.r.t. logits).

* :mod:`~tune_losses.kernels.blocked`: the column-local gradients of the vocabulary-blocked
  backward (a block of vocabulary columns over all tokens, from per-token statistics).
* :mod:`~tune_losses.kernels.triton_ce`: cross-entropy over one chunk of logits in the input dtype
  as a Triton kernel (GPU; on CPU tensors under ``TRITON_INTERPRET=1`` for the tests); the
  kernels' source is in ``triton_ce_source``.
* :mod:`~tune_losses.kernels.triton_terms`: the label's log-probability (and entropy), and
  distillation (every divergence, with or without cross-entropy) the same way (``triton_terms_source``).
* :mod:`~tune_losses.kernels.triton_select`: which of these serves a term set (the engine's call).

Importing this package needs torch only; Triton is imported where a Triton kernel is asked for.
"""
