"""Liger-Kernel's CPO test file, adapted to call our ``linear_preference_loss``.

Adapted from Liger-Kernel (BSD-2-Clause) ``test/chunked_loss/test_cpo_loss.py``: both tests, every case
(40), their inputs, their torch reference (tests/peers/liger_preference_reference.py) and tolerances.
CPO is our reference-free ``simpo`` loss with ``gamma=0`` on summed log-probs plus the chosen NLL
(``nll_weight``, Liger's ``alpha``). Liger's test parametrizes ``alpha`` but hands it to neither side
(both use 1); here both sides get it. The functional test compares ours with the reference under the
functional's defaults (no ignored token, beta 0.1, alpha 1, summed log-probs). See
tests/peers/liger_harness.py for the comparison and the fast / slow / ``TUNE_LOSSES_PEER_FULL`` split.
"""

from __future__ import annotations

import pytest
from liger_harness import cpo_cases, functional_cases, run_cpo_case


@pytest.mark.parametrize("c", cpo_cases((5e-2, 5e-2), ii_beta_alpha=[(-100, 0.1, 1.0), (42, 0.2, 0.85)]))
def test_correctness(c):
    ignore_index, beta, alpha = c["ii_beta_alpha"]
    run_cpo_case(c, beta=beta, gamma=0.0, nll_weight=alpha, average_log_prob=False, ignore_index=ignore_index)


@pytest.mark.parametrize("c", functional_cases())
def test_correctness_functional(c):
    run_cpo_case(c, beta=0.1, gamma=0.0, nll_weight=1.0, average_log_prob=False, ignore=False, check_aux=False)
