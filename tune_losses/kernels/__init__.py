"""Per-chunk loss math as kernels behind one contract (values per token, gradient w.r.t. logits).

* :mod:`~tune_losses.kernels.blocked`: the column-local gradients of the vocabulary-blocked
  backward (a block of vocabulary columns over all tokens, from per-token statistics).
* :mod:`~tune_losses.kernels.triton_ce`: cross-entropy, and cross-entropy + forward KL, over one
  chunk of logits in the input dtype as Triton kernels (GPU; on CPU tensors under
  ``TRITON_INTERPRET=1`` for the tests); the kernels' source is in ``triton_ce_source``.

Importing this package needs torch only; Triton is imported where a Triton kernel is asked for.
"""
