"""Liger-Kernel's SimPO test file, adapted to call our ``linear_preference_loss(loss_type="simpo")``.

Adapted from Liger-Kernel (BSD-2-Clause) ``test/chunked_loss/test_simpo_loss.py``: both tests, every
case (40), their inputs, their torch reference (Liger's CPO reference with ``loss_type="simpo"``:
tests/peers/liger_preference_reference.py) and tolerances. SimPO on mean log-probs, margin ``gamma``,
label smoothing, plus the chosen NLL (weight 1, on in Liger's module and reference). The functional
test compares ours with the reference under the functional's defaults (no ignored token, beta 0.1,
gamma 0.5, no NLL). See tests/peers/liger_harness.py for the comparison and the fast / slow /
``TUNE_LOSSES_PEER_FULL`` split.
"""

from __future__ import annotations

import pytest
from liger_harness import cpo_cases, functional_cases, run_cpo_case


@pytest.mark.parametrize("c", cpo_cases((5e-3, 5e-3), ii_beta_gamma=[(-100, 0.1, 0.5), (42, 0.2, 0.85)]))
def test_correctness(c):
    ignore_index, beta, gamma = c["ii_beta_gamma"]
    run_cpo_case(c, beta=beta, gamma=gamma, nll_weight=1.0, average_log_prob=True, ignore_index=ignore_index)


@pytest.mark.parametrize("c", functional_cases())
def test_correctness_functional(c):
    run_cpo_case(c, beta=0.1, gamma=0.5, nll_weight=0.0, average_log_prob=True, ignore=False, check_aux=False)
