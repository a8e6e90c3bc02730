"""Liger-Kernel's ORPO test file, adapted to call our ``linear_preference_loss(loss_type="orpo")``.

Adapted from Liger-Kernel (BSD-2-Clause) ``test/chunked_loss/test_orpo_loss.py``: both tests, every
case (24), their inputs (with ``nll_target``: the NLL term on other labels than the preference
labels), their torch reference (tests/peers/liger_preference_reference.py) and tolerances. ORPO's NLL
is always on (weight 1, as Liger's); Liger's logged odds-ratio means are not compared (we do not
return them). The functional test compares ours with the reference under the functional's defaults
(no ignored token, beta 0.1). See tests/peers/liger_harness.py for the comparison and the fast / slow
/ ``TUNE_LOSSES_PEER_FULL`` split.
"""

from __future__ import annotations

import pytest
from liger_harness import correctness_cases, functional_cases, run_case
from liger_preference_reference import orpo_pair_loss


@pytest.mark.parametrize("c", correctness_cases(ii_beta=[(-100, 0.1), (42, 0.2)]))
def test_correctness(c):
    ignore_index, beta = c["ii_beta"]
    run_case(
        c,
        orpo_pair_loss(beta),
        dict(loss_type="orpo"),
        use_ref=False,
        nll_target=True,
        beta=beta,
        ignore_index=ignore_index,
    )


@pytest.mark.parametrize("c", functional_cases())
def test_correctness_functional(c):
    run_case(c, orpo_pair_loss(0.1), dict(loss_type="orpo"), use_ref=False, ignore=False, beta=0.1, check_aux=False)
